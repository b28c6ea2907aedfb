package simulations

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/mesh"
)

// small is a geography scenario that runs in well under a second: a few
// dozen peers of two classes, sessions and single passes, churn.
const small = `
name: small
seed: 7
duration_s: 240
sample_s: 10
peers: 40
model: {blocks: 16, block_mb: 500, activation_kb: 8}
regions:
  - {name: eu, lat: 50, lon: 8, weight: 2}
  - {name: us, lat: 39, lon: -77, weight: 1}
classes:
  - {name: gpu, share: 1, block_ms: 1, memory_gb: 4, last_mile_ms: 2, jitter_ms: 0.5, slots: 4}
  - {name: cpu, share: 1, block_ms: 8, prefill_factor: 0.5, memory_gb: 2, last_mile_ms: 5, jitter_ms: 1, slots: 1}
workload:
  rate: 6
  generate: 0.6
  prompt: {dist: lognormal, mean: 60, sigma: 0.5, max: 400}
  output: {dist: uniform, min: 4, max: 24}
  entries: 8
churn: {leave_per_hour: 0.5, crash_fraction: 0.5, replace: true, rejoin_s: 20}
`

func parse(t testing.TB, y string) *Scenario {
	t.Helper()
	sc, err := ParseScenario([]byte(y), "test")
	if err != nil {
		t.Fatal(err)
	}
	return sc
}

