package mesh

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// A hop that says its session table is full counts as SessionsFullLoad
// requests waiting, fading as any answer's load does; one with room, or
// that did not say, counts as what it said.
func TestFreshLoadSessionsFull(t *testing.T) {
	zero, one := 0, 1
	rec := protocol.Load{InFlight: 1}
	for _, c := range []struct {
		seen protocol.HopLoad
		age  time.Duration
		want protocol.Load
	}{
		{protocol.HopLoad{InFlight: 2, FreeSessions: &zero}, 0, protocol.Load{InFlight: 2, Queued: SessionsFullLoad}},
		{protocol.HopLoad{InFlight: 2, FreeSessions: &zero}, LoadHalfLife, protocol.Load{InFlight: 2, Queued: SessionsFullLoad / 2}},
		{protocol.HopLoad{InFlight: 2, Queued: 100, FreeSessions: &zero}, 0, protocol.Load{InFlight: 2, Queued: 100}},
		{protocol.HopLoad{InFlight: 2, FreeSessions: &one}, 0, protocol.Load{InFlight: 2}},
		{protocol.HopLoad{InFlight: 2}, 0, protocol.Load{InFlight: 2}},
	} {
		if got := FreshLoad(rec, c.seen, c.age); got != c.want {
			t.Errorf("FreshLoad(%+v, free %v, %s) = %+v, want %+v", rec, c.seen.FreeSessions, c.age, got, c.want)
		}
	}
}

// Issue 15: a hop's answers say how many sessions it can still open. When
// another requester has filled a replica's table, this requester's next
// session goes to the other replica, though it advertises blocks three
// times as slow.
func TestFullSessionTableRoutesNewSessionsElsewhere(t *testing.T) {
	sm := newGPTServingMesh(t)
	req := sm.start(t, nil, nil)
	boot := []peer.AddrInfo{addrInfo(req)}
	other := sm.start(t, boot, nil)
	full := sm.start(t, boot, &[2]int{0, 6}, gptSpan(sm, 0, 6, 100))
	full.Serve(sm.providers[len(sm.providers)-1], StageConfig{MaxSessions: 2})
	slow := sm.start(t, boot, &[2]int{0, 6}, gptSpan(sm, 0, 6, 300))
	sm.connectAll(t)
	for _, r := range []*Mesh{req, other} {
		r.View().SetManifest(sm.model.ID, sm.model.Manifest)
		viewOf(t, r, sm, 2)
	}
	spec := sm.model.Manifest.Decoder
	prompt := byteTokens("room for one more?")
	ring := func(r *Mesh, avoid ...peer.ID) *Session {
		t.Helper()
		s := r.NewSession(sm.model.ID, InferOptions{Avoid: avoid})
		t.Cleanup(func() { s.Close() })
		if err := s.Ring(context.Background(), RingOptions{Prompt: shards.StepInputs(spec, prompt, 0), Positions: len(prompt),
			MaxTokens: 2, Decoder: spec}, func(RingToken) bool { return true }); err != nil {
			t.Fatal(err)
		}
		return s
	}
	// The other requester holds one of the two sessions; this one takes
	// the second, and the answer says none is left.
	ring(other, slow.ID())
	if got := ring(req).Route()[0].Peer; got != full.ID().String() {
		t.Fatalf("the first session went to %s, want the faster replica", got)
	}
	mv, err := req.View().Model(context.Background(), sm.model.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, pv := range mv.Peers {
		if pv.ID == full.ID() && (pv.Load == nil || pv.Load.Queued < SessionsFullLoad/2) {
			t.Fatalf("the full replica's load in the view: %+v, want its full table counted", pv.Load)
		}
	}
	if got := ring(req).Route()[0].Peer; got != slow.ID().String() {
		t.Fatalf("with the faster replica's table full, the next session went to %s, want the other replica", got)
	}
}
