package mesh

import (
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// routeIDs returns n distinct peer IDs of Ed25519 keys made from fixed
// seeds, in increasing order (so ids[0] < ids[1] < ...).
func routeIDs(tb testing.TB, n int) []peer.ID {
	tb.Helper()
	ids := make([]peer.ID, n)
	for i := range ids {
		var seed [ed25519.SeedSize]byte
		binary.LittleEndian.PutUint64(seed[:], uint64(i)+1)
		priv, err := crypto.UnmarshalEd25519PrivateKey(ed25519.NewKeyFromSeed(seed[:]))
		if err != nil {
			tb.Fatal(err)
		}
		if ids[i], err = peer.IDFromPrivateKey(priv); err != nil {
			tb.Fatal(err)
		}
	}
	slices.Sort(ids)
	return ids
}

// at is a 2-dimensional coordinate at (x, y) milliseconds, with no height:
// the RTT between two of them is their distance.
func at(x, y float64) *protocol.Coordinate {
	return &protocol.Coordinate{Vec: []float64{x / 1e3, y / 1e3}}
}

// server is a candidate serving [start, end) at us microseconds per block.
func server(id peer.ID, start, end int, us float64, c *protocol.Coordinate) RouteCandidate {
	m := make([]float64, end-start)
	for i := range m {
		m[i] = us
	}
	return RouteCandidate{Peer: id, Start: start, End: end, BlockMicros: m, Coord: c}
}

func loaded(c RouteCandidate, inFlight, queued int) RouteCandidate {
	c.Load = protocol.Load{InFlight: inFlight, Queued: queued}
	return c
}

// origin is a request for all blocks from the coordinate (0, 0).
func origin(blocks int) RouteRequest {
	return RouteRequest{Blocks: blocks, From: *at(0, 0), HaveFrom: true, Tokens: 1}
}

// refEdge is the cost model's edge in µs, computed with EstimateRTT.
func refEdge(a, b *protocol.Coordinate) float64 {
	rtt := UnknownRouteRTT
	if a != nil && b != nil {
		if e := EstimateRTT(*a, *b); e >= 0 {
			rtt = e
		}
	}
	return float64(rtt)/2e3 + float64(RouteHopOverhead)/1e3
}

// routeEnv is the requester's side of the cost model, for checks.
type routeEnv struct {
	req   RouteRequest
	from  *protocol.Coordinate
	start int
	end   int
	byID  map[peer.ID]RouteCandidate
	cands []RouteCandidate // usable, not excluded, first of each peer
}

func newRouteEnv(cands []RouteCandidate, req RouteRequest) *routeEnv {
	e := &routeEnv{req: req, start: req.Start, end: req.End, byID: map[peer.ID]RouteCandidate{}}
	if e.end == 0 {
		e.end = req.Blocks
	}
	if req.HaveFrom && ValidateCoordinate(req.From) == nil {
		e.from = &req.From
	}
	for _, c := range cands {
		if _, dup := e.byID[c.Peer]; dup || req.Exclude[c.Peer] || !usableCandidate(&c) {
			continue
		}
		if c.Coord != nil && ValidateCoordinate(*c.Coord) != nil {
			c.Coord = nil
		}
		e.byID[c.Peer] = c
		e.cands = append(e.cands, c)
	}
	// Coordinates of another dimensionality than the reference count as
	// unknown.
	slices.SortFunc(e.cands, func(a, b RouteCandidate) int { return strings.Compare(string(a.Peer), string(b.Peer)) })
	dims := 0
	if e.from != nil {
		dims = len(e.from.Vec)
	}
	for i, c := range e.cands {
		if c.Coord == nil || c.End <= e.start || c.Start >= e.end {
			continue
		}
		if dims == 0 {
			dims = len(c.Coord.Vec)
		}
		if len(c.Coord.Vec) != dims {
			c.Coord = nil
			e.cands[i] = c
			e.byID[c.Peer] = c
		}
	}
	return e
}

// ret is the cost of the edge between a candidate and the requester.
func (e *routeEnv) ret(c RouteCandidate) float64 {
	if e.req.Self != "" && c.Peer == e.req.Self {
		return 0
	}
	return refEdge(e.from, c.Coord)
}

// compute is the cost of blocks [s, t) on c.
func (e *routeEnv) compute(c RouteCandidate, s, t int) float64 {
	lf := 1 + float64(max(c.Load.InFlight, 0)+max(c.Load.Queued, 0))/RouteLoadSlots
	sum := 0.0
	for b := s; b < t; b++ {
		sum += c.BlockMicros[b-c.Start] * float64(max(e.req.Tokens, 1)) * lf
	}
	return sum
}

// check verifies a route's invariants and returns its cost recomputed from
// the cost model, µs.
func (e *routeEnv) check(tb testing.TB, r Route) float64 {
	tb.Helper()
	if len(r.Hops) == 0 {
		tb.Fatalf("route without hops: %+v", r)
	}
	if r.Hops[0].Start != e.start || r.Hops[len(r.Hops)-1].End != e.end {
		tb.Fatalf("route %v does not span [%d, %d)", r.Hops, e.start, e.end)
	}
	cost := 0.0
	for i, h := range r.Hops {
		c, ok := e.byID[h.Peer]
		if !ok {
			tb.Fatalf("hop %d %v: not a usable candidate (excluded: %v)", i, h, e.req.Exclude[h.Peer])
		}
		if h.Start >= h.End || h.Start < c.Start || h.End > c.End {
			tb.Fatalf("hop %d [%d, %d) outside its peer's span [%d, %d)", i, h.Start, h.End, c.Start, c.End)
		}
		if i == 0 {
			cost += e.ret(c)
		} else {
			prev := r.Hops[i-1]
			if prev.End != h.Start {
				tb.Fatalf("hops %d and %d not contiguous: %v", i-1, i, r.Hops)
			}
			if prev.Peer == h.Peer {
				tb.Fatalf("hops %d and %d on the same peer: %v", i-1, i, r.Hops)
			}
			cost += refEdge(e.byID[prev.Peer].Coord, c.Coord)
		}
		cost += e.compute(c, h.Start, h.End)
	}
	cost += e.ret(e.byID[r.Hops[len(r.Hops)-1].Peer])
	if d := math.Abs(float64(r.Cost)/1e3 - cost); d > 1e-3+1e-9*cost {
		tb.Fatalf("route cost %v, the cost model gives %.3fµs", r.Cost, cost)
	}
	return cost
}

// best is the optimum by exhaustive search over (position, last peer), the
// cost model as written: a peer p at position b may take the request to
// any e in (b, p.End]. It returns +Inf when no route exists.
func (e *routeEnv) best() float64 {
	n := len(e.cands)
	// d[b][k]: cost of having run blocks [start, b), the last on cands[k]; k == n: nothing yet.
	d := make([][]float64, e.end+1)
	for b := range d {
		d[b] = slices.Repeat([]float64{math.Inf(1)}, n+1)
	}
	d[e.start][n] = 0
	for b := e.start; b < e.end; b++ {
		for k := range n + 1 {
			if math.IsInf(d[b][k], 1) {
				continue
			}
			for q, c := range e.cands {
				if q == k || c.Start > b || c.End <= b {
					continue
				}
				edge := e.ret(c)
				if k < n {
					edge = refEdge(e.cands[k].Coord, c.Coord)
				}
				for t := b + 1; t <= min(c.End, e.end); t++ {
					d[t][q] = min(d[t][q], d[b][k]+edge+e.compute(c, b, t))
				}
			}
		}
	}
	best := math.Inf(1)
	for k, c := range e.cands {
		best = min(best, d[e.end][k]+e.ret(c))
	}
	return best
}

// plan runs PlanRoute and checks the route it returns.
func plan(tb testing.TB, cands []RouteCandidate, req RouteRequest) Route {
	tb.Helper()
	r, err := PlanRoute(cands, req)
	if err != nil {
		tb.Fatal(err)
	}
	newRouteEnv(cands, req).check(tb, r)
	return r
}

func hopsString(hs []Hop, names map[peer.ID]string) string {
	var parts []string
	for _, h := range hs {
		parts = append(parts, fmt.Sprintf("%s:%d-%d", names[h.Peer], h.Start, h.End))
	}
	return strings.Join(parts, " ")
}

// TestRouteProperties routes hand-made views, one property each.
func TestRouteProperties(t *testing.T) {
	ids := routeIDs(t, 6)
	A, B, C, D, E, F := ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]
	names := map[peer.ID]string{A: "A", B: "B", C: "C", D: "D", E: "E", F: "F"}
	for _, tc := range []struct {
		name  string
		cands []RouteCandidate
		req   RouteRequest
		want  string
	}{
		{
			name:  "near beats far",
			cands: []RouteCandidate{server(A, 0, 8, 1000, at(80, 0)), server(B, 0, 8, 1000, at(5, 0))},
			req:   origin(8),
			want:  "B:0-8",
		},
		{
			name:  "near beats far, whatever the peer ID order",
			cands: []RouteCandidate{server(A, 0, 8, 1000, at(5, 0)), server(B, 0, 8, 1000, at(80, 0))},
			req:   origin(8),
			want:  "A:0-8",
		},
		{
			name: "unloaded beats loaded at the same RTT",
			cands: []RouteCandidate{
				loaded(server(A, 0, 8, 1000, at(10, 0)), 3, 2),
				server(B, 0, 8, 1000, at(0, 10)),
				loaded(server(C, 0, 8, 1000, at(-10, 0)), 1, 0),
			},
			req:  origin(8),
			want: "B:0-8",
		},
		{
			name: "queued requests count as load",
			cands: []RouteCandidate{
				server(A, 0, 8, 1000, at(10, 0)),
				loaded(server(B, 0, 8, 1000, at(10, 0)), 0, 1),
			},
			req:  origin(8),
			want: "A:0-8",
		},
		{
			name:  "faster beats slower at the same RTT",
			cands: []RouteCandidate{server(A, 0, 8, 3000, at(10, 0)), server(B, 0, 8, 800, at(0, 10))},
			req:   origin(8),
			want:  "B:0-8",
		},
		{
			name:  "split when nobody covers everything",
			cands: []RouteCandidate{server(A, 0, 5, 1000, at(5, 0)), server(B, 5, 12, 1000, at(0, 5)), server(C, 3, 9, 1000, at(200, 0))},
			req:   origin(12),
			want:  "A:0-5 B:5-12",
		},
		{
			name: "split over three with overlaps: hand off where it is cheapest",
			cands: []RouteCandidate{
				server(A, 0, 6, 1000, at(5, 0)),
				server(B, 4, 10, 500, at(5, 0)),
				server(C, 8, 12, 1000, at(5, 0)),
			},
			req:  origin(12),
			want: "A:0-4 B:4-10 C:10-12",
		},
		{
			name: "one near peer covering all beats a split over near peers",
			cands: []RouteCandidate{
				server(A, 0, 6, 1000, at(3, 0)),
				server(B, 6, 12, 1000, at(0, 3)),
				server(C, 0, 12, 1000, at(4, 0)),
			},
			req:  origin(12),
			want: "C:0-12",
		},
		{
			name: "a split over near peers beats one far peer",
			cands: []RouteCandidate{
				server(A, 0, 6, 1000, at(3, 0)),
				server(B, 6, 12, 1000, at(3, 1)),
				server(C, 0, 12, 1000, at(150, 0)),
			},
			req:  origin(12),
			want: "A:0-6 B:6-12",
		},
		{
			name: "known near beats unknown",
			cands: []RouteCandidate{
				server(A, 0, 8, 1000, nil),
				server(B, 0, 8, 1000, at(30, 0)),
			},
			req:  origin(8),
			want: "B:0-8",
		},
		{
			name: "an unusable coordinate is unknown",
			cands: []RouteCandidate{
				server(A, 0, 8, 1000, &protocol.Coordinate{Vec: []float64{math.NaN(), 0}}),
				server(B, 0, 8, 1000, at(40, 0)),
			},
			req:  origin(8),
			want: "B:0-8",
		},
		{
			name: "a sub-span of a wide server: it runs only what is asked",
			cands: []RouteCandidate{
				server(A, 0, 12, 1000, at(5, 0)),
				server(B, 4, 8, 1000, at(60, 0)),
			},
			req:  RouteRequest{Blocks: 12, Start: 4, End: 8, From: *at(0, 0), HaveFrom: true},
			want: "A:4-8",
		},
		{
			name: "failover of a lost span avoids the banned peer",
			cands: []RouteCandidate{
				server(A, 0, 12, 1000, at(5, 0)),
				server(B, 4, 8, 500, at(60, 0)),
				server(C, 6, 12, 1000, at(70, 0)),
			},
			req: RouteRequest{Blocks: 12, Start: 4, End: 10, From: *at(0, 0), HaveFrom: true,
				Exclude: map[peer.ID]bool{A: true}},
			want: "B:4-8 C:8-10",
		},
		{
			name: "the requester serving blocks itself pays no edge to itself",
			cands: []RouteCandidate{
				server(A, 0, 8, 1000, at(0, 0)),
				server(B, 0, 8, 1000, at(0, 0)),
			},
			req:  RouteRequest{Blocks: 8, From: *at(0, 0), HaveFrom: true, Self: B},
			want: "B:0-8",
		},
		{
			name: "tokens scale compute: a fast far peer wins a long batch",
			cands: []RouteCandidate{
				server(A, 0, 8, 1000, at(5, 0)),
				server(B, 0, 8, 100, at(60, 0)),
			},
			req:  RouteRequest{Blocks: 8, From: *at(0, 0), HaveFrom: true, Tokens: 64},
			want: "B:0-8",
		},
		{
			name: "tokens scale compute: the near peer wins one token",
			cands: []RouteCandidate{
				server(A, 0, 8, 1000, at(5, 0)),
				server(B, 0, 8, 100, at(60, 0)),
			},
			req:  RouteRequest{Blocks: 8, From: *at(0, 0), HaveFrom: true, Tokens: 1},
			want: "A:0-8",
		},
		{
			name: "without the requester's coordinate, hops between near peers still count",
			cands: []RouteCandidate{
				server(A, 0, 4, 1000, at(0, 0)),
				server(B, 4, 8, 1000, at(100, 0)),
				server(C, 4, 8, 1000, at(1, 0)),
				server(D, 0, 8, 5000, at(300, 0)),
			},
			req:  RouteRequest{Blocks: 8},
			want: "A:0-4 C:4-8",
		},
		{
			name: "a bad candidate is ignored",
			cands: []RouteCandidate{
				{Peer: A, Start: 0, End: 8, BlockMicros: []float64{1}, Coord: at(0, 0)},
				{Peer: B, Start: 0, End: 1, BlockMicros: []float64{-1}, Coord: at(0, 0)},
				{Peer: C, Start: 0, End: 1, BlockMicros: []float64{math.Inf(1)}, Coord: at(0, 0)},
				{Peer: D, Start: 0, End: 1, BlockMicros: []float64{math.NaN()}, Coord: at(0, 0)},
				server(E, 0, 8, 1000, at(50, 0)),
			},
			req:  origin(8),
			want: "E:0-8",
		},
		{
			name: "exact ties go to the lower peer ID",
			cands: []RouteCandidate{
				server(F, 0, 8, 1000, at(10, 0)),
				server(E, 0, 8, 1000, at(0, 10)),
				server(D, 0, 8, 1000, at(-10, 0)),
			},
			req:  origin(8),
			want: "D:0-8",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := plan(t, tc.cands, tc.req)
			if got := hopsString(r.Hops, names); got != tc.want {
				t.Errorf("route %s (cost %v), want %s", got, r.Cost, tc.want)
			}
			env := newRouteEnv(tc.cands, tc.req)
			if want := env.best(); math.Abs(float64(r.Cost)/1e3-want) > 1e-3 {
				t.Errorf("cost %v, exhaustive search finds %.3fµs", r.Cost, want)
			}
		})
	}
}

