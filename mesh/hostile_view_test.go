package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// servingMesh is a mesh on loopback QUIC that serves spans of a real model
// (through a real runtime) and advertises what it is given.
type servingMesh struct {
	meshes    []*Mesh
	providers []*modelProvider
	model     *shards.Model
	rt        *shards.Runtime
	// coordEvery, if set, replaces the meshes' coordinate round interval
	// (1 s).
	coordEvery time.Duration
}

// newServingMesh builds a 4-block MLP and a runtime for it; meshes started
// with start are closed at the end of the test.
func newServingMesh(t testing.TB) *servingMesh {
	t.Helper()
	m, err := build.MLP(build.MLPConfig{Layers: 4, Dim: 16, Seed: 3}, filepath.Join(t.TempDir(), "mlp"))
	if err != nil {
		t.Fatal(err)
	}
	return servingMeshOf(t, m)
}

// servingMeshOf is a servingMesh of model m, closed at the end of the test.
func servingMeshOf(t testing.TB, m *shards.Model) *servingMesh {
	t.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	sm := &servingMesh{model: m, rt: rt}
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, ms := range sm.meshes {
			wg.Go(func() { ms.Close() })
		}
		wg.Wait()
		for _, p := range sm.providers {
			p.close()
		}
	})
	return sm
}