func run(t testing.TB, sc *Scenario) *Result {
	t.Helper()
	r, err := Run(context.Background(), sc, RunOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// encode writes the whole Result, the fields JSON leaves out included.
func encode(t testing.TB, r *Result) []byte {
	t.Helper()
	b, err := json.Marshal(struct {
		R         *Result
		Series    []Sample
		Peers     []PeerStat
		Latencies Latencies
	}{r, r.Series, r.Peers, r.Latencies})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSameSeedSameResult(t *testing.T) {
	sc := parse(t, small)
	a, b := encode(t, run(t, sc)), encode(t, run(t, sc))
	if !bytes.Equal(a, b) {
		t.Fatal("two runs with one seed differ")
	}
	r := run(t, sc)
	if r.Summary.Completed == 0 || len(r.Series) != 24 || len(r.Peers) < 40 || len(r.Latencies.E2E) != r.Summary.Completed {
		t.Fatalf("thin result: %+v, %d samples, %d peers", r.Summary, len(r.Series), len(r.Peers))
	}
	if len(r.Latencies.TTFT) == 0 || len(r.Latencies.PerToken) == 0 || r.Summary.TokensPerSec == 0 || r.Summary.Events == 0 {
		t.Fatalf("no generation figures: %+v", r.Summary)
	}
	other := sc.Clone()
	other.Seed++
	if bytes.Equal(a, encode(t, run(t, other))) {
		t.Fatal("a different seed gave the same result")
	}
}

// TestWorkloadIndependentOfChurn: churn draws from its own stream, so
// without any failure the requests arrive the same.
func TestWorkloadIndependentOfChurn(t *testing.T) {
	sc := parse(t, small)
	a := run(t, sc)
	sc.Churn.LeavePerHour = 0.01
	b := run(t, sc)
	if a.Summary.Requests != b.Summary.Requests {
		t.Fatalf("arrivals changed with churn: %d vs %d", a.Summary.Requests, b.Summary.Requests)
	}
}

// explicit is a four-node explicit topology: requester r, and two ways to
// serve a 4-block model: f (all blocks, fast, far) or n1+n2 (near, two
// hops).
const explicit = `
name: explicit
seed: 1
duration_s: 20
model: {blocks: 4, block_mb: 100, activation_kb: 4}
network:
  nodes:
    - {name: r, requester: true}
    - {name: f, start: 0, end: 4, block_us: 200}
    - {name: n1, start: 0, end: 2, block_us: 1000}
    - {name: n2, start: 2, end: 4, block_us: 1000}
  latency_ms:
    - [0, 20, 1, 1]
    - [20, 0, 20, 20]
    - [1, 20, 0, 1]
    - [1, 20, 1, 0]
workload: {rate: 5, arrivals: uniform, prompt: {dist: const, mean: 1}}
`

func passes(r *Result) map[string]int64 {
	m := map[string]int64{}
	for _, p := range r.Peers {
		m[p.Region] = p.Passes
	}
	return m
}

// TestRoutesAreMeshRoutes: the simulator's routes are mesh.PlanRoute's on
// the same candidates, and a change PlanRoute honours (the network, seen
// through the coordinates) changes where the simulated work goes.
func TestRoutesAreMeshRoutes(t *testing.T) {
	sc := parse(t, explicit)
	s, err := newSim(context.Background(), sc)
	if err != nil {
		t.Fatal(err)
	}
	en := s.entries[0]
	// The same draws (mesh.RouteRequest.Rand) give the same route.
	draws := func() *rand.Rand { return rand.New(rand.NewPCG(7, 7)) }
	s.rRoute = draws()
	hops, err := s.route(en, 0, 4)
	if err != nil {
		t.Fatal(err)
	}
	v := s.currentView()
	want, err := mesh.PlanRoute(v.cands, mesh.RouteRequest{Blocks: 4, From: *en.ep.coord, HaveFrom: true, Self: en.id, Tokens: 1, Rand: draws()})
	if err != nil {
		t.Fatal(err)
	}
	if len(hops) != len(want.Hops) {
		t.Fatalf("sim route %v, PlanRoute %v", hops, want.Hops)
	}
	for i, h := range want.Hops {
		if s.peers[hops[i].peer].id != h.Peer || int(hops[i].start) != h.Start || int(hops[i].end) != h.End {
			t.Fatalf("sim route %v, PlanRoute %v", hops, want.Hops)
		}
	}
	// Near and slow wins here (2 ms of compute against 40 ms of network).
	near := passes(run(t, sc))
	if near["f"] != 0 || near["n1"] == 0 || near["n2"] == 0 {
		t.Fatalf("passes %v: want n1 and n2 only", near)
	}
	// Make f near too: now its one fast hop wins.
	sc.Network.LatencyMS[0][1], sc.Network.LatencyMS[1][0] = 1, 1
	for _, j := range []int{2, 3} {
		sc.Network.LatencyMS[1][j], sc.Network.LatencyMS[j][1] = 1, 1
	}
	far := passes(run(t, sc))
	if far["f"] == 0 || far["n1"] != 0 {
		t.Fatalf("passes %v: want f only", far)
	}
	// With coordinates this wrong, routing no longer sees which is near.
	misled := false
	for seed := int64(1); seed <= 4 && !misled; seed++ {
		sc := parse(t, explicit)
		sc.Seed, sc.Network.CoordErrorMS = seed, 40
		misled = passes(run(t, sc))["f"] != 0
	}
	if !misled {
		t.Fatal("coordinate error never misled routing to the far node")
	}

	// Geography mode, over a view larger than mesh.MaxRouteCandidates: the
	// route is mesh.PlanRouteTiered's over the whole view.
	big := parse(t, small)
	big.Peers, big.Churn.LeavePerHour = 1500, 0
	s, err = newSim(context.Background(), big)
	if err != nil {
		t.Fatal(err)
	}
	v = s.currentView()
	if len(v.cands) <= mesh.MaxRouteCandidates {
		t.Fatalf("view of %d", len(v.cands))
	}
	for _, en := range s.entries {
		s.rRoute = draws()
		hops, err := s.route(en, 0, 16)
		if err != nil {
			t.Fatal(err)
		}
		want, err := mesh.PlanRouteTiered(v.cands, mesh.RouteRequest{Blocks: 16, From: *en.ep.coord, HaveFrom: true, Tokens: 1, Rand: draws()}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		var got []peer.ID
		for _, h := range hops {
			got = append(got, s.peers[h.peer].id)
		}
		var exp []peer.ID
		for _, h := range want.Hops {
			exp = append(exp, h.Peer)
		}
		if !slices.Equal(got, exp) {
			t.Errorf("entry %v: pooled route %v, over the whole view %v", en.region, got, exp)
		}
		// Banning the route's peers (as failures do) routes around them,
		// still as over the whole view.
		banned := map[peer.ID]bool{}
		en.bans, en.banCount, en.distrust = map[int32]int64{}, map[int32]int{}, map[int32]int{}
		for _, h := range hops {
			en.bans[h.peer] = s.now + 1e9
			banned[s.peers[h.peer].id] = true
		}
		s.rRoute = draws()
		hops, err = s.route(en, 0, 16)
		if err != nil {
			t.Fatal(err)
		}
		want, err = mesh.PlanRouteTiered(v.cands, mesh.RouteRequest{Blocks: 16, From: *en.ep.coord, HaveFrom: true, Tokens: 1, Rand: draws()}, nil, banned)
		if err != nil {
			t.Fatal(err)
		}
		got, exp = got[:0], exp[:0]
		for _, h := range hops {
			got = append(got, s.peers[h.peer].id)
			if banned[s.peers[h.peer].id] {
				t.Errorf("entry %v: banned %s routed", en.region, s.peers[h.peer].id)
			}
		}
		for _, h := range want.Hops {
			exp = append(exp, h.Peer)
		}
		if !slices.Equal(got, exp) {
			t.Errorf("entry %v with bans: pooled route %v, over the whole view %v", en.region, got, exp)
		}
	}
}

// TestPlacementIsMeshPlace: each initial peer serves the span mesh.Place
// gives it on the real candidates of the peers before it.
func TestPlacementIsMeshPlace(t *testing.T) {
	sc := parse(t, small)
	sc.Peers = 120
	s, err := newSim(context.Background(), sc)
	if err != nil {
		t.Fatal(err)
	}
	var cands []mesh.RouteCandidate
	for _, p := range s.peers {
		pl, err := mesh.Place(cands, mesh.PlaceRequest{Blocks: 16, Span: p.capacity, MyMicros: p.micros, Self: p.id,
			Replicas: 2, Spread: mesh.DefaultPlaceSpread})
		if err != nil {
			t.Fatal(err)
		}
		if pl.Start != p.start || pl.End != p.end {
			t.Fatalf("peer %s serves [%d, %d), mesh.Place says [%d, %d)", p.id, p.start, p.end, pl.Start, pl.End)
		}
		cands = append(cands, mesh.RouteCandidate{Peer: p.id, Start: p.start, End: p.end, BlockMicros: p.micros[p.start:p.end]})
	}
	// The other placements differ from it.
	for _, how := range []string{"random", "even"} {
		c := sc.Clone()
		c.Placement = how
		s2, err := newSim(context.Background(), c)
		if err != nil {
			t.Fatal(err)
		}
		same := 0
		for i, p := range s2.peers {
			if p.start == s.peers[i].start {
				same++
			}
		}
		if same == len(s.peers) {
			t.Errorf("placement %s chose the node's spans", how)
		}
	}
}

// TestChurnFailoverAndRecovery: peers leaving mid-request cause failovers
// and session replays; coverage drops when they leave and comes back as
// replacements place themselves where blocks are missing.
func TestChurnFailoverAndRecovery(t *testing.T) {
	sc := parse(t, small)
	sc.Peers = 10
	sc.DurationS, sc.SampleS = 1200, 10
	sc.Workload.Rate = 3
	sc.Workload.Generate = 1
	sc.Churn = Churn{LeavePerHour: 4, CrashFraction: 0.5, Replace: true, RejoinS: 30}
	r := run(t, sc)
	s := r.Summary
	if s.Leaves == 0 || s.Joins == 0 || s.Failovers == 0 || s.Replays == 0 {
		t.Fatalf("no churn effects: %+v", s)
	}
	if s.Busy+s.Stalls+s.Unreachable+s.Refused != s.Failovers || s.Stalls+s.Unreachable == 0 {
		t.Fatalf("failovers by cause: %+v", s)
	}
	done := 0
	for _, rs := range r.Regions {
		done += rs.Completed
	}
	if len(r.Regions) != 2 || done != s.Completed {
		t.Fatalf("regions %+v", r.Regions)
	}
	low := slices.IndexFunc(r.Series, func(x Sample) bool { return x.Coverage < 1 })
	if low < 0 || s.MinCoverage >= 1 {
		t.Fatalf("coverage never dropped (min %v)", s.MinCoverage)
	}
	if !slices.ContainsFunc(r.Series[low:], func(x Sample) bool { return x.Coverage == 1 }) {
		t.Fatal("coverage never recovered")
	}
	failed := 0
	for _, p := range r.Peers {
		failed += p.Failed
	}
	if failed == 0 {
		t.Fatal("no peer left with requests on it")
	}
	if s.CompletionRate < 0.5 {
		t.Fatalf("completion rate %v", s.CompletionRate)
	}
}

// TestRebalancingRecoversCoverage: without replacements, the peers left
// move (mesh.Rebalance) to the blocks the leavers uncovered.
func TestRebalancingRecoversCoverage(t *testing.T) {
	sc := parse(t, small)
	sc.Peers = 24
	sc.DurationS, sc.SampleS, sc.RebalanceS = 1800, 10, 60
	sc.Churn = Churn{LeavePerHour: 0.8, CrashFraction: 0}
	r := run(t, sc)
	if r.Summary.Moves == 0 || r.Summary.Joins != 0 || r.Summary.Leaves == 0 {
		t.Fatalf("summary %+v", r.Summary)
	}
	low := slices.IndexFunc(r.Series, func(x Sample) bool { return x.Coverage < 1 })
	if low < 0 {
		t.Skip("coverage never dropped with this seed")
	}
	if !slices.ContainsFunc(r.Series[low:], func(x Sample) bool { return x.Coverage == 1 }) {
		t.Fatalf("coverage never recovered: %v", r.Series)
	}
	// Without rebalancing it does not.
	sc.RebalanceS = -1
	r = run(t, sc)
	if r.Summary.Moves != 0 {
		t.Fatalf("moves without rebalancing: %d", r.Summary.Moves)
	}
}

// TestJoinIsMeshPlace: a replacement peer serves what mesh.Place gives it
// on the real candidates of its view.
func TestJoinIsMeshPlace(t *testing.T) {
	sc := parse(t, small)
	sc.Peers = 60
	s, err := newSim(context.Background(), sc)
	if err != nil {
		t.Fatal(err)
	}
	// Load some peers, so that the view's loads matter, then refresh.
	for i, p := range s.peers[:20] {
		p.rec.load.InFlight = i % 7
	}
	for i := range 5 {
		s.now = int64(i+1) * s.refresh
		v := s.currentView()
		s.join(s.peers[i])
		p := s.peers[len(s.peers)-1]
		pl, err := mesh.Place(v.cands, mesh.PlaceRequest{Blocks: 16, Span: p.capacity, MyMicros: p.micros, Self: p.id,
			Replicas: 2, Spread: mesh.DefaultPlaceSpread})
		if err != nil {
			t.Fatal(err)
		}
		if pl.Start != p.start || pl.End != p.end {
			t.Fatalf("joined on [%d, %d), mesh.Place says [%d, %d)", p.start, p.end, pl.Start, pl.End)
		}
	}
}

// TestSessionsBound: a node with room for two sessions answers the third
// busy. A requester loop fails over to the other node; a decode ring sends
// the step again to the same node after a pause (Session.ring's resume),
// and fails over only after mesh's three busy answers in a row. Unbounded,
// nothing does either.
func TestSessionsBound(t *testing.T) {
	const topo = `
name: sessions
duration_s: 60
model: {blocks: 2, block_mb: 100, activation_kb: 4}
network:
  nodes:
    - {name: r, requester: true}
    - {name: small, start: 0, end: 2, block_us: 100, sessions: 2}
    - {name: far, start: 0, end: 2, block_us: 100}
  latency_ms: [[0, 1, 30], [1, 0, 30], [30, 30, 0]]
workload: {rate: 4, generate: 1, prompt: {dist: const, mean: 10}, output: {dist: const, mean: 40}, decode: requester}
`
	r := run(t, parse(t, topo))
	p := passes(r)
	if r.Summary.Failovers == 0 || r.Summary.Resumes != 0 || p["far"] == 0 || p["small"] == 0 || r.Summary.Failed != 0 {
		t.Fatalf("bounded: %+v, passes %v", r.Summary, p)
	}
	ring := strings.Replace(topo, "decode: requester", "decode: ring", 1)
	r = run(t, parse(t, ring))
	if p := passes(r); r.Summary.Resumes == 0 || p["small"] == 0 || r.Summary.Failed != 0 {
		t.Fatalf("bounded ring: %+v, passes %v", r.Summary, p)
	}
	for _, tp := range []string{topo, ring} {
		sc := parse(t, strings.Replace(tp, "sessions: 2", "sessions: -1", 1))
		r = run(t, sc)
		if p := passes(r); r.Summary.Failovers != 0 || r.Summary.Resumes != 0 || p["far"] != 0 {
			t.Fatalf("unbounded: %+v, passes %v", r.Summary, p)
		}
	}
}

// TestDiurnal: a region's rate follows its local time.
func TestDiurnal(t *testing.T) {
	sc := parse(t, small)
	sc.Churn.LeavePerHour = 0
	sc.DurationS, sc.Workload.Rate, sc.Workload.Diurnal, sc.Workload.PeakHour = 600, 20, 1, 12
	arrivals := func(start float64) int {
		c := sc.Clone()
		c.Workload.StartHour = start
		return run(t, c).Summary.Requests
	}
	// At noon UTC it is noon in eu (offset 0 here: factor 2) and 7:00 in
	// us (1.26); at midnight, midnight (0) and 19:00 (1.26).
	sc.Regions[1].UTCOffset = -5
	noon, midnight := arrivals(12), arrivals(0)
	if noon < 15000 || midnight > 6000 {
		t.Fatalf("arrivals at noon %d, at midnight %d (flat: 12000)", noon, midnight)
	}
}

func TestScenarioErrors(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"unknown field", small + "bogus: 1\n", "field bogus not found"},
		{"unknown nested field", strings.Replace(small, "rate: 6", "rate: 6\n  rte: 3", 1), "field rte not found"},
		{"bad rate", strings.Replace(small, "rate: 6", "rate: -1", 1), "workload.rate"},
		{"bad type", strings.Replace(small, "rate: 6", "rate: fast", 1), "cannot unmarshal"},
		{"bad placement", small + "placement: greedy\n", "placement: must be node, random or even"},
		{"bad class", strings.Replace(small, "block_ms: 8", "block_ms: 0", 1), "classes.1.block_ms"},
		{"unknown region", strings.Replace(small, "{name: gpu, share: 1,", "{name: gpu, share: 1, regions: [mars],", 1), `classes.0.regions: unknown region "mars"`},
		{"bad dist", strings.Replace(small, "dist: uniform", "dist: zipf", 1), "workload.output.dist"},
		{"empty", "", "test: empty"},
		{"too few entries", strings.Replace(small, "entries: 8", "entries: 1", 1), "workload.entries: 1 entry nodes for 2 regions"},
		{"matrix", strings.Replace(explicit, "[1, 20, 1, 0]", "[1, 20, 1]", 1), "network.latency_ms.3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseScenario([]byte(tc.yaml), "test")
			if err == nil || !errors.Is(err, ErrBadScenario) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one with %q", err, tc.want)
			}
		})
	}
}