// TestRouteCost checks a cost by hand: two hops, known coordinates.
func TestRouteCost(t *testing.T) {
	ids := routeIDs(t, 2)
	cands := []RouteCandidate{
		loaded(server(ids[0], 0, 2, 100, at(3, 4)), 2, 2), // 5 ms from the requester, load factor 2
		server(ids[1], 2, 4, 50, at(3, 0)),                // 4 ms from A, 3 ms from the requester
	}
	r := plan(t, cands, RouteRequest{Blocks: 4, From: *at(0, 0), HaveFrom: true, Tokens: 3})
	ov := RouteHopOverhead
	want := 2500*time.Microsecond + ov + 2*100*3*2*time.Microsecond + // to A, A computes
		2*time.Millisecond + ov + 2*50*3*time.Microsecond + // to B, B computes
		1500*time.Microsecond + ov // back
	if r.Cost != want {
		t.Errorf("cost %v, want %v", r.Cost, want)
	}
}

// TestRouteNoRoute checks the error when coverage is impossible.
func TestRouteNoRoute(t *testing.T) {
	ids := routeIDs(t, 3)
	cands := []RouteCandidate{
		server(ids[0], 0, 4, 1000, at(1, 0)),
		server(ids[1], 2, 9, 1000, at(1, 0)),
		server(ids[2], 10, 12, 1000, at(1, 0)),
	}
	for _, tc := range []struct {
		name    string
		req     RouteRequest
		blocks  []int
		message string
	}{
		{"a gap", origin(12), []int{9}, "blocks 9 of 12"},
		{"gaps after an exclusion", RouteRequest{Blocks: 12, Exclude: map[peer.ID]bool{ids[1]: true}},
			[]int{4, 5, 6, 7, 8, 9}, "blocks 4-9 of 12"},
		{"everyone excluded", RouteRequest{Blocks: 12, Start: 2, End: 3, Exclude: map[peer.ID]bool{ids[0]: true, ids[1]: true}},
			[]int{2}, "blocks 2 of 12"},
		{"two gaps in a sub-range", RouteRequest{Blocks: 14, Start: 1, End: 14, Exclude: map[peer.ID]bool{ids[1]: true}},
			[]int{4, 5, 6, 7, 8, 9, 12, 13}, "blocks 4-9, 12-13 of 14"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := PlanRoute(cands, tc.req)
			if !errors.Is(err, ErrNoRoute) {
				t.Fatalf("err %v, want ErrNoRoute", err)
			}
			var nre *NoRouteError
			if !errors.As(err, &nre) || !slices.Equal(nre.Uncovered, tc.blocks) {
				t.Fatalf("err %#v, want uncovered %v", err, tc.blocks)
			}
			if !strings.Contains(err.Error(), tc.message) {
				t.Errorf("err %q does not say %q", err, tc.message)
			}
		})
	}
	if _, err := PlanRoute(nil, origin(3)); !errors.Is(err, ErrNoRoute) {
		t.Errorf("no candidates: err %v, want ErrNoRoute", err)
	}
}

