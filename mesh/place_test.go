package mesh

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// placeCand is a candidate serving [start, end) at micros µs per block.
func placeCand(id string, start, end int, micros float64) RouteCandidate {
	bm := make([]float64, end-start)
	for i := range bm {
		bm[i] = micros
	}
	return RouteCandidate{Peer: peer.ID(id), Start: start, End: end, BlockMicros: bm}
}

// placeTotals is the mesh's throughput per block, as place.go models it.
func placeTotals(cands []RouteCandidate, blocks int) []float64 {
	t := make([]float64, blocks)
	for _, c := range cands {
		f := 1 + float64(c.Load.InFlight+c.Load.Queued)/RouteLoadSlots
		for b := c.Start; b < c.End && b < blocks; b++ {
			t[b] += 1e6 / c.BlockMicros[b-c.Start] / f
		}
	}
	return t
}

func mustPlace(t *testing.T, cands []RouteCandidate, req PlaceRequest) Placement {
	t.Helper()
	p, err := Place(cands, req)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(p.Reason)
	return p
}

func placeNear(a, b float64) bool { return math.Abs(a-b) <= 1e-9*max(math.Abs(a), math.Abs(b)) }

func TestPlaceFillsUnserved(t *testing.T) {
	cands := []RouteCandidate{
		placeCand("a", 0, 4, 1000),
		placeCand("b", 0, 4, 1000),
		placeCand("c", 4, 7, 1000),
	}
	p := mustPlace(t, cands, PlaceRequest{Blocks: 10, Span: 3})
	if p.Start != 7 || p.End != 10 {
		t.Fatalf("placed on [%d, %d), want the unserved [7, 10)", p.Start, p.End)
	}
	if p.Before != 0 || !placeNear(p.Bottleneck, 1000) { // median timing: 1000 µs
		t.Fatalf("bottleneck %v -> %v, want 0 -> 1000", p.Before, p.Bottleneck)
	}

	// A span larger than the hole covers all of it.
	p = mustPlace(t, cands, PlaceRequest{Blocks: 10, Span: 5, MyMicros: []float64{500}})
	if p.Start > 7 || p.End < 10 || !placeNear(p.Bottleneck, 1000) {
		t.Fatalf("placed on [%d, %d), bottleneck %v: want the hole [7, 10) covered", p.Start, p.End, p.Bottleneck)
	}

	// Holes on both sides: the span covers the larger.
	cands = []RouteCandidate{placeCand("a", 2, 5, 1000)}
	p = mustPlace(t, cands, PlaceRequest{Blocks: 10, Span: 4})
	if p.Start != 5 || p.End != 9 {
		t.Fatalf("placed on [%d, %d), want [5, 9)", p.Start, p.End)
	}
}

func TestPlaceLeastServed(t *testing.T) {
	cands := []RouteCandidate{
		placeCand("a", 0, 10, 1000),
		placeCand("b", 0, 5, 1000),
		placeCand("c", 0, 5, 1000),
	}
	p := mustPlace(t, cands, PlaceRequest{Blocks: 10, Span: 5})
	if p.Start != 5 || p.End != 10 || !placeNear(p.Before, 1000) || !placeNear(p.Bottleneck, 2000) {
		t.Fatalf("got %+v, want [5, 10), bottleneck 1000 -> 2000", p)
	}
	// A smaller span cannot raise the bottleneck (blocks 5-9 are all at
	// 1000): it still goes to the least-served blocks, the lowest first.
	p = mustPlace(t, cands, PlaceRequest{Blocks: 10, Span: 2})
	if p.Start != 5 || p.End != 7 || !placeNear(p.Bottleneck, 1000) {
		t.Fatalf("got %+v, want [5, 7), bottleneck 1000", p)
	}
}