func TestSet(t *testing.T) {
	sc := parse(t, small)
	for path, val := range map[string]string{
		"workload.rate":         "12.5",
		"churn.leave_per_hour":  "0.2",
		"classes.1.share":       "3",
		"peers":                 "77",
		"placement":             "even",
		"regions.0.peer_weight": "0.5",
		"workload.output.mean":  "9",
	} {
		if err := sc.Set(path, val); err != nil {
			t.Fatalf("Set(%s, %s): %v", path, val, err)
		}
	}
	if sc.Workload.Rate != 12.5 || sc.Churn.LeavePerHour != 0.2 || sc.Classes[1].Share != 3 || sc.Peers != 77 ||
		sc.Placement != "even" || *sc.Regions[0].PeerWeight != 0.5 || sc.Workload.Output.Mean != 9 {
		t.Fatalf("not set: %+v", sc)
	}
	before := encodeScenario(t, sc)
	for _, tc := range [][3]string{
		{"workload.rte", "1", "field rte not found"},
		{"workload.rate", "-3", "workload.rate"},
		{"classes.9.share", "1", "not an index"},
		{"placement", "greedy", "placement"},
	} {
		if err := sc.Set(tc[0], tc[1]); err == nil || !strings.Contains(err.Error(), tc[2]) {
			t.Errorf("Set(%s, %s) = %v, want %q", tc[0], tc[1], err, tc[2])
		}
	}
	if !bytes.Equal(before, encodeScenario(t, sc)) {
		t.Fatal("a failed Set changed the scenario")
	}
}

