package mesh

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

func TestPlanRouteTieredLetsPreferencesBackIn(t *testing.T) {
	ids := routeIDs(t, 3)
	a, b, c := ids[0], ids[1], ids[2]
	cands := []RouteCandidate{
		server(a, 0, 4, 100, at(1, 0)),
		server(b, 0, 4, 100, at(2, 0)),
		server(c, 4, 8, 100, at(3, 0)), // the only server of 4-7
	}
	req := origin(8)
	hopsOf := func(r Route) []peer.ID {
		var out []peer.ID
		for _, h := range r.Hops {
			out = append(out, h.Peer)
		}
		return out
	}
	for _, tc := range []struct {
		name          string
		avoid, banned map[peer.ID]bool
		want          []peer.ID
	}{
		{"none", nil, nil, []peer.ID{a, c}},
		{"avoid a", map[peer.ID]bool{a: true}, nil, []peer.ID{b, c}},
		{"ban a", nil, map[peer.ID]bool{a: true}, []peer.ID{b, c}},
		// c is avoided and banned: without it block 4-7 is uncovered, so
		// the second tier (banned only) fails too and the last lets it in.
		{"avoid and ban the only server", map[peer.ID]bool{c: true}, map[peer.ID]bool{c: true, a: true}, []peer.ID{a, c}},
		// avoided alone: the banned-only tier routes, keeping a banned.
		{"avoid c, ban a", map[peer.ID]bool{c: true}, map[peer.ID]bool{a: true}, []peer.ID{b, c}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := PlanRouteTiered(cands, req, tc.avoid, tc.banned)
			if err != nil {
				t.Fatal(err)
			}
			if got := hopsOf(r); !slices.Equal(got, tc.want) {
				t.Fatalf("route %v, want %v", got, tc.want)
			}
		})
	}
	if _, err := PlanRouteTiered(cands[:2], req, nil, nil); !errors.Is(err, ErrNoRoute) {
		t.Fatalf("uncoverable: %v, want ErrNoRoute", err)
	}
}

func TestSelectCandidates(t *testing.T) {
	ids := routeIDs(t, 400)
	rng := rand.New(rand.NewPCG(7, 7))
	cands := randomMesh(rng, ids, 40)
	req := RouteRequest{Blocks: 40, From: randomCoord(rng), HaveFrom: true, Tokens: 1}

	// Every block keeps exactly min(perBlock, servers) candidates, and
	// they are the cheapest first hops of that block.
	sel := SelectCandidates(cands, req, 5)
	if len(sel) >= len(cands) || len(sel) < 5 {
		t.Fatalf("selected %d of %d", len(sel), len(cands))
	}
	score := func(c RouteCandidate, b int) float64 {
		e := routeEdge(req.From.Vec, req.From.Height, 0, nil, 0, 0)
		if c.Coord != nil {
			e = routeEdge(req.From.Vec, req.From.Height, 0, c.Coord.Vec, c.Coord.Height, c.Coord.Adjustment)
		}
		return e + c.BlockMicros[b-c.Start]*(1+float64(c.Load.InFlight+c.Load.Queued)/RouteLoadSlots)
	}
	for b := range 40 {
		var all, kept []float64
		for _, c := range cands {
			if c.Start <= b && b < c.End {
				all = append(all, score(c, b))
			}
		}
		for _, c := range sel {
			if c.Start <= b && b < c.End {
				kept = append(kept, score(c, b))
			}
		}
		slices.Sort(all)
		slices.Sort(kept)
		// The selected set holds the five best (others, kept for their
		// other blocks, may come along).
		if len(kept) < min(5, len(all)) || !slices.Equal(kept[:min(5, len(all))], all[:min(5, len(all))]) {
			t.Fatalf("block %d: kept %v, best %v", b, kept, all[:min(5, len(all))])
		}
	}

	// Excluded peers are never kept; a large perBlock keeps all.
	ex := map[peer.ID]bool{cands[0].Peer: true}
	req.Exclude = ex
	if slices.ContainsFunc(SelectCandidates(cands, req, 1000), func(c RouteCandidate) bool { return ex[c.Peer] }) {
		t.Fatal("an excluded peer was selected")
	}
	req.Exclude = nil
	if got := SelectCandidates(cands, req, 1000); len(got) != len(cands) {
		t.Fatalf("perBlock 1000 kept %d of %d", len(got), len(cands))
	}

	// On these meshes (five regions, 80 servers a block) the best route
	// over RoutePerBlock per block costs at most 5% more than the best
	// over all (measured: 0-4%): the selection ranks peers as first hops,
	// from the requester, and a later hop's best peer may be farther from
	// the requester than from the hop before it.
	for seed := range uint64(10) {
		rng := rand.New(rand.NewPCG(seed, 1))
		cands := randomMesh(rng, ids, 100)
		req := RouteRequest{Blocks: 100, From: randomCoord(rng), HaveFrom: true, Tokens: 1}
		full, err := PlanRoute(cands, req)
		if err != nil {
			t.Fatal(err)
		}
		cut, err := PlanRoute(SelectCandidates(cands, req, RoutePerBlock), req)
		if err != nil {
			t.Fatal(err)
		}
		if cut.Cost > full.Cost+full.Cost/20 {
			t.Errorf("seed %d: selected route costs %v, full %v", seed, cut.Cost, full.Cost)
		}
	}
}