func TestPlaceHeterogeneous(t *testing.T) {
	// Totals: 0-3 10000, 4-5 11000, 6-7 2000, 8-11 1000 passes/s.
	cands := []RouteCandidate{
		placeCand("fast", 0, 6, 100),
		placeCand("slow", 6, 12, 1000),
		placeCand("slow2", 4, 8, 1000),
	}
	req := PlaceRequest{Blocks: 12, Span: 4, MyMicros: slices.Repeat([]float64{500}, 12)}
	p := mustPlace(t, cands, req)
	if p.Start != 8 || p.End != 12 {
		t.Fatalf("placed on [%d, %d), want the slowest blocks [8, 12)", p.Start, p.End)
	}
	if !placeNear(p.Before, 1000) || !placeNear(p.Bottleneck, 2000) || p.Bottleneck <= p.Before {
		t.Fatalf("bottleneck %v -> %v, want 1000 -> 2000", p.Before, p.Bottleneck)
	}

	// Load counts: with slow at a load of 8 (a third of its speed), slow2
	// at 4 (half) and d on 8-11, blocks 6-7 (333+500) are the weakest, so
	// a 2-block span goes there.
	cands[1].Load = protocol.Load{InFlight: 4, Queued: 4}
	cands[2].Load = protocol.Load{InFlight: 4}
	cands = append(cands, placeCand("d", 8, 12, 1000))
	p = mustPlace(t, cands, PlaceRequest{Blocks: 12, Span: 2, MyMicros: []float64{500}})
	if p.Start != 6 || p.End != 8 {
		t.Fatalf("placed on [%d, %d), want the loaded blocks [6, 8)", p.Start, p.End)
	}

	// Per-block speeds: the node's own timings decide between equally
	// served blocks.
	cands = []RouteCandidate{placeCand("a", 0, 8, 1000)}
	my := []float64{1000, 1000, 1000, 1000, 1000, 250, 250, 1000}
	p = mustPlace(t, cands, PlaceRequest{Blocks: 8, Span: 2, MyMicros: my})
	if p.Start != 5 || p.End != 7 {
		t.Fatalf("placed on [%d, %d), want its fast blocks [5, 7)", p.Start, p.End)
	}
}

func TestPlaceAllAndBad(t *testing.T) {
	cands := []RouteCandidate{placeCand("a", 0, 10, 1000)}
	for _, span := range []int{24, 30} {
		p := mustPlace(t, cands, PlaceRequest{Blocks: 24, Span: span, MyMicros: []float64{1000}})
		if p.Start != 0 || p.End != 24 || p.Before != 0 || !placeNear(p.Bottleneck, 1000) {
			t.Fatalf("span %d: got %+v, want all 24 blocks at 1000", span, p)
		}
	}
	// Nobody serves anything: the first node takes the first blocks.
	p := mustPlace(t, nil, PlaceRequest{Blocks: 24, Span: 6})
	if p.Start != 0 || p.End != 6 {
		t.Fatalf("empty mesh: got %+v", p)
	}
	for _, req := range []PlaceRequest{
		{Blocks: 0, Span: 1},
		{Blocks: -1, Span: 1},
		{Blocks: 10, Span: 0},
		{Blocks: 10, Span: -3},
		{Blocks: 10, Span: 2, MyMicros: []float64{1, 2}},
		{Blocks: 2, Span: 2, MyMicros: []float64{1, -2}},
		{Blocks: 2, Span: 2, MyMicros: []float64{1, math.NaN()}},
		{Blocks: 2, Span: 2, MyMicros: []float64{0}},
		{Blocks: 2, Span: 2, MyMicros: []float64{math.Inf(1)}},
	} {
		if _, err := Place(cands, req); !errors.Is(err, ErrBadPlaceRequest) {
			t.Errorf("%+v: err %v, want ErrBadPlaceRequest", req, err)
		}
		if _, move := ShouldMove(cands, req, [2]int{0, 1}, 1.2); move {
			t.Errorf("%+v: ShouldMove says move", req)
		}
	}
	// Malformed candidates and blocks past the model are ignored; Self is
	// left out.
	cands = []RouteCandidate{
		{Peer: "bad", Start: 0, End: 4, BlockMicros: []float64{1}},
		{Peer: "nan", Start: 0, End: 1, BlockMicros: []float64{math.NaN()}},
		placeCand("me", 0, 4, 1),
		placeCand("big", 2, 40, 1000),
	}
	p = mustPlace(t, cands, PlaceRequest{Blocks: 6, Span: 2, Self: "me", MyMicros: []float64{1000}})
	if p.Start != 0 || p.End != 2 || p.Before != 0 || !placeNear(p.Bottleneck, 1000) {
		t.Fatalf("got %+v, want [0, 2), bottleneck 0 -> 1000", p)
	}
}