func encodeScenario(t *testing.T, sc *Scenario) []byte {
	b, err := json.Marshal(sc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBuiltinScenarios: every scenario under scenarios/ loads, its arms
// and sweep values apply, and it runs (shortened to 30 s, with at most 50
// requests a second and 16 entry nodes, and a fiftieth of the peers past
// 2000).
func TestBuiltinScenarios(t *testing.T) {
	files, err := filepath.Glob("scenarios/*.yaml")
	if err != nil || len(files) < 5 {
		t.Fatalf("scenarios: %v %v", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			sc, err := LoadScenario(f)
			if err != nil {
				t.Fatal(err)
			}
			if sc.Description == "" {
				t.Error("no description")
			}
			var variants []*Scenario
			for _, a := range sc.Arms {
				c, err := sc.Arm(a.Name)
				if err != nil {
					t.Fatal(err)
				}
				variants = append(variants, c)
			}
			if sc.Sweep != nil {
				for _, v := range sc.Sweep.Values {
					c := sc.Clone()
					if err := c.Set(sc.Sweep.Param, v); err != nil {
						t.Fatal(err)
					}
					variants = append(variants, c)
				}
			}
			if len(variants) == 0 {
				variants = append(variants, sc)
			}
			for _, c := range variants {
				c.DurationS, c.SampleS = min(c.DurationS, 30), 0
				if c.Peers > 2000 {
					c.Peers /= 50
				}
				c.Workload.Rate = min(c.Workload.Rate, 50)
				c.Workload.Entries = min(c.Workload.Entries, 16)
				c.Workload.MaxRequests = 0
				if err := c.check(); err != nil {
					t.Fatal(err)
				}
				var last float64
				r, err := Run(context.Background(), c, RunOptions{Progress: func(done, total float64) { last = done }})
				if err != nil {
					t.Fatal(err)
				}
				if r.Summary.Completed == 0 || last != c.DurationS {
					t.Fatalf("%s: %+v, progress ended at %v", c.Name, r.Summary, last)
				}
			}
		})
	}
}

func TestRunCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	sc := parse(t, small)
	sc.DurationS = 3600
	if _, err := Run(ctx, sc, RunOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
}

// one is a requester and one server of all four blocks, 1 ms apart.
const one = `
name: one
seed: 3
duration_s: 10
model: {blocks: 4, block_mb: 100, activation_kb: 4}
network:
  hop_overhead_us: 0
  nodes:
    - {name: r, requester: true}
    - {name: s, start: 0, end: 4, block_us: [100, 200, 300, 400]}
  latency_ms:
    - [0, 1]
    - [1, 0]
workload: {rate: 5, arrivals: uniform, prompt: {dist: const, mean: 1}, max_requests: 20}
`

// TestHopOverhead: network.hop_overhead_us adds to each of a request's
// messages between two nodes (here r -> s and s -> r), per-block block_us
// lists sum as their scalar mean does, and a node's jitter_ms spreads the
// latencies.
func TestHopOverhead(t *testing.T) {
	if sc := parse(t, small); *sc.Network.HopOverheadUS != 300 {
		t.Fatalf("default hop_overhead_us %v, want 300", *sc.Network.HopOverheadUS)
	}
	// 2 ms of links, 1 ms of compute, 4 KB twice at 1000 Mbps (32 µs each).
	base := run(t, parse(t, one))
	const want = 2e-3 + 1e-3 + 2*32e-6
	if p50 := base.Summary.E2E.P50; p50 < want-1e-9 || p50 > want+1e-9 || base.Summary.E2E.P95 != p50 {
		t.Fatalf("without overhead: p50 %v p95 %v, want %v", p50, base.Summary.E2E.P95, want)
	}
	sc := parse(t, one)
	if err := sc.Set("network.hop_overhead_us", "500"); err != nil {
		t.Fatal(err)
	}
	if p50 := run(t, sc).Summary.E2E.P50; p50 < want+1e-3-1e-9 || p50 > want+1e-3+1e-9 {
		t.Fatalf("with 500 µs per message: p50 %v, want %v", p50, want+1e-3)
	}
	if !slices.ContainsFunc(run(t, sc).Params, func(p string) bool { return p == "network: hop overhead 500 µs per message" }) {
		t.Fatalf("params %v name no hop overhead", run(t, sc).Params)
	}
	// A scalar block_us is the same figure for every block.
	scalar := parse(t, strings.Replace(one, "[100, 200, 300, 400]", "250", 1))
	if got := run(t, scalar).Summary.E2E.P50; got != base.Summary.E2E.P50 {
		t.Fatalf("block_us 250: p50 %v, the list's %v", got, base.Summary.E2E.P50)
	}
	if err := scalar.Set("network.nodes.1.block_us", "[100, 200, 300, 400]"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(scalar.Network.Nodes[1].BlockUS, Micros{100, 200, 300, 400}) {
		t.Fatalf("block_us set to %v", scalar.Network.Nodes[1].BlockUS)
	}
	if c := scalar.Clone(); !slices.Equal(c.Network.Nodes[1].BlockUS, scalar.Network.Nodes[1].BlockUS) ||
		!slices.Equal(parse(t, strings.Replace(one, "[100, 200, 300, 400]", "250", 1)).Clone().Network.Nodes[1].BlockUS, Micros{250}) {
		t.Fatal("block_us does not survive a clone")
	}
	// Jitter: p95 above p50, and the same seed gives the same result.
	jit := strings.Replace(one, "block_us:", "jitter_ms: 0.5, block_us:", 1)
	a, b := run(t, parse(t, jit)), run(t, parse(t, jit))
	if !(a.Summary.E2E.P95 > a.Summary.E2E.P50) || !(a.Summary.E2E.P50 > want) {
		t.Fatalf("with jitter: p50 %v p95 %v", a.Summary.E2E.P50, a.Summary.E2E.P95)
	}
	if !bytes.Equal(encode(t, a), encode(t, b)) {
		t.Fatal("same seed, different results with jitter")
	}
	for _, tc := range [][2]string{
		{strings.Replace(one, "[100, 200, 300, 400]", "[100, 200]", 1), "network.nodes.1.block_us: must be one number or a list of 4"},
		{strings.Replace(one, "[100, 200, 300, 400]", "[100, 200, 0, 400]", 1), "network.nodes.1.block_us: must be > 0"},
		{strings.Replace(one, "block_us:", "jitter_ms: -1, block_us:", 1), "jitter_ms >= 0"},
		{strings.Replace(one, "hop_overhead_us: 0", "hop_overhead_us: -5", 1), "network.hop_overhead_us: must be >= 0"},
	} {
		if _, err := ParseScenario([]byte(tc[0]), "test"); err == nil || !errors.Is(err, ErrBadScenario) || !strings.Contains(err.Error(), tc[1]) {
			t.Errorf("error %v, want one with %q", err, tc[1])
		}
	}
}

// gateway: users in Tokyo, four whole-model GPUs in us-east, every node
// within a metre of its region's centre (a few ns of propagation), no
// jitter, one request a second: every request takes the same time (to
// within a µs: the metres between nodes).
const gateway = `
name: gw
seed: 3
duration_s: 40
peers: 4
model: {blocks: 8, block_mb: 500, activation_kb: 8}
regions:
  - {name: far, lat: 35.7, lon: 139.7, weight: 1, peer_weight: 0, radius_km: 0.001}
  - {name: dc, lat: 39, lon: -77.5, weight: 0, peer_weight: 1, radius_km: 0.001}
classes:
  - {name: gpu, share: 1, block_ms: 1, memory_gb: 40, last_mile_ms: 0.5, slots: 8}
workload:
  rate: 1
  arrivals: uniform
  generate: 1
  prompt: {dist: const, mean: 100}
  output: {dist: const, mean: 20}
  entries: 2
  entry_last_mile_ms: 10
  gateway: dc
`

// TestGateway: through a gateway, a far user's TTFT and e2e are a local
// user's (an entry node where the gateway is, with its access) plus the
// two one-way legs between the user and the gateway (the prompt's bytes
// in, one token's out), and its per-token time is the local user's, not
// the far user's round trips.
func TestGateway(t *testing.T) {
	far := parse(t, gateway)
	if far.Workload.GatewayLastMileMS != 0.2 || far.Workload.GatewayBandwidthMbps != 10000 {
		t.Fatalf("gateway defaults %v ms, %v Mbps", far.Workload.GatewayLastMileMS, far.Workload.GatewayBandwidthMbps)
	}
	local := parse(t, strings.NewReplacer("weight: 1, peer_weight: 0", "weight: 0, peer_weight: 0",
		"weight: 0, peer_weight: 1", "weight: 1, peer_weight: 1", "entry_last_mile_ms: 10", "entry_last_mile_ms: 0.2\n  entry_bandwidth_mbps: 10000",
		"gateway: dc", "").Replace(gateway))
	client := parse(t, strings.Replace(gateway, "gateway: dc", "", 1))
	n := network{factor: 1.8, overhead: 300_000}
	user := newEndpoint(35.7, 139.7, 10, 0, 100)
	gw := newEndpoint(39, -77.5, 0.2, 0, 10000)
	legs := float64(n.oneWay(&user, &gw, 8000*100)+n.oneWay(&gw, &user, 8000)) / 1e9
	// ~10,900 km at 200 km/ms × 1.8 is ~98 ms each way
	if legs < 0.19 || legs > 0.3 {
		t.Fatalf("legs %v s", legs)
	}
	for _, gen := range []string{"1", "0"} {
		for _, sc := range []*Scenario{far, local, client} {
			if err := sc.Set("workload.generate", gen); err != nil {
				t.Fatal(err)
			}
		}
		a, b, c := run(t, far), run(t, local), run(t, client)
		if a.Summary.Completed < 30 || a.Summary.Completed != b.Summary.Completed || a.Summary.E2E.P95-a.Summary.E2E.P50 > 1e-6 {
			t.Fatalf("generate %s: completed %d / %d, e2e p50 %v p95 %v", gen, a.Summary.Completed, b.Summary.Completed,
				a.Summary.E2E.P50, a.Summary.E2E.P95)
		}
		if d := a.Summary.E2E.P50 - b.Summary.E2E.P50; d < legs-1e-6 || d > legs+1e-6 {
			t.Fatalf("generate %s: e2e %v through the gateway, %v local: +%v, want +%v", gen, a.Summary.E2E.P50, b.Summary.E2E.P50, d, legs)
		}
		if gen == "0" {
			continue
		}
		if d := a.Summary.TTFT.P50 - b.Summary.TTFT.P50; d < legs-1e-6 || d > legs+1e-6 {
			t.Fatalf("TTFT %v through the gateway, %v local: +%v, want +%v", a.Summary.TTFT.P50, b.Summary.TTFT.P50, d, legs)
		}
		if pa, pb := a.Summary.PerToken.P50, b.Summary.PerToken.P50; math.Abs(pa-pb) > 1e-6 || pa > 0.012 {
			t.Fatalf("per-token %v through the gateway, %v local", pa, pb)
		}
		// Decoding from the far user's own node as a ring: the ring is
		// the GPUs', the far user only receives, so the per-token time is
		// the gateway's. Driving each step from there instead pays the
		// ocean every token.
		if pc := c.Summary.PerToken.P50; math.Abs(pc-a.Summary.PerToken.P50) > 1e-6 {
			t.Fatalf("per-token %v decoding at the far user (ring), %v through the gateway", pc, a.Summary.PerToken.P50)
		}
		loop := client.Clone()
		if err := loop.Set("workload.decode", "requester"); err != nil {
			t.Fatal(err)
		}
		if pc := run(t, loop).Summary.PerToken.P50; pc < a.Summary.PerToken.P50+0.19 {
			t.Fatalf("per-token %v decoding at the far user (requester loop), %v through the gateway", pc, a.Summary.PerToken.P50)
		}
		if len(a.Regions) != 1 || a.Regions[0].Region != "far" || a.Regions[0].TTFT.P50 != a.Summary.TTFT.P50 {
			t.Fatalf("regions %+v", a.Regions)
		}
	}
	// A gateway in the users' own region ("local"): as a far user's own
	// node with the gateway's access, plus the legs to it.
	regional := parse(t, strings.Replace(gateway, "gateway: dc", "gateway: local", 1))
	near := parse(t, strings.Replace(strings.Replace(gateway, "gateway: dc", "", 1), "entry_last_mile_ms: 10", "entry_last_mile_ms: 0.2\n  entry_bandwidth_mbps: 10000", 1))
	gwNear := newEndpoint(35.7, 139.7, 0.2, 0, 10000)
	legs = float64(n.oneWay(&user, &gwNear, 8000*100)+n.oneWay(&gwNear, &user, 8000)) / 1e9
	a, b := run(t, regional).Summary, run(t, near).Summary
	if d := a.E2E.P50 - b.E2E.P50; d < legs-1e-6 || d > legs+1e-6 || math.Abs(a.PerToken.P50-b.PerToken.P50) > 1e-6 {
		t.Fatalf("local gateway: e2e %v vs %v (+%v, want +%v), per-token %v vs %v", a.E2E.P50, b.E2E.P50, d, legs, a.PerToken.P50, b.PerToken.P50)
	}
	if !bytes.Equal(encode(t, run(t, far)), encode(t, run(t, far.Clone()))) {
		t.Fatal("same seed, different results through a gateway")
	}
	if err := client.Set("workload.gateway", "far"); err != nil || client.Workload.Gateway != "far" || client.Clone().Workload.Gateway != "far" {
		t.Fatalf("Set gateway: %v, %q", err, client.Workload.Gateway)
	}
	if err := client.Set("workload.gateway", "mars"); err == nil || !strings.Contains(err.Error(), `workload.gateway: no region "mars" (a region's name, or local)`) {
		t.Fatalf("Set gateway mars: %v", err)
	}
	if _, err := ParseScenario([]byte(strings.Replace(explicit, "workload: {", "workload: {gateway: r, ", 1)), "test"); err == nil || !strings.Contains(err.Error(), "workload.gateway: needs the geography") {
		t.Fatalf("explicit with a gateway: %v", err)
	}
}

// Session lengths: with any shape, the starting mesh is taken part-way
// through its sessions (a renewal process in its steady state), so peers
// leave at the set rate from the start. Over the first hour, with no
// replacements, the leaves must match the steady state's expectation,
// peers * (1/mean) * integral over [0, 1 h] of the survival function, and
// not what drawing whole sessions at time 0 would give (for lognormal
// sessions of sigma 1.5, many more: most sessions are short).
func TestChurnSessionShapes(t *testing.T) {
	const peers, leavePerHour = 3000, 0.5
	mean := 3600 / leavePerHour // seconds
	for _, c := range []struct {
		session  string
		survival func(u float64) float64
	}{
		{"{dist: exp}", func(u float64) float64 { return math.Exp(-u / mean) }},
		{"{dist: lognormal, sigma: 1.5}", func(u float64) float64 {
			mu := math.Log(mean) - 1.5*1.5/2
			return 0.5 * math.Erfc((math.Log(u)-mu)/(1.5*math.Sqrt2))
		}},
		{"{dist: const}", func(u float64) float64 { return 1 }},
	} {
		sc := parse(t, strings.Replace(strings.Replace(small, "peers: 40", fmt.Sprintf("peers: %d", peers), 1),
			"churn: {leave_per_hour: 0.5, crash_fraction: 0.5, replace: true, rejoin_s: 20}",
			"churn: {leave_per_hour: 0.5, session: "+c.session+"}", 1))
		sc.DurationS, sc.SampleS, sc.Workload.Rate = 3600, 600, 0.05
		r := run(t, sc)
		integral := 0.0
		const steps = 3600
		for i := range steps {
			integral += c.survival((float64(i)+0.5)*3600/steps) * 3600 / steps
		}
		want := peers * integral / mean
		got := float64(r.Summary.Leaves)
		t.Logf("sessions %s: %d leaves in the first hour, steady state expects %.0f", c.session, r.Summary.Leaves, want)
		if math.Abs(got-want) > 0.06*want {
			t.Errorf("sessions %s: %d leaves in the first hour, want %.0f ± 6%%", c.session, r.Summary.Leaves, want)
		}
	}
	if _, err := ParseScenario([]byte(strings.Replace(small, "rejoin_s: 20}", "rejoin_s: 20, session: {dist: exp, mean: 3}}", 1)), "x"); err == nil ||
		!strings.Contains(err.Error(), "churn.session") {
		t.Errorf("a session with its own mean: %v", err)
	}
	if _, err := ParseScenario([]byte(strings.Replace(small, "rejoin_s: 20}", "rejoin_s: 20, session: {dist: pareto}}", 1)), "x"); err == nil ||
		!strings.Contains(err.Error(), "churn.session.dist") {
		t.Errorf("a pareto session: %v", err)
	}
}