// TestRouteBadRequest checks the request's block range.
func TestRouteBadRequest(t *testing.T) {
	ids := routeIDs(t, 1)
	cands := []RouteCandidate{server(ids[0], 0, 4, 1, nil)}
	for _, req := range []RouteRequest{
		{}, {Blocks: -1}, {Blocks: 4, Start: -1}, {Blocks: 4, End: 5}, {Blocks: 4, Start: 3, End: 2}, {Blocks: 4, Start: 4},
	} {
		if _, err := PlanRoute(cands, req); !errors.Is(err, ErrBadRouteRequest) {
			t.Errorf("%+v: err %v, want ErrBadRouteRequest", req, err)
		}
	}
}

// TestRouteDeterministic routes the same random mesh with its candidates
// in different orders, and with a duplicate of the best peers.
func TestRouteDeterministic(t *testing.T) {
	ids := routeIDs(t, 200)
	rng := rand.New(rand.NewPCG(1, 2))
	cands := randomMesh(rng, ids, 48)
	req := RouteRequest{Blocks: 48, From: randomCoord(rng), HaveFrom: true, Tokens: 4}
	first := plan(t, cands, req)
	for range 20 {
		shuffled := slices.Clone(cands)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if r := plan(t, shuffled, req); !slices.Equal(r.Hops, first.Hops) || r.Cost != first.Cost {
			t.Fatalf("shuffled candidates: route %v %v, first %v %v", r.Hops, r.Cost, first.Hops, first.Cost)
		}
	}
	// Each server twice, under two IDs: every exact tie goes to the lower
	// ID, in any order.
	all := routeIDs(t, 2*len(cands))
	var twins []RouteCandidate
	lower := map[peer.ID]bool{}
	for i, c := range cands {
		a, b := c, c
		a.Peer, b.Peer = all[2*i], all[2*i+1]
		if rng.IntN(2) == 0 {
			a.Peer, b.Peer = b.Peer, a.Peer
		}
		lower[min(a.Peer, b.Peer)] = true
		twins = append(twins, a, b)
	}
	a := plan(t, twins, req)
	if a.Cost != first.Cost || len(a.Hops) != len(first.Hops) {
		t.Fatalf("twins: route %v %v, without them %v %v", a.Hops, a.Cost, first.Hops, first.Cost)
	}
	for _, h := range a.Hops {
		if !lower[h.Peer] {
			t.Fatalf("twins: hop %v on the higher ID of two equal peers", h)
		}
	}
	slices.Reverse(twins)
	if b := plan(t, twins, req); !slices.Equal(a.Hops, b.Hops) {
		t.Fatalf("twins reversed: %v, before %v", b.Hops, a.Hops)
	}
}