func TestPlaceDeterministic(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	var cands []RouteCandidate
	for i := range 20 {
		span := 3 + rng.IntN(8)
		start := rng.IntN(40 - span + 1)
		c := placeCand(fmt.Sprintf("p%02d", i), start, start+span, 0)
		for b := range c.BlockMicros {
			c.BlockMicros[b] = []float64{300, 700, 1000}[rng.IntN(3)] // ties likely
		}
		c.Load.InFlight = rng.IntN(3)
		cands = append(cands, c)
	}
	req := PlaceRequest{Blocks: 40, Span: 5, Self: "p03"}
	want := mustPlace(t, cands, req)
	for range 50 {
		rng.Shuffle(len(cands), func(i, j int) { cands[i], cands[j] = cands[j], cands[i] })
		if got, _ := Place(cands, req); got != want {
			t.Fatalf("shuffled: %+v, want %+v", got, want)
		}
		cur := [2]int{10, 15}
		p1, m1 := ShouldMove(cands, req, cur, 1.2)
		slices.Reverse(cands)
		p2, m2 := ShouldMove(cands, req, cur, 1.2)
		if p1 != p2 || m1 != m2 {
			t.Fatalf("ShouldMove depends on order: %+v %v, %+v %v", p1, m1, p2, m2)
		}
	}
}

func TestPlaceShouldMove(t *testing.T) {
	others := []RouteCandidate{
		placeCand("a", 0, 12, 1000),
		placeCand("b", 0, 6, 1000),
	}
	me := placeCand("me", 0, 6, 1000)
	req := PlaceRequest{Blocks: 12, Span: 6, Self: "me", MyMicros: []float64{1000}}
	// On [0, 6) the bottleneck is 1000 (blocks 6-11); [6, 12) makes it 2000.
	p, move := ShouldMove(append(others, me), req, [2]int{0, 6}, 1.2)
	t.Log(p.Reason)
	if !move || p.Start != 6 || p.End != 12 || !placeNear(p.Bottleneck, 2000) {
		t.Fatalf("got %+v %v, want a move to [6, 12)", p, move)
	}
	// Already there.
	if p, move = ShouldMove(append(others, me), req, [2]int{6, 12}, 1.2); move {
		t.Fatalf("moves away from the best span: %+v", p)
	}
	// Not serving yet: place.
	if p, move = ShouldMove(others, req, [2]int{0, 0}, 1.2); !move || p.Start != 6 {
		t.Fatalf("not serving: got %+v %v", p, move)
	}

	// The margin: moving from [3, 9) to [6, 12) raises the bottleneck from
	// 1000 (blocks 9-11) to 1100 (c's blocks 0-5 are slower): 10%.
	others = []RouteCandidate{
		placeCand("a", 0, 12, 1000),
		placeCand("c", 0, 6, 10000),
	}
	req.MyMicros = []float64{1000}
	if p, move = ShouldMove(others, req, [2]int{3, 9}, 1.2); move {
		t.Fatalf("margin 1.2: moves for %v -> %v", p.Before, p.Bottleneck)
	}
	t.Log(p.Reason)
	if p, move = ShouldMove(others, req, [2]int{3, 9}, 1.05); !move || p.Start != 6 || !placeNear(p.Bottleneck, 1100) {
		t.Fatalf("margin 1.05: got %+v %v", p, move)
	}

	// Never uncover a block only the current span serves: b serves [2, 5)
	// and this node [0, 2); blocks 5-9 are unserved. [5, 8) would leave
	// fewer blocks unserved (4 instead of 5) but uncover 0-1.
	others = []RouteCandidate{placeCand("b", 2, 5, 1000)}
	req = PlaceRequest{Blocks: 10, Span: 3, MyMicros: []float64{1000}}
	p, move = ShouldMove(others, req, [2]int{0, 2}, 1.2)
	t.Log(p.Reason)
	if move {
		t.Fatalf("moves off the only server of blocks 0-1: %+v", p)
	}
	// With 0-1 served by another, it moves to cover the hole.
	others = append(others, placeCand("c", 0, 2, 1000))
	if p, move = ShouldMove(others, req, [2]int{0, 2}, 1.2); !move || p.Start != 5 {
		t.Fatalf("does not move to the hole: %+v %v", p, move)
	}
}