func TestSelectCandidatesAround(t *testing.T) {
	ids := routeIDs(t, 300)
	for seed := range uint64(5) {
		rng := rand.New(rand.NewPCG(seed, 9))
		cands := randomMesh(rng, ids, 40)
		centre := randomCoord(rng)
		req := RouteRequest{Blocks: 40, From: centre, HaveFrom: true, Tokens: 1}
		radius := 3 * time.Millisecond
		around := SelectCandidatesAround(cands, req, 8, radius)
		if len(around) >= len(cands) {
			t.Fatalf("seed %d: kept all %d", seed, len(cands))
		}
		in := map[peer.ID]bool{}
		for _, c := range around {
			in[c.Peer] = true
		}
		// Any requester within the radius selects a subset of it.
		for range 20 {
			from := protocol.Coordinate{Vec: slices.Clone(centre.Vec), Height: centre.Height}
			dir, norm := make([]float64, len(from.Vec)), 0.0
			for i := range dir {
				dir[i] = rng.NormFloat64()
				norm += dir[i] * dir[i]
			}
			r := radius.Seconds() * rng.Float64()
			for i := range dir {
				from.Vec[i] += dir[i] / math.Sqrt(norm) * r
			}
			near := req
			near.From = from
			for _, c := range SelectCandidates(cands, near, 8) {
				if !in[c.Peer] {
					t.Fatalf("seed %d: %s selected from %v away but not around the centre", seed, c.Peer, r)
				}
			}
		}
	}
}

func TestBanDuration(t *testing.T) {
	for _, tc := range []struct {
		kind  FailureKind
		count int
		want  time.Duration
	}{
		{FailBusy, 1, time.Second},
		{FailBusy, 2, 2 * time.Second},
		{FailStall, 1, 5 * time.Second},
		{FailRefused, 3, 20 * time.Second},
		{FailHard, 1, 30 * time.Second},
		{FailHard, 5, 8 * time.Minute},
		{FailHard, 6, MaxBan},
		{FailBusy, 100, 256 * time.Second},
		{FailStall, 0, 5 * time.Second},
	} {
		if got := BanDuration(tc.kind, tc.count); got != tc.want {
			t.Errorf("BanDuration(%d, %d) = %v, want %v", tc.kind, tc.count, got, tc.want)
		}
	}
}

