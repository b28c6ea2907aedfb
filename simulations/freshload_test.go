package simulations

import (
	"context"
	"testing"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
)

// TestFreshLoad: a hop's answer tells its requester its load, which
// routing then assumes as mesh.FreshLoad blends it into the record's
// (full at once, half after mesh.LoadHalfLife), so that routes leave a
// busy hop before its record says it is busy; without routing.fresh_load
// they do not. Two equal servers of the whole model: a, busy (8 passes
// running, 4 queued) but with an idle record, and b.
func TestFreshLoad(t *testing.T) {
	const topo = `
name: fresh
duration_s: 60
model: {blocks: 4, block_mb: 100, activation_kb: 4}
network:
  nodes:
    - {name: r, requester: true}
    - {name: a, start: 0, end: 4, block_us: 100}
    - {name: b, start: 0, end: 4, block_us: 100}
  latency_ms: [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
workload: {rate: 1, generate: 0}
`
	for _, fresh := range []bool{true, false} {
		sc := parse(t, topo)
		sc.Routing.FreshLoad = &fresh
		s, err := newSim(context.Background(), sc)
		if err != nil {
			t.Fatal(err)
		}
		s.now = s.refresh // a view with both records, idle
		a, en := s.peers[1], s.entries[0]
		for i := range a.slots {
			a.slots[i] = s.now + 1e9
		}
		a.waiting = []int64{s.now + 1e9, s.now + 1e9, s.now + 1e9, s.now + 1e9}
		s.observe(en, 1, a)
		onA := func() int {
			n := 0
			for range 200 {
				hops, err := s.route(en, 0, 4)
				if err != nil {
					t.Fatal(err)
				}
				if hops[0].peer == 1 {
					n++
				}
			}
			return n
		}
		if !fresh {
			if n := onA(); n < 50 {
				t.Errorf("without fresh loads %d of 200 routes took a, want about half", n)
			}
			continue
		}
		if n := onA(); n != 0 {
			t.Errorf("a answered busy (8 running, 4 queued): %d of 200 routes took it", n)
		}
		s.now += int64(mesh.LoadHalfLife)
		want := mesh.FreshLoad(protocol.Load{}, protocol.HopLoad{InFlight: 8, Queued: 4}, mesh.LoadHalfLife)
		if got := s.freshLoads(en, s.currentView()); len(got) != 1 || got[0].peer != 1 || got[0].load != want || want.InFlight != 4 {
			t.Errorf("after a half-life: %+v, want a at %+v", got, want)
		}
		s.now += loadForget
		if got := s.freshLoads(en, s.currentView()); len(got) != 0 || len(en.seen) != 0 {
			t.Errorf("past loadForget: %+v (seen %v), want the record's", got, en.seen)
		}
		if n := onA(); n < 50 {
			t.Errorf("the answer forgotten, %d of 200 routes took a, want about half", n)
		}
	}
}