// placeNode is a node of the rebalancing simulation.
type placeNode struct {
	id         peer.ID
	span       int
	micros     []float64 // per block
	start, end int
}

func (n *placeNode) cand() RouteCandidate {
	return RouteCandidate{Peer: n.id, Start: n.start, End: n.end, BlockMicros: n.micros[n.start:n.end]}
}

func placeCands(nodes []*placeNode) []RouteCandidate {
	var cs []RouteCandidate
	for _, n := range nodes {
		if n.end > n.start {
			cs = append(cs, n.cand())
		}
	}
	return cs
}

// placeBottleneck is the mesh's bottleneck and whether every block is served.
func placeBottleneck(nodes []*placeNode, blocks int) (float64, bool) {
	t := placeTotals(placeCands(nodes), blocks)
	return slices.Min(t), !slices.Contains(t, 0)
}

// placeSim makes nodes join one by one with Place, then runs 100 rounds in
// which every node, in a seeded order, asks ShouldMove (margin 1.2) and
// moves if told. It returns the moves per round, and the bottleneck after
// the initial placement and at the end.
func placeSim(t *testing.T, seed uint64, skew bool) (moves []int, initial, final float64) {
	const blocks = 24
	rng := rand.New(rand.NewPCG(seed, 77))
	nodes := make([]*placeNode, 8+rng.IntN(5))
	speeds := []float64{250, 500, 1000, 2000, 4000}
	for i := range nodes {
		n := &placeNode{id: peer.ID(fmt.Sprintf("n%02d", i)), span: 4 + rng.IntN(7), micros: make([]float64, blocks)}
		base := speeds[rng.IntN(len(speeds))]
		for b := range n.micros {
			n.micros[b] = base * (0.9 + 0.2*rng.Float64())
		}
		nodes[i] = n
	}
	req := func(n *placeNode) PlaceRequest {
		return PlaceRequest{Blocks: blocks, Span: n.span, MyMicros: n.micros, Self: n.id}
	}
	for i, n := range nodes {
		if skew && i > 0 {
			// A bad start: everyone after the first piles onto the
			// first blocks, the first covering the rest alone.
			n.start, n.end = 0, n.span
			continue
		}
		if skew {
			n.span = blocks
		}
		p, err := Place(placeCands(nodes), req(n))
		if err != nil {
			t.Fatal(err)
		}
		n.start, n.end = p.Start, p.End
	}
	initial, ok := placeBottleneck(nodes, blocks)
	if !ok {
		t.Fatalf("seed %d: blocks unserved after the initial placement", seed)
	}
	for round := range 100 {
		moved := 0
		for _, i := range rng.Perm(len(nodes)) {
			n := nodes[i]
			p, move := ShouldMove(placeCands(nodes), req(n), [2]int{n.start, n.end}, 1.2)
			if !move {
				continue
			}
			before, _ := placeBottleneck(nodes, blocks)
			n.start, n.end = p.Start, p.End
			after, ok := placeBottleneck(nodes, blocks)
			if !ok {
				t.Fatalf("seed %d round %d: %s moved and left blocks unserved", seed, round, n.id)
			}
			if after < before {
				t.Fatalf("seed %d round %d: %s moved and the bottleneck fell: %v -> %v", seed, round, n.id, before, after)
			}
			moved++
		}
		moves = append(moves, moved)
	}
	final, _ = placeBottleneck(nodes, blocks)
	return moves, initial, final
}