func TestClassifyFailure(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want FailureKind
	}{
		{&protocol.RemoteError{Code: protocol.CodeBusy}, FailBusy},
		{fmt.Errorf("%w (30s)", ErrStall), FailStall},
		{&protocol.RemoteError{Code: protocol.CodeUnknownSession}, FailRefused},
		{&protocol.RemoteError{Code: protocol.CodeUnreachable}, FailHard},
		{&protocol.RemoteError{Code: protocol.CodeBadOutput}, FailHard},
		{errors.New("dial failed"), FailHard},
	} {
		if got := ClassifyFailure(tc.err); got != tc.want {
			t.Errorf("ClassifyFailure(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
	if !Distrusts(FailHard) || Distrusts(FailBusy) || Distrusts(FailStall) {
		t.Error("only hard failures distrust")
	}
}

func TestReplayAndResume(t *testing.T) {
	complete := func(whole ...int) func(int) bool {
		return func(h int) bool { return slices.Contains(whole, h) }
	}
	if got := ReplayFrom(3, complete(0, 1, 2, 3)); got != 3 {
		t.Errorf("whole history: from %d, want 3", got)
	}
	if got := ReplayFrom(3, complete(0, 1)); got != 1 {
		t.Errorf("hops 2-3 incomplete: from %d, want 1", got)
	}
	if got := ReplayFrom(2, complete()); got != 0 {
		t.Errorf("nothing complete: from %d, want 0", got)
	}
	if got := ResumeFrom(2, complete(0)); got != 0 {
		t.Errorf("resume: %d, want 0", got)
	}
	if got := ResumeFrom(2, complete(0, 2)); got != 2 {
		t.Errorf("resume: %d, want 2", got)
	}
	if got := RetryPause(0); got != RetryBase {
		t.Errorf("RetryPause(0) = %v", got)
	}
	if got := RetryPause(9); got != 16*RetryBase {
		t.Errorf("RetryPause(9) = %v", got)
	}
}

func TestRebalanceIgnoresLoads(t *testing.T) {
	// Block 0-3 served fast, 4-7 by a slow peer: a node on 0-3 should move.
	cands := []RouteCandidate{
		placeCand("a", 0, 4, 100),
		placeCand("b", 4, 8, 1000),
	}
	req := PlaceRequest{Blocks: 8, Span: 4, MyMicros: []float64{100}, Self: "me"}
	p, move := Rebalance(cands, req, [2]int{0, 4})
	if !move || p.Start != 4 {
		t.Fatalf("Rebalance = %+v, %v; want a move to 4", p, move)
	}
	// Heavy loads on b would change nothing: loads are zeroed.
	busy := slices.Clone(cands)
	busy[0].Load = protocol.Load{InFlight: 100}
	p2, move2 := Rebalance(busy, req, [2]int{0, 4})
	if move2 != move || p2.Start != p.Start {
		t.Fatalf("with loads: %+v %v", p2, move2)
	}
	if busy[0].Load.InFlight != 100 {
		t.Fatal("Rebalance modified its input")
	}
	// Staying reports the current span.
	p3, move3 := Rebalance(cands, req, [2]int{4, 8})
	if move3 || p3.Start != 4 || p3.End != 8 {
		t.Fatalf("stay: %+v %v", p3, move3)
	}
}

func TestAggregateCandidatesPlacesAlike(t *testing.T) {
	ids := routeIDs(t, 60)
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 3))
		cands := randomMesh(rng, ids, 48)
		blocks := 48
		if seed%2 == 1 { // a hole
			for i := range cands {
				if cands[i].Start <= 20 && 20 < cands[i].End {
					cands[i].BlockMicros = nil // unusable
				}
			}
		}
		tot := BlockTotals{Tput: make([]float64, blocks), Count: make([]int, blocks)}
		var usable []RouteCandidate
		for _, c := range cands {
			if !usableCandidate(&c) {
				continue
			}
			usable = append(usable, c)
			f := 1 + float64(c.Load.InFlight+c.Load.Queued)/RouteLoadSlots
			for b := c.Start; b < c.End; b++ {
				tot.Tput[b] += 1e6 / max(c.BlockMicros[b-c.Start], 1) / f
				tot.Count[b]++
			}
		}
		req := PlaceRequest{Blocks: blocks, Span: 6 + int(seed), MyMicros: []float64{250}}
		want, err := Place(usable, req)
		if err != nil {
			t.Fatal(err)
		}
		agg, scale := AggregateCandidates(tot)
		if scale != 1 {
			t.Fatalf("scale %v for small totals", scale)
		}
		got, err := Place(agg, req)
		if err != nil {
			t.Fatal(err)
		}
		if got.Start != want.Start || !placeNear(got.Bottleneck, want.Bottleneck) {
			t.Errorf("seed %d: aggregate places %d (%v), candidates %d (%v)", seed, got.Start, got.Bottleneck, want.Start, want.Bottleneck)
		}
	}
	// Totals beyond what one candidate can carry (Place clamps block
	// times under 1 µs) are scaled, MyMicros with them, and Place chooses
	// alike.
	tot := BlockTotals{Tput: []float64{3e6, 2e6, 4e6, 3e6}, Count: []int{9, 9, 9, 9}}
	agg, scale := AggregateCandidates(tot)
	if scale != 8 {
		t.Fatalf("scale %v, want 8", scale)
	}
	for _, c := range agg {
		if c.BlockMicros[0] < 2 {
			t.Fatalf("block time %v under 2 µs", c.BlockMicros[0])
		}
	}
	p, err := Place(agg, PlaceRequest{Blocks: 4, Span: 1, MyMicros: []float64{0.5 * scale}})
	if err != nil || p.Start != 1 || !placeNear(p.Bottleneck*scale, 3e6) {
		t.Fatalf("scaled Place: %+v %v, want block 1 and bottleneck 3e6", p, err)
	}
}