// TestRouteEdgeMatchesEstimateRTT checks the allocation-free RTT against
// EstimateRTT.
func TestRouteEdgeMatchesEstimateRTT(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 1000 {
		a, b := randomCoord(rng), randomCoord(rng)
		a.Adjustment, b.Adjustment = rng.NormFloat64()*0.01, rng.NormFloat64()*0.01
		want := refEdge(&a, &b)
		if got := routeEdge(a.Vec, a.Height, a.Adjustment, b.Vec, b.Height, b.Adjustment); got != want {
			t.Fatalf("edge %v to %v: %v, EstimateRTT gives %v", a, b, got, want)
		}
	}
	if got, want := routeEdge(nil, 0, 0, []float64{0}, 0, 0), refEdge(nil, at(0, 0)); got != want {
		t.Errorf("unknown edge %v, want %v", got, want)
	}
	if got, want := routeEdge([]float64{0}, 0, 0, []float64{0, 0}, 0, 0), float64(UnknownRouteRTT+2*RouteHopOverhead)/2e3; got != want {
		t.Errorf("edge across dimensionalities %v, want %v", got, want)
	}
}

// TestRouteOptimal compares PlanRoute with an exhaustive search on small
// random meshes.
func TestRouteOptimal(t *testing.T) {
	ids := routeIDs(t, 8)
	for seed := range uint64(300) {
		checkRandomRoute(t, seed, ids, true)
	}
}