func TestPlaceNoOscillation(t *testing.T) {
	totalMoves := 0
	for seed := range uint64(20) {
		for _, skew := range []bool{false, true} {
			moves, initial, final := placeSim(t, seed, skew)
			n := 0
			for _, m := range moves {
				n += m
			}
			totalMoves += n
			if late := moves[20:]; slices.Max(late) != 0 {
				t.Errorf("seed %d skew %v: moves in the last 80 rounds: %v", seed, skew, moves)
			}
			if final < initial {
				t.Errorf("seed %d skew %v: bottleneck fell from %v to %v", seed, skew, initial, final)
			}
			if skew && final <= initial {
				t.Errorf("seed %d: rebalancing did not raise the skewed start's bottleneck (%v)", seed, initial)
			}
			t.Logf("seed %d skew %v: bottleneck %.4g -> %.4g, %d moves %v", seed, skew, initial, final, n, moves[:5])
		}
	}
	if totalMoves == 0 {
		t.Fatal("no node ever moved: the simulation tests nothing")
	}
}

// TestPlaceShouldMoveWideBottleneck: the weak blocks (4-11, served by one slow
// peer) are more than one span can lift. A rule on the bottleneck alone
// would move nobody; ShouldMove moves one node to lift half of them, then
// the other lifts the rest and the bottleneck doubles.
func TestPlaceShouldMoveWideBottleneck(t *testing.T) {
	nodes := []RouteCandidate{
		placeCand("slow", 0, 12, 1000),
		placeCand("f1", 0, 4, 100),
		placeCand("f2", 0, 4, 100),
		placeCand("m1", 0, 4, 1000),
		placeCand("m2", 0, 4, 1000),
	}
	for i, want := range []int{4, 8} {
		id := nodes[3+i].Peer
		req := PlaceRequest{Blocks: 12, Span: 4, Self: id, MyMicros: []float64{1000}}
		p, move := ShouldMove(nodes, req, [2]int{0, 4}, 1.2)
		t.Log(p.Reason)
		if !move || p.Start != want {
			t.Fatalf("%s: got %+v %v, want a move to [%d, %d)", id, p, move, want, want+4)
		}
		nodes[3+i] = placeCand(string(id), p.Start, p.End, 1000)
	}
	if b := slices.Min(placeTotals(nodes, 12)); !placeNear(b, 2000) {
		t.Fatalf("bottleneck %v, want 2000", b)
	}
	for _, c := range nodes[3:] {
		req := PlaceRequest{Blocks: 12, Span: 4, Self: c.Peer, MyMicros: []float64{1000}}
		if p, move := ShouldMove(nodes, req, [2]int{c.Start, c.End}, 1.2); move {
			t.Fatalf("%s moves again: %s", c.Peer, p.Reason)
		}
	}
}

// placeCopies is how many candidates serve each block.
func placeCopies(cands []RouteCandidate, blocks int) []int {
	n := make([]int, blocks)
	for _, c := range cands {
		for b := c.Start; b < c.End && b < blocks; b++ {
			n[b]++
		}
	}
	return n
}