// AggregateCopies keeps what Place and ShouldMove weigh of copies (the
// counts capped at Replicas): on sparse meshes, where some blocks have one
// holder or none, a node counting copies places, and a serving node
// rebalances, alike on the aggregate and on the candidates, with
// Spread's tie-break (a hash of Self) too; AggregateCandidates, one
// synthetic copy per block, would not.
func TestAggregateCopiesPlacesAlike(t *testing.T) {
	ids := routeIDs(t, 12)
	blocks := 48
	differs := 0
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 5))
		cands := randomMesh(rng, ids[:3+int(seed%8)], blocks)
		self := ids[len(ids)-1]
		tot := BlockTotals{Tput: make([]float64, blocks), Count: make([]int, blocks)}
		speeds := BlockTotals{Tput: make([]float64, blocks), Count: make([]int, blocks)}
		for _, c := range cands {
			f := 1 + float64(c.Load.InFlight+c.Load.Queued)/RouteLoadSlots
			for b := c.Start; b < c.End; b++ {
				tot.Tput[b] += 1e6 / max(c.BlockMicros[b-c.Start], 1) / f
				tot.Count[b]++
				speeds.Tput[b] += 1e6 / max(c.BlockMicros[b-c.Start], 1)
				speeds.Count[b]++
			}
		}
		req := PlaceRequest{Blocks: blocks, Span: 6 + int(seed%10), MyMicros: []float64{250}, Self: self,
			Replicas: 2 + int(seed%2), Spread: DefaultPlaceSpread}
		want, err := Place(cands, req)
		if err != nil {
			t.Fatal(err)
		}
		agg, scale := AggregateCopies(tot, req.Replicas)
		got, err := Place(agg, req)
		if err != nil {
			t.Fatal(err)
		}
		if scale != 1 || got.Start != want.Start || !placeNear(got.Bottleneck, want.Bottleneck) {
			t.Errorf("seed %d: aggregate places %d (%v, scale %v), candidates %d (%v)", seed, got.Start, got.Bottleneck, scale,
				want.Start, want.Bottleneck)
		}
		one, _ := AggregateCandidates(tot)
		if p, _ := Place(one, req); p.Start != want.Start {
			differs++
		}
		cur := [2]int{rng.IntN(blocks - req.Span + 1), 0}
		cur[1] = cur[0] + req.Span
		wp, wm := Rebalance(cands, req, cur)
		aggS, _ := AggregateCopies(speeds, req.Replicas)
		gp, gm := Rebalance(aggS, req, cur)
		if wm != gm || wp.Start != gp.Start {
			t.Errorf("seed %d: from %v the aggregate rebalances to %d (move %v), the candidates to %d (move %v)", seed, cur,
				gp.Start, gm, wp.Start, wm)
		}
	}
	if differs == 0 {
		t.Error("one synthetic copy per block placed as the candidates in every case: the test shows nothing")
	}
	// Copies capped at replicas, each an equal share of the block's total.
	agg, _ := AggregateCopies(BlockTotals{Tput: []float64{300, 0, 100}, Count: []int{3, 0, 1}}, 2)
	var got []string
	for _, c := range agg {
		got = append(got, fmt.Sprintf("%s %d %.0f", string(c.Peer), c.Start, c.BlockMicros[0]))
	}
	if want := []string{"~agg/0 0 6667", "~agg/0/1 0 6667", "~agg/2 2 10000"}; !slices.Equal(got, want) {
		t.Errorf("AggregateCopies = %q, want %q", got, want)
	}
}

// Distrusted peers (this node failed to reach them since their last
// record) are routing's last resort: used only when the trusted ones leave
// a block uncovered, and only once their ban has lapsed.
func TestPlanRouteTrustingLastResort(t *testing.T) {
	ids := routeIDs(t, 3)
	a, b, c := ids[0], ids[1], ids[2]
	trusted := []RouteCandidate{server(a, 0, 4, 100, at(1, 0))}
	req := origin(8)
	if _, err := PlanRouteTrusting(trusted, nil, req, nil, nil); !errors.Is(err, ErrNoRoute) {
		t.Fatalf("trusted peers alone cover blocks 0-3 of 8: %v, want no route", err)
	}
	doubted := []RouteCandidate{server(b, 4, 8, 100, at(2, 0)), server(c, 0, 8, 100, at(3, 0))}
	// b is banned: only c, whose ban lapsed, may serve blocks 4-7.
	r, err := PlanRouteTrusting(trusted, doubted, req, nil, map[peer.ID]bool{b: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range r.Hops {
		if h.Peer == b {
			t.Fatalf("route %+v uses the banned distrusted peer", r.Hops)
		}
	}
	if last := r.Hops[len(r.Hops)-1]; last.Peer != c || last.End != 8 {
		t.Fatalf("route %+v: blocks 4-7 not on c", r.Hops)
	}
	// Every distrusted server of blocks 4-7 banned: no route (the requester
	// waits and asks again).
	if _, err := PlanRouteTrusting(trusted, doubted, req, nil, map[peer.ID]bool{b: true, c: true}); !errors.Is(err, ErrNoRoute) {
		t.Fatalf("with the distrusted peers banned: %v, want no route", err)
	}
	// Trusted peers that cover everything: the distrusted are not used,
	// even where they would be cheaper.
	trusted = append(trusted, server(b, 4, 8, 100, at(9, 0)))
	r, err = PlanRouteTrusting(trusted, []RouteCandidate{server(c, 0, 8, 1, at(0.1, 0))}, req, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range r.Hops {
		if h.Peer == c {
			t.Fatalf("route %+v uses the distrusted peer although the trusted ones cover", r.Hops)
		}
	}
}