// TestRouteOptimalMeshes compares PlanRoute with an exhaustive search on
// meshes shaped like real ones, large enough for the search's pruning to
// matter.
func TestRouteOptimalMeshes(t *testing.T) {
	ids := routeIDs(t, 40)
	for seed := range uint64(8) {
		rng := rand.New(rand.NewPCG(seed, 11))
		blocks := 12 + rng.IntN(12)
		cands := randomMesh(rng, ids, blocks)
		for i := range cands {
			if c := cands[i].Coord; c != nil && i%3 == 0 {
				c.Adjustment = rng.NormFloat64() * 2e-3
			}
		}
		req := RouteRequest{Blocks: blocks, From: randomCoord(rng), HaveFrom: true, Tokens: 1 + rng.IntN(8)}
		if seed%2 == 1 {
			req.Start, req.End = rng.IntN(blocks/2), blocks-rng.IntN(blocks/2)
			req.Self = ids[rng.IntN(len(ids))]
		}
		env := newRouteEnv(cands, req)
		r, err := PlanRoute(cands, req)
		if err != nil {
			if errors.Is(err, ErrNoRoute) && math.IsInf(env.best(), 1) {
				continue
			}
			t.Fatalf("seed %d: %v", seed, err)
		}
		cost := env.check(t, r)
		if want := env.best(); math.Abs(cost-want) > 1e-6*want {
			t.Fatalf("seed %d: route %v costs %.3fµs, exhaustive search finds %.3fµs", seed, r.Hops, cost, want)
		}
	}
}