// TestPlaceReplicasCoverAll is issue 15's mesh: one operator serves all 8
// blocks, two nodes of 5 blocks join one after the other. Counting copies,
// they must cover all 8 between them, so that the operator can leave;
// whatever their peer IDs and whatever the operator's block timings.
func TestPlaceReplicasCoverAll(t *testing.T) {
	const blocks = 8
	rng := rand.New(rand.NewPCG(15, 2))
	for i := range 50 {
		op := placeCand("op", 0, blocks, 1000)
		if i > 0 {
			for b := range op.BlockMicros {
				op.BlockMicros[b] = 800 + 400*rng.Float64()
			}
		}
		cands := []RouteCandidate{op}
		var spans [][2]int
		for _, self := range []peer.ID{peer.ID(fmt.Sprintf("b%d", i)), peer.ID(fmt.Sprintf("c%d", i))} {
			p, err := Place(cands, PlaceRequest{Blocks: blocks, Span: 5, Self: self, Replicas: 2, Spread: DefaultPlaceSpread})
			if err != nil {
				t.Fatal(err)
			}
			if i == 0 {
				t.Log(p.Reason)
			}
			spans = append(spans, [2]int{p.Start, p.End})
			cands = append(cands, placeCand(string(self), p.Start, p.End, 1000))
		}
		if n := placeCopies(cands[1:], blocks); slices.Contains(n, 0) {
			t.Fatalf("try %d: the joined nodes serve %v: copies %v without the operator", i, spans, n)
		}
	}
}

// TestPlaceSpreadSimultaneous: six nodes see the same mesh at the same
// moment (one node serving all 24 blocks). Each choice is deterministic,
// yet they do not all pick the same span; without Spread they would.
func TestPlaceSpreadSimultaneous(t *testing.T) {
	const blocks = 24
	view := []RouteCandidate{placeCand("op", 0, blocks, 1000)}
	starts := map[int]int{}
	var all []RouteCandidate
	for i := range 6 {
		req := PlaceRequest{Blocks: blocks, Span: 6, Self: peer.ID(fmt.Sprintf("12D3KooWnode%d", i)), Replicas: 2, Spread: DefaultPlaceSpread}
		p := mustPlace(t, view, req)
		if again := mustPlace(t, slices.Clone(view), req); again != p {
			t.Fatalf("not deterministic: %+v then %+v", p, again)
		}
		if p.Start%6 != 0 {
			t.Errorf("%s: [%d, %d), want a span that leaves whole spans to cover", req.Self, p.Start, p.End)
		}
		starts[p.Start]++
		all = append(all, placeCand(string(req.Self), p.Start, p.End, 1000))
		req.Spread = 0
		if p := mustPlace(t, view, req); p.Start != 0 {
			t.Errorf("without Spread: [%d, %d), want the lowest start", p.Start, p.End)
		}
	}
	if len(starts) < 3 {
		t.Fatalf("6 simultaneous joins took only %d distinct starts: %v", len(starts), starts)
	}
	t.Logf("starts %v, copies without the operator %v", starts, placeCopies(all, blocks))
}

// TestPlaceShouldMoveReplicas: rebalancing gives second copies to the
// blocks only the operator holds, and stays once copies cannot improve.
func TestPlaceShouldMoveReplicas(t *testing.T) {
	const blocks = 8
	op := placeCand("op", 0, blocks, 1000)
	req := func(self string) PlaceRequest {
		return PlaceRequest{Blocks: blocks, Span: 5, Self: peer.ID(self), Replicas: 2, MyMicros: []float64{1000}, Spread: DefaultPlaceSpread}
	}
	// The spans: 1-5 and 2-6 leave blocks 0 and 7 on the operator alone.
	b, c := placeCand("b", 1, 6, 1000), placeCand("c", 2, 7, 1000)
	p, move := Rebalance([]RouteCandidate{op, b, c}, req("b"), [2]int{1, 6})
	if !move || p.Start != 0 {
		t.Fatalf("b: got %+v %v, want a move to [0, 5)", p, move)
	}
	t.Log(p.Reason)
	b = placeCand("b", 0, 5, 1000)
	p, move = Rebalance([]RouteCandidate{op, b, c}, req("c"), [2]int{2, 7})
	if !move || p.Start != 3 {
		t.Fatalf("c: got %+v %v, want a move to [3, 8)", p, move)
	}
	t.Log(p.Reason)
	c = placeCand("c", 3, 8, 1000)
	for _, self := range []string{"b", "c"} {
		cur := [2]int{0, 5}
		if self == "c" {
			cur = [2]int{3, 8}
		}
		if p, move := Rebalance([]RouteCandidate{op, b, c}, req(self), cur); move {
			t.Fatalf("%s: moves to %+v from a mesh where every block has 2 copies", self, p)
		}
		// The operator gone: every block is still served, and copies
		// cannot rise with 10 block slots for 16: nobody moves.
		if p, move := Rebalance([]RouteCandidate{b, c}, req(self), cur); move {
			t.Fatalf("%s: moves to %+v without the operator", self, p)
		}
	}
	// The operator gone after 1-5 and 2-6: the uncovered blocks are taken.
	b, c = placeCand("b", 1, 6, 1000), placeCand("c", 2, 7, 1000)
	if p, move := Rebalance([]RouteCandidate{b, c}, req("b"), [2]int{1, 6}); !move || p.Start != 0 {
		t.Fatalf("b alone with c: got %+v %v, want a move to [0, 5)", p, move)
	}
}

