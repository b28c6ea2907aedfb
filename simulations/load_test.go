package simulations

import (
	"context"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

// TestLoadSpread checks the figures on a synthetic mesh of two blocks:
// block 0 held by peers 0-3, block 1 by peers 3-5 (peer 3 holds both),
// peer 6 holding nothing.
func TestLoadSpread(t *testing.T) {
	peers := []peerLoad{
		{id: 0, util: 0.10, ran: true, start: 0, end: 1},
		{id: 1, util: 0.20, ran: true, start: 0, end: 1},
		{id: 2, util: 0.50, ran: true, start: 0, end: 1},
		{id: 3, util: 0.30, ran: true, start: 0, end: 2},
		{id: 4, util: 0, start: 1, end: 2},
		{id: 5, util: 0, start: 1, end: 2},
		{id: 6},
	}
	// Block 0's holders: 0.1 0.2 0.3 0.5, median (nearest rank) 0.2.
	// Block 1's: 0 0 0.3, median 0. Peer 2: 0.5/0.2 = 2.5 (above 2);
	// peer 3: 0.3 / mean(0.2, 0) = 3 (the worst); peers 0, 1: 0.5 and 1.
	got := loadSpread(peers, 2)
	want := LoadSpread{Peers: 7, Serving: 4, ServingShare: 4.0 / 7, Holders: 6, P50: 0.1, P99: 0.5, Max: 0.5,
		ServingP50: 0.2, ServingP99: 0.5,
		WorstRatio: 3, WorstPeer: 3, OverTwice: 2}
	if math.Abs(got.WorstRatio-want.WorstRatio) < 1e-12 {
		got.WorstRatio = want.WorstRatio
	}
	if got != want {
		t.Errorf("loadSpread:\n got %+v\nwant %+v", got, want)
	}

	// A peer computing where most replicas are idle has no finite ratio.
	idle := []peerLoad{{id: 0, util: 0.4, ran: true, start: 0, end: 1}, {id: 1, start: 0, end: 1}, {id: 2, start: 0, end: 1}}
	got = loadSpread(idle, 1)
	if got.WorstPeer != -1 || got.OverTwice != 1 || got.Unbounded != 1 || got.Serving != 1 {
		t.Errorf("loadSpread on idle replicas: %+v", got)
	}
	if got := loadSpread(nil, 3); got.Holders != 0 || got.WorstPeer != -1 || got.ServingShare != 0 {
		t.Errorf("loadSpread(nil): %+v", got)
	}
}

// TestCapacity checks the bottleneck capacity of a two-node explicit
// chain against the formula: a1 holds blocks 0-2 at 350 µs, 2 slots;
// a2 blocks 3-5 at 500 µs, 1 slot; one-token single passes (W = 1). So
// blocks 0-2 can run 2 / (3 × 350 µs) = 1905 req/s, blocks 3-5 1 / (3 ×
// 500 µs) = 667 req/s, the bottleneck. Offered 1000 req/s, the mesh runs
// about 667.
func TestCapacity(t *testing.T) {
	sc, err := ParseScenario([]byte(`
duration_s: 5
model: {blocks: 6, block_mb: 9, activation_kb: 6}
network:
  nodes:
    - {name: requester, requester: true}
    - {name: a1, start: 0, end: 3, block_us: 350, slots: 2, queue: -1}
    - {name: a2, start: 3, end: 6, block_us: 500, slots: 1, queue: -1}
  latency_ms:
    - [0, 1, 1]
    - [1, 0, 1]
    - [1, 1, 0]
workload: {rate: 1000, arrivals: uniform, generate: 0, prompt: {dist: const, mean: 1}}
`), "capacity")
	if err != nil {
		t.Fatal(err)
	}
	r, err := Run(context.Background(), sc, RunOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c := r.Summary.Capacity
	if c.Block != 3 || math.Abs(c.RPS-2000.0/3) > 1e-6 {
		t.Errorf("capacity %+v, want 666.67 req/s at block 3", c)
	}
	// The spans do not overlap: no partial span helps.
	if math.Abs(c.FlowRPS-2000.0/3) > 1e-3 || math.Abs(c.FlowShare-c.Share) > 1e-5 {
		t.Errorf("flow capacity %+v, want 666.67 req/s", c)
	}
	// The queue at a2 grows without bound: it computes all the time.
	if c.Share < 0.95 || c.Share > 1.0001 {
		t.Errorf("throughput share %v of capacity, want 0.8..1 at saturation (throughput %v)", c.Share, r.Summary.Throughput)
	}
	// a2 computed nearly all the time; a1, running every request (1000
	// req/s of 1.05 ms: a2 queues without bound) on 2 slots, 52.5 % (the
	// p50, by the nearest rank of two).
	l := r.Summary.Load
	if l.Holders != 2 || l.Max < 0.95 || math.Abs(l.P50-0.525) > 0.01 || l.Serving != 2 || l.Peers != 3 {
		t.Errorf("load %+v", l)
	}
	if h := Headline(r); !strings.Contains(h, "load: 2 of 3 peers served (66.67 %)") || !strings.Contains(h, "of the bottleneck capacity, 667 req/s (block 3)") {
		t.Errorf("Headline:\n%s", h)
	}
	if md := string(reportMarkdown(r, nil)); !strings.Contains(md, "## Load spread") || !strings.Contains(md, "| Bottleneck capacity (block 3) | 667 req/s |") {
		t.Errorf("report.md lacks the load section:\n%s", md)
	}
}

// TestFlowCapacity: overlapping spans share the blocks they both hold. A
// on [0, 2) and B on [1, 3), 10 block passes/s each: block 0 only A can
// run, block 2 only B, and what each has left goes to block 1, so X <=
// 20 - 2X, X = 20/3 requests/s, where each running its whole span gives
// 5. A block nobody holds: 0. Many spans: never above the least block's
// holders' total, never below the whole-span estimate.
func TestFlowCapacity(t *testing.T) {
	if got := flowCapacity(map[[2]int]float64{{0, 2}: 10, {1, 3}: 10}, 3); math.Abs(got-20.0/3) > 1e-4 {
		t.Errorf("two overlapping spans: %v, want 6.667", got)
	}
	if got := flowCapacity(map[[2]int]float64{{0, 2}: 10, {1, 3}: 10}, 4); got != 0 {
		t.Errorf("block 3 unheld: %v, want 0", got)
	}
	if got := flowCapacity(map[[2]int]float64{{0, 4}: 8}, 4); math.Abs(got-2) > 1e-5 {
		t.Errorf("one span: %v, want 2", got)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		blocks := 2 + rng.IntN(30)
		supply := map[[2]int]float64{}
		for range 1 + rng.IntN(40) {
			s := rng.IntN(blocks)
			e := s + 1 + rng.IntN(blocks-s)
			supply[[2]int{s, e}] += 1 + 100*rng.Float64()
		}
		hi, whole := math.Inf(1), math.Inf(1)
		for b := range blocks {
			all, per := 0.0, 0.0
			for sp, v := range supply {
				if sp[0] <= b && b < sp[1] {
					all += v
					per += v / float64(sp[1]-sp[0])
				}
			}
			hi, whole = min(hi, all), min(whole, per)
		}
		got := flowCapacity(supply, blocks)
		if got > hi*(1+1e-6) || got < whole*(1-1e-6) {
			t.Errorf("%d blocks, %v: flow %v outside [%v, %v]", blocks, supply, got, whole, hi)
		}
		// The largest: feasible, and a little more is not (0 when, and
		// only when, some block has no holder).
		if got == 0 {
			if hi != 0 {
				t.Errorf("%d blocks, %v: flow 0, every block held", blocks, supply)
			}
			continue
		}
		if !flowFeasible(supply, blocks, got*(1-1e-9)) || flowFeasible(supply, blocks, got*(1+1e-6)) {
			t.Errorf("%d blocks, %v: flow %v is not the largest feasible", blocks, supply, got)
		}
	}
}

// flowFeasible reports whether every block can get x passes/s from the
// spans' supplies (a max flow, as flowCapacity's).
func flowFeasible(supply map[[2]int]float64, blocks int, x float64) bool {
	g := newFlowGraph(len(supply) + blocks + 2)
	sink, i := len(supply)+blocks+1, 0
	for sp, v := range supply {
		i++
		g.add(0, i, v)
		for b := sp[0]; b < sp[1]; b++ {
			g.add(i, len(supply)+1+b, math.Inf(1))
		}
	}
	for b := range blocks {
		g.add(len(supply)+1+b, sink, x)
	}
	return g.maxFlow(0, sink) >= x*float64(blocks)*(1-1e-9)
}