// TestRouteConcurrent plans different routes at once (the search's memory
// is recycled across calls).
func TestRouteConcurrent(t *testing.T) {
	ids := routeIDs(t, 300)
	type job struct {
		cands []RouteCandidate
		req   RouteRequest
		want  Route
	}
	jobs := make([]job, 8)
	for i := range jobs {
		rng := rand.New(rand.NewPCG(uint64(i), 5))
		n := 20 + rng.IntN(len(ids)-20)
		jobs[i].cands = randomMesh(rng, ids[:n], 30+rng.IntN(40))
		jobs[i].req = RouteRequest{From: randomCoord(rng), HaveFrom: true}
		for _, c := range jobs[i].cands {
			jobs[i].req.Blocks = max(jobs[i].req.Blocks, c.End)
		}
		r, err := PlanRoute(jobs[i].cands, jobs[i].req)
		if err != nil && !errors.Is(err, ErrNoRoute) {
			t.Fatal(err)
		}
		jobs[i].want = r
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 40 {
				j := &jobs[(g+i)%len(jobs)]
				if r, _ := PlanRoute(j.cands, j.req); !slices.Equal(r.Hops, j.want.Hops) || r.Cost != j.want.Cost {
					t.Errorf("concurrent route %v %v, alone %v %v", r.Hops, r.Cost, j.want.Hops, j.want.Cost)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestRouteCandidates builds candidates from a model view.
func TestRouteCandidates(t *testing.T) {
	if Candidates(nil) != nil {
		t.Error("candidates of a nil view")
	}
	ids := routeIDs(t, 2)
	rec := &protocol.CapacityRecord{Load: protocol.Load{InFlight: 2, Queued: 1}, Coord: at(1, 2)}
	span := protocol.ServedSpan{Model: "m", Blocks: 6, Start: 2, End: 6, BlockMicros: []float64{1, 2, 3, 4}}
	mv := &ModelView{Model: "m", Blocks: 6, Peers: []PeerView{
		{ID: ids[1], Span: span, Record: rec},
		{ID: ids[0], Span: protocol.ServedSpan{Model: "m", Blocks: 6, Start: 0, End: 2, BlockMicros: []float64{5, 6}}},
	}}
	cands := Candidates(mv)
	if len(cands) != 2 {
		t.Fatalf("%d candidates, want 2", len(cands))
	}
	c := cands[0]
	if c.Peer != ids[1] || c.Start != 2 || c.End != 6 || !slices.Equal(c.BlockMicros, span.BlockMicros) ||
		c.Load != rec.Load || c.Coord != rec.Coord {
		t.Errorf("candidate %+v from %+v", c, mv.Peers[0])
	}
	if c := cands[1]; c.Peer != ids[0] || c.Coord != nil || c.Load != (protocol.Load{}) {
		t.Errorf("candidate without a record: %+v", c)
	}
	r := plan(t, cands, RouteRequest{Blocks: mv.Blocks})
	if len(r.Hops) != 2 || r.Hops[0].Peer != ids[0] || r.Hops[1].Peer != ids[1] {
		t.Errorf("route %v", r.Hops)
	}
}

// checkRandomRoute routes a random mesh made from seed and checks the
// invariants of the answer: a route that passes every check, or
// ErrNoRoute exactly when some block is not covered. With exhaustive, it
// compares the cost with an exhaustive search.
func checkRandomRoute(tb testing.TB, seed uint64, ids []peer.ID, exhaustive bool) {
	tb.Helper()
	rng := rand.New(rand.NewPCG(seed, seed>>32^0x9e3779b97f4a7c15))
	blocks := 1 + rng.IntN(10)
	cands := make([]RouteCandidate, rng.IntN(len(ids)+1))
	for i := range cands {
		s := rng.IntN(blocks)
		e := s + 1 + rng.IntN(blocks-s)
		c := server(ids[rng.IntN(len(ids))], s, e, 0, nil) // peers may repeat
		for b := range c.BlockMicros {
			c.BlockMicros[b] = float64(rng.IntN(4)) * 250 // ties are common
		}
		switch rng.IntN(8) {
		case 0: // unknown
		case 1:
			c.Coord = &protocol.Coordinate{Vec: []float64{1}} // another dimensionality
		default:
			co := randomCoord(rng)
			if rng.IntN(3) == 0 {
				co.Adjustment = rng.NormFloat64() * 2e-3 // either sign
			}
			c.Coord = &co
		}
		c.Load = protocol.Load{InFlight: rng.IntN(3) - 1, Queued: rng.IntN(3)}
		if rng.IntN(10) == 0 {
			c.BlockMicros = c.BlockMicros[1:] // malformed
		}
		cands[i] = c
	}
	req := RouteRequest{Blocks: blocks, Tokens: rng.IntN(3)}
	req.Start = rng.IntN(blocks)
	if rng.IntN(2) == 0 {
		req.End = req.Start + 1 + rng.IntN(blocks-req.Start)
	}
	if rng.IntN(4) != 0 {
		req.From, req.HaveFrom = randomCoord(rng), true
		req.From.Adjustment = rng.NormFloat64() * 1e-3
	}
	if rng.IntN(3) == 0 && len(cands) > 0 {
		req.Self = cands[rng.IntN(len(cands))].Peer
	}
	req.Exclude = map[peer.ID]bool{}
	for _, id := range ids {
		if rng.IntN(5) == 0 {
			req.Exclude[id] = true
		}
	}

	env := newRouteEnv(cands, req)
	var uncovered []int
	for b := env.start; b < env.end; b++ {
		if !slices.ContainsFunc(env.cands, func(c RouteCandidate) bool { return c.Start <= b && b < c.End }) {
			uncovered = append(uncovered, b)
		}
	}
	r, err := PlanRoute(cands, req)
	if uncovered != nil {
		var nre *NoRouteError
		if !errors.As(err, &nre) || !errors.Is(err, ErrNoRoute) || !slices.Equal(nre.Uncovered, uncovered) {
			tb.Fatalf("seed %d: err %v, want ErrNoRoute for blocks %v", seed, err, uncovered)
		}
		return
	}
	if err != nil {
		tb.Fatalf("seed %d: %v", seed, err)
	}
	cost := env.check(tb, r)
	if exhaustive {
		if want := env.best(); math.Abs(cost-want) > 1e-6*max(1, want) {
			tb.Fatalf("seed %d: route %v costs %.3fµs, exhaustive search finds %.3fµs", seed, r.Hops, cost, want)
		}
	}
}

// FuzzPlanRoute checks the invariants of routes over random candidate sets
// (coverage, contiguity, spans, exclusions, the cost) and that their cost
// is the optimum.
func FuzzPlanRoute(f *testing.F) {
	ids := routeIDs(f, 8)
	for seed := range uint64(16) {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, seed uint64) {
		checkRandomRoute(t, seed, ids, true)
	})
}

// randomCoord is an 8-dimensional coordinate (serf's default) in a
// ±60 ms world, with an access-link height of 0.5 to 3 ms.
func randomCoord(rng *rand.Rand) protocol.Coordinate {
	c := protocol.Coordinate{Vec: make([]float64, 8), Height: (0.5 + 2.5*rng.Float64()) / 1e3}
	for i := range c.Vec {
		c.Vec[i] = (rng.Float64()*120 - 60) / 1e3 / math.Sqrt(8)
	}
	return c
}

// randomMesh is n = len(ids) servers of a model of the given blocks, as a
// mesh might look: spans of 8 to 32 blocks, peers in a few regions, GPUs of
// different speeds, some load, a few unknown coordinates. Every block is
// served.
func randomMesh(rng *rand.Rand, ids []peer.ID, blocks int) []RouteCandidate {
	regions := make([]protocol.Coordinate, 5)
	for i := range regions {
		regions[i] = randomCoord(rng)
	}
	profile := make([]float64, blocks) // the model's per-block time on a reference GPU
	for b := range profile {
		profile[b] = 300 * (0.9 + 0.2*rng.Float64())
	}
	cands := make([]RouteCandidate, len(ids))
	for i, id := range ids {
		n := 8 + rng.IntN(25)
		s := rng.IntN(blocks+n) - n
		if i < 2 { // the ends are served
			s = []int{0, blocks - n}[i]
		}
		s, e := max(s, 0), min(s+n, blocks)
		if e <= s {
			s, e = max(0, blocks-n), blocks
		}
		speed := 0.5 + 2.5*rng.Float64()
		c := RouteCandidate{Peer: id, Start: s, End: e, BlockMicros: make([]float64, e-s)}
		for b := range c.BlockMicros {
			c.BlockMicros[b] = profile[s+b] * speed * (0.95 + 0.1*rng.Float64())
		}
		c.Load = protocol.Load{InFlight: rng.IntN(4), Queued: rng.IntN(3) * rng.IntN(2)}
		if rng.IntN(20) != 0 {
			r := regions[rng.IntN(len(regions))]
			co := protocol.Coordinate{Vec: slices.Clone(r.Vec), Height: (0.5 + 2.5*rng.Float64()) / 1e3}
			for d := range co.Vec {
				co.Vec[d] += (rng.Float64()*10 - 5) / 1e3 / math.Sqrt(8)
			}
			c.Coord = &co
		}
		cands[i] = c
	}
	return cands
}

// BenchmarkRoute routes a 100-block model over meshes of 10 to 1000
// servers.
func BenchmarkRoute(b *testing.B) {
	const blocks = 100
	all := routeIDs(b, 1000)
	for _, n := range []int{10, 100, 300, 1000} {
		b.Run(fmt.Sprintf("candidates=%d", n), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(uint64(n), 7))
			var cands []RouteCandidate
			for {
				cands = randomMesh(rng, all[:n], blocks)
				if _, err := PlanRoute(cands, RouteRequest{Blocks: blocks}); err == nil {
					break
				}
			}
			req := RouteRequest{Blocks: blocks, From: randomCoord(rng), HaveFrom: true, Tokens: 1}
			r := plan(b, cands, req)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := PlanRoute(cands, req); err != nil {
					b.Fatal(err)
				}
			}
			states := 0
			for _, c := range cands {
				states += c.End - c.Start
			}
			b.ReportMetric(float64(len(r.Hops)), "hops")
			b.ReportMetric(float64(states)/blocks, "servers/block")
		})
	}
}