// TestPlaceReplicasNoOscillation: nodes of various spans and speeds join
// with Replicas 2 and Spread, then rebalance in turns; moves stop, and no
// move lowers the capped copy counts.
func TestPlaceReplicasNoOscillation(t *testing.T) {
	const blocks, replicas = 24, 2
	capped := func(nodes []*placeNode) []int {
		n := placeCopies(placeCands(nodes), blocks)
		for i := range n {
			n[i] = min(n[i], replicas)
		}
		slices.Sort(n)
		return n
	}
	total := 0
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 15))
		nodes := make([]*placeNode, 3+rng.IntN(8))
		for i := range nodes {
			n := &placeNode{id: peer.ID(fmt.Sprintf("n%02d", i)), span: 3 + rng.IntN(8), micros: make([]float64, blocks)}
			base := []float64{500, 1000, 2000}[rng.IntN(3)]
			for b := range n.micros {
				n.micros[b] = base * (0.9 + 0.2*rng.Float64())
			}
			nodes[i] = n
		}
		req := func(n *placeNode) PlaceRequest {
			return PlaceRequest{Blocks: blocks, Span: n.span, MyMicros: n.micros, Self: n.id, Replicas: replicas, Spread: DefaultPlaceSpread}
		}
		// Half join at once (the same view), then the rest one by one.
		half := len(nodes) / 2
		view := placeCands(nodes)
		for _, n := range nodes[:half] {
			p, err := Place(view, req(n))
			if err != nil {
				t.Fatal(err)
			}
			n.start, n.end = p.Start, p.End
		}
		for _, n := range nodes[half:] {
			p, err := Place(placeCands(nodes), req(n))
			if err != nil {
				t.Fatal(err)
			}
			n.start, n.end = p.Start, p.End
		}
		var moves []int
		for range 60 {
			moved := 0
			for _, i := range rng.Perm(len(nodes)) {
				n := nodes[i]
				p, move := Rebalance(placeCands(nodes), req(n), [2]int{n.start, n.end})
				if !move {
					continue
				}
				before := capped(nodes)
				n.start, n.end = p.Start, p.End
				if after := capped(nodes); slices.Compare(after, before) < 0 {
					t.Fatalf("seed %d: %s moved and copies fell: %v -> %v", seed, n.id, before, after)
				}
				moved++
			}
			moves = append(moves, moved)
		}
		if slices.Max(moves[20:]) != 0 {
			t.Errorf("seed %d: moves in the last 40 rounds: %v", seed, moves)
		}
		for _, m := range moves {
			total += m
		}
		t.Logf("seed %d: %d nodes, copies %v, moves %v", seed, len(nodes), placeCopies(placeCands(nodes), blocks), moves[:5])
	}
	if total == 0 {
		t.Log("no node ever moved")
	}
}