// start starts a mesh node advertising spans; serve, if set, is the span
// [start, end) of the model it really runs. It publishes its record and
// provides the model.
func (sm *servingMesh) start(t testing.TB, boot []peer.AddrInfo, serve *[2]int, spans ...protocol.ServedSpan) *Mesh {
	t.Helper()
	key, _ := newKey(t)
	advert := Advert{Models: spans, Accelerators: []protocol.Accelerator{{Kind: "cpu", Name: "test", Cores: 2}}}
	every := time.Second
	if sm.coordEvery > 0 {
		every = sm.coordEvery
	}
	ms, err := New(context.Background(), Config{Key: key, ListenAddrs: []string{"/ip4/127.0.0.1/udp/0/quic-v1"},
		Bootstrap: boot, DHTMode: "server", RecordTTL: time.Minute, ViewRefresh: 300 * time.Millisecond,
		CoordEvery: every, Version: "test", Logger: slog.New(slog.DiscardHandler)}, func() Advert { return advert })
	if err != nil {
		t.Fatal(err)
	}
	sm.meshes = append(sm.meshes, ms)
	if serve != nil {
		p := &modelProvider{rt: sm.rt, model: sm.model, start: serve[0], end: serve[1], spans: map[[2]int]*shards.Span{}}
		sm.providers = append(sm.providers, p)
		ms.Serve(p, StageConfig{})
	}
	if len(spans) > 0 {
		if err := ms.Publish(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := ms.Provide(context.Background(), sm.model.ID); err != nil {
			t.Fatal(err)
		}
	}
	return ms
}

// connectAll connects every mesh to every other, so that records pushed on
// publish reach everyone.
func (sm *servingMesh) connectAll(t testing.TB) {
	for _, a := range sm.meshes {
		for _, b := range sm.meshes {
			if a != b {
				if err := a.Connect(context.Background(), addrInfo(b)); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	for _, ms := range sm.meshes { // records again, now pushed to everyone
		ms.Publish(context.Background())
	}
}

// viewOf returns ms's view of the model once it lists want peers in
// Peers and Ignored together.
func viewOf(t testing.TB, ms *Mesh, sm *servingMesh, want int) *ModelView {
	t.Helper()
	var mv *ModelView
	waitFor(t, 10*time.Second, "the view lists every server", func() (bool, string) {
		var err error
		mv, err = ms.View().Model(context.Background(), sm.model.ID)
		if err != nil {
			return false, err.Error()
		}
		n := len(mv.Peers) + len(mv.Ignored) + len(mv.Distrusted)
		return n == want, fmt.Sprintf("%d blocks, peers %d, ignored %d, distrusted %d", mv.Blocks, len(mv.Peers), len(mv.Ignored), len(mv.Distrusted))
	})
	return mv
}

func peerIDs(pvs []PeerView) []string {
	var out []string
	for _, pv := range pvs {
		out = append(out, fmt.Sprintf("%s:%d-%d/%d", pv.ID.ShortString(), pv.Span.Start, pv.Span.End, pv.Span.Blocks))
	}
	return out
}

func hasPeer(pvs []PeerView, p peer.ID) bool {
	return slices.ContainsFunc(pvs, func(pv PeerView) bool { return pv.ID == p })
}

// Issue 12, finding 2: a capacity record claiming the model has 1000 blocks
// (serving 0-1) no longer redefines the model. Every node's view keeps the
// manifest's 4 blocks (or, before any manifest, the count most servers and
// its own span agree on), lists the hostile peer as Ignored, and routing
// and inference go on.
func TestHostileRecordDoesNotRedefineModel(t *testing.T) {
	sm := newServingMesh(t)
	blocks := len(sm.model.Manifest.Blocks)
	requester := sm.start(t, nil, nil)
	boot := []peer.AddrInfo{addrInfo(requester)}
	h0 := sm.start(t, boot, &[2]int{0, 2}, span(sm.model.ID, blocks, 0, 2))
	h1 := sm.start(t, boot, &[2]int{2, 4}, span(sm.model.ID, blocks, 2, 4))
	// The hostile peer: a validly signed record of its own, claiming 1000
	// blocks.
	liar := sm.start(t, boot, nil, span(sm.model.ID, 1000, 0, 2))
	sm.connectAll(t)

	check := func(who string, mv *ModelView) {
		t.Helper()
		if mv.Blocks != blocks || !mv.Complete() {
			t.Errorf("%s: view of %d blocks, %d uncovered; want %d blocks, complete", who, mv.Blocks, len(mv.Uncovered), blocks)
		}
		if !hasPeer(mv.Ignored, liar.ID()) || hasPeer(mv.Peers, liar.ID()) || hasPeer(mv.Distrusted, liar.ID()) {
			t.Errorf("%s: the hostile record is not ignored: peers %v, ignored %v", who, peerIDs(mv.Peers), peerIDs(mv.Ignored))
		}
	}
	// Before any manifest: the majority (and a server's own span) wins.
	check("requester without the manifest", viewOf(t, requester, sm, 3))
	check("server h0", viewOf(t, h0, sm, 3))
	check("server h1", viewOf(t, h1, sm, 3))

	// With the manifest, as a requester always has before routing.
	requester.View().SetManifest(sm.model.ID, sm.model.Manifest)
	check("requester with the manifest", viewOf(t, requester, sm, 3))
	in := shards.RandomInputs(sm.model.Manifest, 1, 1, 4)
	for i, ms := range []*Mesh{requester, h0, h1} {
		out, info, err := ms.Infer(context.Background(), sm.model.ID, in, InferOptions{StepTimeout: 5 * time.Second})
		if err != nil {
			t.Fatalf("node %d: infer: %v", i, err)
		}
		if out["y"] == nil {
			t.Fatalf("node %d: no output y: %v", i, out)
		}
		for _, h := range info.Route {
			if h.Peer == liar.ID().String() {
				t.Errorf("node %d routed through the hostile peer: %v", i, info.Route)
			}
		}
	}
}

// Where no manifest is known, one peer's count never overrides a
// majority or this node's own span; the manifest overrides everything.
func TestFitBlocks(t *testing.T) {
	sp := func(blocks, start, end int) protocol.ServedSpan {
		return protocol.ServedSpan{Model: "m", Blocks: blocks, Start: start, End: end, BlockMicros: make([]float64, end-start)}
	}
	for _, c := range []struct {
		name           string
		manifest, mine int
		spans          []protocol.ServedSpan
		want           int
	}{
		{"manifest wins over every claim", 4, 0, []protocol.ServedSpan{sp(1000, 0, 2), sp(1000, 2, 4), sp(1000, 4, 6)}, 4},
		{"own span wins over others", 0, 4, []protocol.ServedSpan{sp(1000, 0, 2), sp(1000, 2, 4)}, 4},
		{"majority", 0, 0, []protocol.ServedSpan{sp(4, 0, 2), sp(4, 2, 4), sp(1000, 0, 2)}, 4},
		{"tie: the count the spans cover", 0, 0, []protocol.ServedSpan{sp(4, 0, 4), sp(1000, 0, 2)}, 4},
		{"tie, neither covers: the smaller", 0, 0, []protocol.ServedSpan{sp(8, 0, 2), sp(6, 0, 2)}, 6},
		{"malformed claims do not vote", 0, 0, []protocol.ServedSpan{sp(4, 0, 4), sp(2, 1, 5), sp(2, 1, 5)}, 4},
		{"nobody", 0, 0, nil, 0},
	} {
		if got := FitBlocks(c.manifest, c.mine, c.spans); got != c.want {
			t.Errorf("%s: FitBlocks = %d, want %d", c.name, got, c.want)
		}
	}
	if SpanFits(sp(1000, 0, 2), 4) || !SpanFits(sp(4, 2, 4), 4) || SpanFits(sp(4, 2, 4), 0) {
		t.Error("SpanFits")
	}
}