// spreadShares routes n requests over cands with one seeded source and
// returns, per peer, the share of the requests that ran block b on it.
func spreadShares(tb testing.TB, cands []RouteCandidate, req RouteRequest, seed uint64, n, b int) map[peer.ID]float64 {
	tb.Helper()
	req.Rand = rand.New(rand.NewPCG(seed, 1))
	shares := map[peer.ID]float64{}
	for range n {
		r := plan(tb, cands, req)
		for _, h := range r.Hops {
			if h.Start <= b && b < h.End {
				shares[h.Peer] += 1 / float64(n)
			}
		}
	}
	return shares
}

// TestRouteSpreadEqualReplicas: with every span served by N equal
// replicas, drawn routes share each span's requests within 10% (relative)
// of 1/N each, where the deterministic route always takes the same one.
func TestRouteSpreadEqualReplicas(t *testing.T) {
	const spans, n, perSpan, draws = 3, 3, 4, 3000
	ids := routeIDs(t, spans*n)
	var cands []RouteCandidate
	for s := range spans {
		for j := range n {
			cands = append(cands, server(ids[s*n+j], s*perSpan, (s+1)*perSpan, 1000, at(5, 0)))
		}
	}
	req := origin(spans * perSpan)
	for s := range spans {
		shares := spreadShares(t, cands, req, 1, draws, s*perSpan)
		for j := range n {
			if got := shares[ids[s*n+j]]; math.Abs(got-1.0/n) > 0.1/n {
				t.Errorf("span %d replica %d: share %.3f, want %.3f ± 10%%", s, j, got, 1.0/n)
			}
		}
		t.Logf("span %d: shares %.3f %.3f %.3f", s, shares[ids[s*n]], shares[ids[s*n+1]], shares[ids[s*n+2]])
	}
	// Without a source, one replica per span takes everything.
	first := plan(t, cands, req)
	for range 10 {
		if r := plan(t, cands, req); !slices.Equal(r.Hops, first.Hops) {
			t.Fatalf("deterministic route changed: %v, then %v", first.Hops, r.Hops)
		}
	}
}

// TestRouteSpreadPrefersNearAndFast: a replica twice as slow gets a few
// percent of the requests, three times as slow under 1%, and one whose
// edges cost more than the whole span's compute none.
func TestRouteSpreadPrefersNearAndFast(t *testing.T) {
	ids := routeIDs(t, 4)
	req := origin(4)
	for _, tc := range []struct {
		name     string
		other    RouteCandidate
		min, max float64 // bounds of the other's share
	}{
		{"equal", server(ids[1], 0, 4, 1000, at(5, 0)), 0.45, 0.55},
		{"1.2x slower", server(ids[1], 0, 4, 1200, at(5, 0)), 0.2, 0.4},
		{"2x slower", server(ids[1], 0, 4, 2000, at(5, 0)), 0, 0.05},
		{"3x slower", server(ids[1], 0, 4, 3000, at(5, 0)), 0, 0.01},
		{"far", server(ids[1], 0, 4, 1000, at(5, 20)), 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cands := []RouteCandidate{server(ids[0], 0, 4, 1000, at(5, 0)), tc.other}
			got := spreadShares(t, cands, req, 2, 4000, 0)[tc.other.Peer]
			t.Logf("share of the other: %.4f", got)
			if got < tc.min || got > tc.max {
				t.Errorf("share %.4f, want [%.2f, %.2f]", got, tc.min, tc.max)
			}
		})
	}
}