// LastCopies names the blocks a move would drop that no other usable
// candidate holds, and only those.
func TestLastCopies(t *testing.T) {
	ids := routeIDs(t, 3)
	me, a, b := ids[0], ids[1], ids[2]
	cands := []RouteCandidate{
		{Peer: me, Start: 0, End: 8, BlockMicros: make([]float64, 8)},
		{Peer: a, Start: 0, End: 2, BlockMicros: []float64{100, 100}},
		{Peer: b, Start: 5, End: 7, BlockMicros: []float64{100}}, // malformed: ignored
	}
	cands[0].BlockMicros[0] = 100
	req := PlaceRequest{Blocks: 8, Self: me}
	if got, want := LastCopies(cands, req, [2]int{0, 8}, [2]int{4, 8}), []int{2, 3}; !slices.Equal(got, want) {
		t.Errorf("moving [0, 8) -> [4, 8): %v, want %v", got, want)
	}
	if got := LastCopies(cands, req, [2]int{0, 8}, [2]int{0, 8}); got != nil {
		t.Errorf("staying: %v, want none", got)
	}
	cands[2].BlockMicros = []float64{100, 100}
	if got, want := LastCopies(cands, req, [2]int{0, 8}, [2]int{2, 4}), []int{4, 7}; !slices.Equal(got, want) {
		t.Errorf("moving [0, 8) -> [2, 4) with b on [5, 7): %v, want %v", got, want)
	}
}

// placeCmpHist orders copy histograms as the sorted capped counts they
// stand for compare (leximin), which is what placement weighs.
func TestPlaceCmpHist(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	for range 2000 {
		blocks, replicas := 1+rng.IntN(12), 2+rng.IntN(3)
		pm := &placeMesh{blocks: blocks, replicas: replicas, copies: make([]int, blocks), hist: make([]int, replicas+1)}
		for b := range pm.copies {
			pm.copies[b] = rng.IntN(replicas + 2)
			pm.hist[min(pm.copies[b], replicas)]++
		}
		sorted := func(s, e int) []int {
			v := make([]int, blocks)
			for b, c := range pm.copies {
				if b >= s && b < e {
					c++
				}
				v[b] = min(c, replicas)
			}
			slices.Sort(v)
			return v
		}
		s1, s2 := rng.IntN(blocks), rng.IntN(blocks)
		e1, e2 := s1+1+rng.IntN(blocks-s1), s2+1+rng.IntN(blocks-s2)
		want := slices.Compare(sorted(s1, e1), sorted(s2, e2))
		if got := placeCmpHist(pm.copyHist(s1, e1, nil), pm.copyHist(s2, e2, nil)); got != want {
			t.Fatalf("copies %v (replicas %d), [%d, %d) against [%d, %d): %d, want %d", pm.copies, replicas, s1, e1, s2, e2, got, want)
		}
	}
}

// NoReason changes nothing but the Reason.
func TestPlaceNoReason(t *testing.T) {
	ids := routeIDs(t, 12)
	for seed := range uint64(30) {
		rng := rand.New(rand.NewPCG(seed, 9))
		cands := randomMesh(rng, ids[:2+int(seed%10)], 40)
		req := PlaceRequest{Blocks: 40, Span: 5 + int(seed%9), MyMicros: []float64{200}, Self: ids[11], Replicas: int(seed % 3),
			Spread: float64(seed%2) * DefaultPlaceSpread}
		quiet := req
		quiet.NoReason = true
		p, _ := Place(cands, req)
		q, _ := Place(cands, quiet)
		cur := [2]int{int(seed % 20), int(seed%20) + req.Span}
		pm, pmove := ShouldMove(cands, req, cur, 1.2)
		qm, qmove := ShouldMove(cands, quiet, cur, 1.2)
		if p.Reason == "" || pm.Reason == "" || q.Reason != "" || qm.Reason != "" {
			t.Fatalf("seed %d: reasons %q %q, quiet %q %q", seed, p.Reason, pm.Reason, q.Reason, qm.Reason)
		}
		p.Reason, pm.Reason = "", ""
		if p != q || pm != qm || pmove != qmove {
			t.Errorf("seed %d: %+v %+v %v, quiet %+v %+v %v", seed, p, pm, pmove, q, qm, qmove)
		}
	}
}