// TestRouteSpreadAvoidsLoad: of three equal replicas, one reported busy
// (in flight and queued, as a fresh answer says) gets a small share.
func TestRouteSpreadAvoidsLoad(t *testing.T) {
	ids := routeIDs(t, 3)
	var cands []RouteCandidate
	for _, id := range ids {
		cands = append(cands, server(id, 0, 4, 1000, at(5, 0)))
	}
	idle := spreadShares(t, cands, origin(4), 3, 3000, 0)[ids[0]]
	cands[0] = loaded(cands[0], 4, 4) // three times as slow
	busy := spreadShares(t, cands, origin(4), 3, 3000, 0)[ids[0]]
	t.Logf("share of replica 0: %.3f idle, %.3f loaded", idle, busy)
	if idle < 0.3 || busy > 0.02 {
		t.Errorf("share of replica 0: %.3f idle, %.3f loaded; want about 1/3, then under 2%%", idle, busy)
	}
}

// TestRouteSpreadSeeded: the same seed draws the same routes, whatever the
// order of the candidates; another seed draws others. Drawn routes keep
// every invariant and report their unperturbed cost (plan checks both).
func TestRouteSpreadSeeded(t *testing.T) {
	ids := routeIDs(t, 60)
	rng := rand.New(rand.NewPCG(5, 5))
	cands := randomMesh(rng, ids, 24)
	req := RouteRequest{Blocks: 24, From: randomCoord(rng), HaveFrom: true, Tokens: 1}
	if _, err := PlanRoute(cands, req); err != nil {
		t.Skip(err)
	}
	draw := func(seed uint64, cands []RouteCandidate) [][]Hop {
		req := req
		req.Rand = rand.New(rand.NewPCG(seed, 9))
		var out [][]Hop
		for range 50 {
			out = append(out, plan(t, cands, req).Hops)
		}
		return out
	}
	a := draw(1, cands)
	shuffled := slices.Clone(cands)
	rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	if b := draw(1, shuffled); !slices.EqualFunc(a, b, slices.Equal) {
		t.Fatal("same seed, other routes")
	}
	if c := draw(2, cands); slices.EqualFunc(a, c, slices.Equal) {
		t.Fatal("another seed, the same 50 routes")
	}
}

// TestFreshLoad: an answer's load counts in full at once and fades into
// the record's with LoadHalfLife.
func TestFreshLoad(t *testing.T) {
	rec := protocol.Load{InFlight: 2, Queued: 0, FreeKVBytes: 7}
	seen := protocol.HopLoad{InFlight: 10, Queued: 8}
	for _, tc := range []struct {
		age  time.Duration
		want protocol.Load
	}{
		{0, protocol.Load{InFlight: 10, Queued: 8, FreeKVBytes: 7}},
		{LoadHalfLife, protocol.Load{InFlight: 6, Queued: 4, FreeKVBytes: 7}},
		{2 * LoadHalfLife, protocol.Load{InFlight: 4, Queued: 2, FreeKVBytes: 7}},
		{20 * LoadHalfLife, rec},
		{-time.Second, protocol.Load{InFlight: 10, Queued: 8, FreeKVBytes: 7}},
	} {
		if got := FreshLoad(rec, seen, tc.age); got != tc.want {
			t.Errorf("age %v: %+v, want %+v", tc.age, got, tc.want)
		}
	}
	if got := FreshLoad(rec, protocol.HopLoad{InFlight: -5, Queued: 1 << 40}, 0); got.InFlight != 0 || got.Queued != maxSeenLoad {
		t.Errorf("hostile counts: %+v", got)
	}
}

// TestAnswersCarryHopLoad: every hop's progress and result frames tell
// the requester its load, which its view folds in at once (PeerView.Load,
// then the routing candidates), fading back to the record's.
func TestAnswersCarryHopLoad(t *testing.T) {
	sm := newGPTServingMesh(t)
	requester := sm.start(t, nil, nil)
	boot := []peer.AddrInfo{addrInfo(requester)}
	hops := []*Mesh{
		sm.start(t, boot, &[2]int{0, 2}, gptSpan(sm, 0, 2, 5000)),
		sm.start(t, boot, &[2]int{2, 4}, gptSpan(sm, 2, 4, 5000)),
		sm.start(t, boot, &[2]int{4, 6}, gptSpan(sm, 4, 6, 5000)),
	}
	sm.connectAll(t)
	requester.View().SetManifest(sm.model.ID, sm.model.Manifest)
	viewOf(t, requester, sm, 3)

	ms := &meshDecoderSession{s: requester.NewSession(sm.model.ID, InferOptions{})}
	defer ms.Close()
	dec, err := shards.NewDecoder(sm.model.Manifest.Decoder, ms, byteTokens("hello"), shards.Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := dec.Next(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	v := requester.View()
	v.mu.Lock()
	for i, h := range hops {
		if s, ok := v.seen[h.ID()]; !ok || time.Since(s.at) > time.Minute {
			t.Errorf("hop %d: no load seen from its answers", i)
		}
	}
	v.mu.Unlock()

	// A loaded answer moves the candidate at once, and fades.
	busy := hops[1].ID()
	v.observeLoad(busy, protocol.HopLoad{InFlight: 12, Queued: 4}, time.Now())
	mv, err := v.Model(context.Background(), sm.model.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range Candidates(mv) {
		if c.Peer == busy && (c.Load.InFlight != 12 || c.Load.Queued != 4) {
			t.Fatalf("candidate load %+v after an answer said 12 and 4", c.Load)
		}
	}
	v.observeLoad(busy, protocol.HopLoad{InFlight: 12, Queued: 4}, time.Now().Add(-loadForget-time.Second))
	if mv, err = v.Model(context.Background(), sm.model.ID); err != nil {
		t.Fatal(err)
	}
	for _, pv := range mv.Peers {
		if pv.ID == busy && pv.Load != nil {
			t.Fatalf("an answer older than %v still counts: %+v", loadForget, *pv.Load)
		}
	}
}
