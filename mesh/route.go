package mesh

// Routing: which chain of peers runs a request's blocks. PlanRoute is a pure
// function of its arguments (no I/O, no clock; randomness only from the
// source the caller passes), so that the node and the simulator run the
// same code.
//
// # Cost model
//
// A route is a chain of hops; hop i runs blocks [Start_i, End_i) on its peer
// and pushes the activations to hop i+1; the last hop returns the result to
// the requester. Its cost estimates the end-to-end latency of one pass:
//
//	cost = sum over hops of compute(p, [Start, End)) + sum over edges of edge(a, b)
//
// where the edges are requester -> first hop, each hop -> the next, and last
// hop -> requester, and
//
//	compute(p, span) = sum over blocks of BlockMicros[b] * Tokens * load(p)
//	load(p)          = 1 + (InFlight + Queued) / RouteLoadSlots
//	edge(a, b)       = RTT(a, b)/2 + RouteHopOverhead     (a != b; 0 when a == b)
//
// RTT(a, b) is EstimateRTT of the two network coordinates; when either is
// missing or unusable (or their dimensionalities differ) it is
// UnknownRouteRTT, a pessimistic value, so that peers known to be near win
// over peers of unknown distance. An edge carries data one way, hence half
// the round trip. RouteRequest.Self names the requester's own peer: its
// edges to the requester cost nothing.
//
// A peer may run any sub-span of what it serves (no served span is forced on
// a route), and the route may hand off from one peer to another at any block
// boundary where both serve. Fewer hops win by themselves: every hand-off
// costs an edge.
//
// # Algorithm
//
// The states are (k, b): block b has just run on candidate k, the
// activations are at k. From (k, b) the request either stays on k, to
// (k, b+1) for compute(k, b+1), or moves to another candidate q serving
// block b+1, to (q, b+1) for edge(k, q) + compute(q, b+1). Every move
// advances one block, so the state graph is layered by block and acyclic:
// the shortest path is a dynamic program over the blocks in order, which is
// what Dijkstra would compute, without its heap. This graph is equivalent to
// the one over (position, last peer) where a peer takes the request from b
// to any e in (b, End]: a run of stays is one such hop, at the same cost.
//
// The moves are the costly part: serving candidates squared, per block.
// Three passes keep the search exact and much cheaper than that:
//
//   - lowerBounds, backwards, gives every state a lower bound of the cost
//     left: exact compute and last edge, and each move's edge bounded from
//     below by the triangle inequality through a few pivot points (for
//     coordinates a and b and a pivot z, RTT(a, b) >= |d(a, z) - d(b, z)| +
//     heights + negative adjustments), in constant time per state
//     (routePieces);
//   - hubBound, forwards, finds a good route cheaply (moves only from the
//     cheapest state of the block before), an upper bound of the optimum;
//   - search, forwards, runs the exact dynamic program on the states whose
//     cost so far plus lower bound is below that upper bound. For each
//     state it first bounds what any hand-off can offer (routePieces
//     again); only when that may beat staying does it scan the states of
//     the block before, in increasing cost, skipping those whose partial
//     distance already rules them out.
//
// What it costs grows with the states, the sum over candidates of the
// blocks they serve, and with how many near-equal routes the mesh offers.
// BenchmarkRoute on a mesh of 5 regions, GPUs 6x apart in speed and spans of
// 8 to 32 blocks of a 100-block model, on one 2.6 GHz core: 100 candidates
// (15 per block) route in about 0.2 ms, 300 (50 per block) in 0.7 ms, 1000
// (166 per block) in 2.3 ms; about 140 ns per state.
//
// Ties are broken deterministically: staying on the same peer before a
// hand-off, then the sender with the lower cost so far, then the lower peer
// ID. The candidates are sorted by peer ID first, so the order in which they
// are given does not matter.
//
// # Spreading
//
// Every requester of a region sees the same view, so the cheapest route is
// the same for all of them: without more, they all pile onto it (herding),
// and the loads that would push them away reach them late. With
// RouteRequest.Rand set, PlanRoute returns the cheapest route under
// perturbed compute times instead: each candidate's compute is multiplied
// by its own factor exp(RouteSpread * Z), Z a standard normal drawn from
// Rand once per usable candidate, in peer ID order. Replicas that are
// equal share the requests equally; of two single hops whose compute
// differs by a factor x, the slower one wins with probability
// Phi(-ln(x) / (RouteSpread * sqrt 2)): about 30% at x = 1.2, 2.5% at
// x = 2, 0.4% at x = 3. Edges are not perturbed, so a far peer stays far:
// the spread is among the near and fast. The search is exact on the
// perturbed costs; Route.Cost is the chosen route's unperturbed cost. The
// same Rand state gives the same choice, so a seeded simulator reproduces
// its runs; without Rand PlanRoute is deterministic, as it always was.

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// Constants of the route cost model (see the file comment).
const (
	// UnknownRouteRTT is the round trip assumed for an edge whose RTT cannot
	// be estimated from coordinates. It is pessimistic (a continental
	// round trip) so that peers known to be near are preferred.
	UnknownRouteRTT = 50 * time.Millisecond
	// RouteLoadSlots is the load (requests running plus queued) that makes a
	// peer count as twice as slow as its measured BlockMicros: a peer with
	// load L computes at 1 + L/RouteLoadSlots times its idle time. Four is
	// a guess at how many passes a server overlaps before they slow each
	// other down; it only ranks peers, so it needs to be right in order of
	// magnitude.
	RouteLoadSlots = 4
	// RouteHopOverhead is the fixed cost of every edge between two different
	// peers (requester included): framing, tensor codec and stream work,
	// the per-hop budget of the pipeline. It makes one hop win over two
	// when the network and compute are otherwise equal.
	RouteHopOverhead = 200 * time.Microsecond
	// RouteSpread is the spread of the log of the factor that perturbs each
	// candidate's compute when a route is drawn at random (RouteRequest.Rand;
	// see Spreading in the file comment): replicas within a few tens of
	// percent of each other share the requests, and of two replicas one
	// twice as slow as the other wins about 2.5% of the choices between
	// them.
	RouteSpread = 0.25
)

// ErrNoRoute is returned by PlanRoute when the usable candidates (the ones
// not excluded) do not cover every block of the request; the error it comes
// wrapped in is a *NoRouteError that lists the uncovered blocks.
var ErrNoRoute = errors.New("no route")

// ErrBadRouteRequest is returned by PlanRoute for a request whose block
// range is empty or out of the model's bounds.
var ErrBadRouteRequest = errors.New("bad route request")

// NoRouteError says which blocks of a request no usable candidate serves.
// errors.Is(err, ErrNoRoute) holds for it.
type NoRouteError struct {
	// Blocks is the model's block count.
	Blocks int
	// Uncovered lists, in increasing order, the blocks of the request that
	// no candidate left after exclusions serves.
	Uncovered []int
}

func (e *NoRouteError) Error() string {
	return fmt.Sprintf("%v: blocks %s of %d served by no usable peer", ErrNoRoute, routeBlockRanges(e.Uncovered), e.Blocks)
}

// Unwrap returns ErrNoRoute.
func (e *NoRouteError) Unwrap() error { return ErrNoRoute }

// routeBlockRanges writes sorted block numbers as "0-3, 7, 9-10".
func routeBlockRanges(bs []int) string {
	var sb strings.Builder
	for i := 0; i < len(bs); {
		j := i
		for j+1 < len(bs) && bs[j+1] == bs[j]+1 {
			j++
		}
		if sb.Len() > 0 {
			sb.WriteString(", ")
		}
		sb.WriteString(strconv.Itoa(bs[i]))
		if j > i {
			sb.WriteByte('-')
			sb.WriteString(strconv.Itoa(bs[j]))
		}
		i = j + 1
	}
	return sb.String()
}

// RouteRequest says what to route.
type RouteRequest struct {
	// Blocks is the model's block count (> 0).
	Blocks int
	// Start and End bound the blocks to route, [Start, End); End 0 means
	// Blocks. A failover routes only the lost span.
	Start, End int
	// From is the requester's network coordinate, for the first and last
	// edges; without HaveFrom those edges cost UnknownRouteRTT.
	From     protocol.Coordinate
	HaveFrom bool
	// Self is the requester's own peer ID, "" if none: when it is among the
	// candidates, its edges to the requester cost nothing.
	Self peer.ID
	// Exclude lists peers that must not be used (banned after a failure).
	Exclude map[peer.ID]bool
	// Tokens is how many token passes (batch times tokens) the request
	// pushes through each block: it scales compute. Values below 1 mean 1.
	Tokens int
	// Rand, when set, spreads requests over near-equal routes: PlanRoute
	// draws one perturbation per usable candidate from it (see Spreading in
	// the file comment). nil: the cheapest route, deterministically. A
	// *rand.Rand is not safe for concurrent use: one per goroutine.
	Rand *rand.Rand
}

// Hop is one peer's part of a route: it runs blocks [Start, End).
type Hop struct {
	Peer       peer.ID
	Start, End int
}

// Route is a chain of hops covering the request's blocks in order.
type Route struct {
	Hops []Hop
	// Cost is the estimated end-to-end latency (see the cost model).
	Cost time.Duration
}

// RouteCandidate is one server of the model, as routing sees it.
type RouteCandidate struct {
	Peer peer.ID
	// Start and End bound the blocks it serves, [Start, End); blocks
	// outside the request are ignored.
	Start, End int
	// BlockMicros is the time of one pass through each block of
	// [Start, End), in microseconds (End-Start entries; protocol.ServedSpan).
	BlockMicros []float64
	// Load is its load as advertised, or as its latest answer said
	// (PeerView.Load).
	Load protocol.Load
	// Coord is its network coordinate; nil when unknown.
	Coord *protocol.Coordinate
}

// Candidates turns a model view into routing candidates, in the view's
// order. The candidates share the view's slices and coordinates.
func Candidates(mv *ModelView) []RouteCandidate {
	if mv == nil {
		return nil
	}
	return peerCandidates(mv.Peers)
}

// peerCandidates turns peers of a model view into routing candidates.
func peerCandidates(peers []PeerView) []RouteCandidate {
	cands := make([]RouteCandidate, 0, len(peers))
	for _, pv := range peers {
		c := RouteCandidate{
			Peer:        pv.ID,
			Start:       pv.Span.Start,
			End:         pv.Span.End,
			BlockMicros: pv.Span.BlockMicros,
		}
		if pv.Record != nil {
			c.Load = pv.Record.Load
			c.Coord = pv.Record.Coord
		}
		if pv.Load != nil {
			c.Load = *pv.Load
		}
		if pv.Coord != nil {
			c.Coord = pv.Coord
		}
		cands = append(cands, c)
	}
	return cands
}

// routePivots is how many pivot points the lower bounds use at most.
const routePivots = 6

// routeCand is a usable candidate, prepared for the search.
type routeCand struct {
	id          peer.ID
	lo, hi      int       // the blocks it can run for this request, [lo, hi)
	vec         []float64 // coordinate position (seconds); nil when unknown
	height, adj float64
	ret         float64 // cost of the edge between it and the requester, µs
	jit         float64 // its compute's perturbation factor (1: none)
	// For the lower bounds (known coordinates only), in µs of RTT: the
	// distances to the pivots, and height plus negative adjustment.
	pivot [routePivots]float64
	sigma float64
}

// PlanRoute returns the cheapest route for req over cands under the cost
// model above, or an error wrapping ErrNoRoute (a *NoRouteError) when the
// candidates left after req.Exclude do not cover every requested block.
// Candidates with a malformed span or timings (BlockMicros of the wrong
// length, negative or not finite) are ignored, and so are all but the first
// candidate of a peer listed more than once. A coordinate whose
// dimensionality differs from the requester's (or, without it, from the
// first known coordinate's in peer ID order) counts as unknown. With
// req.Rand set it draws the route among near-equal ones (Spreading, in the
// file comment). PlanRoute does not modify its arguments (other than
// advancing req.Rand) and is safe for concurrent use with distinct Rands.
func PlanRoute(cands []RouteCandidate, req RouteRequest) (Route, error) {
	start, end := req.Start, req.End
	if end == 0 {
		end = req.Blocks
	}
	if req.Blocks <= 0 || start < 0 || end > req.Blocks || start >= end {
		return Route{}, fmt.Errorf("%w: blocks [%d, %d) of a %d-block model", ErrBadRouteRequest, req.Start, req.End, req.Blocks)
	}
	tokens := float64(max(req.Tokens, 1))

	// Usable candidates, sorted by peer ID, one per peer.
	order := make([]int, 0, len(cands))
	for i := range cands {
		c := &cands[i]
		if !req.Exclude[c.Peer] && usableCandidate(c) {
			order = append(order, i)
		}
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(cands[a].Peer, cands[b].Peer) })
	order = slices.CompactFunc(order, func(a, b int) bool { return cands[a].Peer == cands[b].Peer })
	order = slices.DeleteFunc(order, func(i int) bool { return cands[i].End <= start || cands[i].Start >= end })

	// How many candidates serve each block.
	n := end - start
	at := make([]int32, n+1)
	for _, i := range order {
		at[max(cands[i].Start, start)-start]++
		if e := min(cands[i].End, end); e < end {
			at[e-start]--
		}
	}
	var uncovered []int
	for b, served := 0, int32(0); b < n; b++ {
		served += at[b]
		if at[b] = served; served == 0 {
			uncovered = append(uncovered, start+b)
		}
	}
	if uncovered != nil {
		return Route{}, &NoRouteError{Blocks: req.Blocks, Uncovered: uncovered}
	}
	for b, sum := 0, int32(0); b <= n; b++ { // counts to offsets
		at[b], sum = sum, sum+at[b]
	}

	var from []float64
	var fromHeight, fromAdj float64
	dims := 0
	if req.HaveFrom && ValidateCoordinate(req.From) == nil {
		from, fromHeight, fromAdj = req.From.Vec, req.From.Height, req.From.Adjustment
		dims = len(from)
	}
	rs := routePool.Get().(*routeSearch)
	defer func() {
		clear(rs.rc) // keep none of the caller's data
		routePool.Put(rs)
	}()
	rs.reset(len(order), int(at[n]), start, end, at)
	fill := slices.Clone(at[:n])
	for k, i := range order {
		c := &cands[i]
		r := &rs.rc[k]
		r.id, r.lo, r.hi = c.Peer, max(c.Start, start), min(c.End, end)
		if c.Coord != nil && (dims == 0 || len(c.Coord.Vec) == dims) && ValidateCoordinate(*c.Coord) == nil {
			r.vec, r.height, r.adj = c.Coord.Vec, c.Coord.Height, c.Coord.Adjustment
			dims = len(r.vec)
			r.sigma = (r.height + min(r.adj, 0)) * 1e6
		}
		if req.Self == "" || c.Peer != req.Self {
			r.ret = routeEdge(from, fromHeight, fromAdj, r.vec, r.height, r.adj)
		}
		load := float64(max(c.Load.InFlight, 0)) + float64(max(c.Load.Queued, 0))
		r.jit = 1
		if req.Rand != nil {
			r.jit = math.Exp(RouteSpread * req.Rand.NormFloat64())
		}
		scale := tokens * (1 + load/RouteLoadSlots) * r.jit
		last := int32(-1)
		for b := r.lo; b < r.hi; b++ {
			s := fill[b-start]
			fill[b-start]++
			rs.cand[s], rs.stay[s], rs.cost[s] = int32(k), last, c.BlockMicros[b-c.Start]*scale
			last = s
		}
	}
	rs.np = routeSetPivots(rs.rc, from)

	rs.lowerBounds()
	ub := rs.hubBound()
	cost, last := rs.search(ub + 1e-9*ub + 1e-6) // the slack covers rounding
	if req.Rand != nil {
		// Report the route's cost without the perturbation.
		for s := last; s >= 0; s = rs.prev[s] {
			if f := rs.rc[rs.cand[s]].jit; f != 1 {
				cost += rs.cost[s]/f - rs.cost[s]
			}
		}
	}
	return Route{Hops: rs.hops(last), Cost: time.Duration(math.Round(cost * 1e3))}, nil
}

// routeSetPivots picks up to routePivots points, the requester's
// coordinate first if known, then each time the known candidate farthest
// from the pivots so far, and sets the candidates' distances to them. It
// returns how many it picked.
func routeSetPivots(rc []routeCand, from []float64) int {
	n := 0
	add := func(z []float64) {
		for k := range rc {
			if r := &rc[k]; r.vec != nil {
				r.pivot[n] = routeDist(r.vec, z)
			}
		}
		n++
	}
	if from != nil {
		add(from)
	}
	for n < routePivots {
		far, farD := -1, -1.0
		for k := range rc {
			r := &rc[k]
			if r.vec == nil {
				continue
			}
			near := math.Inf(1) // to the nearest pivot
			for j := range n {
				near = min(near, r.pivot[j])
			}
			if near > farD {
				far, farD = k, near
			}
		}
		if far < 0 || farD == 0 {
			break
		}
		add(rc[far].vec)
	}
	return n
}

// routeDist is the Euclidean distance of two positions in seconds, in µs.
func routeDist(a, b []float64) float64 {
	sum := 0.0
	for i := range a {
		x := a[i] - b[i]
		sum += x * x
	}
	return math.Sqrt(sum) * 1e6
}

// routeSearch is the state of one PlanRoute search. A state is (k, b):
// candidate k has just run block b. The states are numbered block by
// block, and within a block in candidate (peer ID) order. Costs are in µs.
type routeSearch struct {
	rc         []routeCand
	np         int // pivots
	start, end int
	at         []int32   // the states of block b are at[b-start] to at[b-start+1]
	cand       []int32   // per state, its candidate
	stay       []int32   // per state, that of the same candidate a block before; -1 if none
	cost       []float64 // per state, the compute of its block
	lb         []float64 // per state, a lower bound of the cost left after it
	d          []float64 // per state, the cost so far; +Inf when pruned
	prev       []int32   // per state, the one before; -1: the requester
	g          []float64 // scratch per candidate
	senders    []routeSender
}

// routePool recycles the search's memory across calls.
var routePool = sync.Pool{New: func() any { return new(routeSearch) }}

// reset sizes the search for candidates and states, clearing the
// candidates; the per-state slices are written before they are read.
func (rs *routeSearch) reset(cands, states, start, end int, at []int32) {
	grow := func(s []int32) []int32 { return slices.Grow(s[:0], states)[:states] }
	growF := func(s []float64) []float64 { return slices.Grow(s[:0], states)[:states] }
	rs.rc = slices.Grow(rs.rc[:0], cands)[:cands]
	clear(rs.rc)
	rs.g = slices.Grow(rs.g[:0], cands)[:cands]
	rs.start, rs.end, rs.at, rs.np = start, end, at, 0
	rs.cand, rs.stay, rs.prev = grow(rs.cand), grow(rs.stay), grow(rs.prev)
	rs.cost, rs.lb, rs.d = growF(rs.cost), growF(rs.lb), growF(rs.d)
	rs.senders = rs.senders[:0]
}

// routeSender is a state offered to the next block.
type routeSender struct {
	d    float64
	s, k int32
}

// routeOverhead is RouteHopOverhead in µs: no edge between two peers is
// cheaper.
const routeOverhead = float64(RouteHopOverhead) / 1e3

// routeUnknownEdge is the cost of an edge from or to a peer of unknown
// coordinate, µs.
var routeUnknownEdge = routeEdge(nil, 0, 0, nil, 0, 0)

// routeRounding is what routeEdge's rounding to nanoseconds may take off
// an RTT, µs, with a margin.
const routeRounding = 2e-3

// states returns the first and last+1 states of block b.
func (rs *routeSearch) states(b int) (int32, int32) {
	return rs.at[b-rs.start], rs.at[b-rs.start+1]
}

// routePieces accumulates, over the states a block hands off from or to,
// what the lower bound of an edge needs. Through a pivot z, for known
// coordinates,
//
//	edge(p, q) >= routeOverhead + (|d(p, z) - d(q, z)| + sigma(p) + sigma(q) - routeRounding)/2
//
// (the triangle inequality, serf's heights and negative adjustments), and
// min over p of v(p) + |x(p) - x(q)|/2 >= max(x(q)/2 + min(v(p) - x(p)/2),
// min(v(p) + x(p)/2) - x(q)/2): two minima per pivot give a bound for
// every q at once.
type routePieces struct {
	np             int
	unknown        float64 // the least v among unknown coordinates
	known1, known2 float64 // the two least v among known ones
	knownK         int32   // the candidate of known1
	left, right    [routePivots]float64
}

func (pc *routePieces) reset(np int) {
	inf := math.Inf(1)
	*pc = routePieces{np: np, unknown: inf, known1: inf, known2: inf, knownK: -1}
	for j := range np {
		pc.left[j], pc.right[j] = inf, inf
	}
}

func (pc *routePieces) add(v float64, k int32, r *routeCand) {
	if r.vec == nil {
		pc.unknown = min(pc.unknown, v)
		return
	}
	switch {
	case v < pc.known1:
		pc.known1, pc.known2, pc.knownK = v, pc.known1, k
	case v < pc.known2:
		pc.known2 = v
	}
	v += r.sigma / 2
	for j := range pc.np {
		if l := v - r.pivot[j]/2; l < pc.left[j] {
			pc.left[j] = l
		}
		if h := v + r.pivot[j]/2; h < pc.right[j] {
			pc.right[j] = h
		}
	}
}

// bound returns a lower bound of min over the added p != k of v(p) +
// edge(p, k), or, as soon as it finds that bound to be at least useless,
// some value >= useless.
func (pc *routePieces) bound(k int32, r *routeCand, useless float64) float64 {
	floor := pc.known1
	if k == pc.knownK {
		floor = pc.known2
	}
	if r.vec == nil {
		return routeUnknownEdge + min(pc.unknown, floor)
	}
	// min(u, the bound through known senders): once the latter reaches
	// lim, the result is lim or useless.
	lim := min(useless, routeUnknownEdge+pc.unknown)
	m := routeOverhead + floor
	if m >= lim {
		return lim
	}
	base := routeOverhead + (r.sigma-routeRounding)/2
	for j := range pc.np {
		h := r.pivot[j] / 2
		y := h + pc.left[j]
		if z := pc.right[j] - h; z > y {
			y = z
		}
		if y += base; y >= lim {
			return lim
		} else if y > m {
			m = y
		}
	}
	return m
}

// lowerBounds fills lb, backwards: lb(k, b) is at most the cost of any
// way to finish from (k, b), the last edge included:
//
//	lb(k, b) = min(g(k) if k serves b+1, min over q != k of edge(k, q) + g(q))
//
// with g(q) = compute(q, b+1) + lb(q, b+1) over the servers q of block b+1,
// and the edges bounded from below by routePieces.
func (rs *routeSearch) lowerBounds() {
	g := rs.g // per candidate, g at the block after
	var pc routePieces
	lo, hi := rs.states(rs.end - 1)
	for s := lo; s < hi; s++ {
		rs.lb[s] = rs.rc[rs.cand[s]].ret
	}
	for b := rs.end - 2; b >= rs.start; b-- {
		pc.reset(rs.np)
		for t := lo; t < hi; t++ { // the states of b+1
			k := rs.cand[t]
			g[k] = rs.cost[t] + rs.lb[t]
			pc.add(g[k], k, &rs.rc[k])
		}
		lo, hi = rs.states(b)
		for s := lo; s < hi; s++ {
			k := rs.cand[s]
			r := &rs.rc[k]
			stay := math.Inf(1)
			if r.hi > b+1 {
				stay = g[k]
			}
			rs.lb[s] = min(stay, pc.bound(k, r, stay))
		}
	}
}

// hubBound returns the cost of a good route found cheaply, to prune the
// search: the same dynamic program, but hand-offs into a block come only
// from the cheapest state of the block before (or the second cheapest,
// not to hand off to oneself).
func (rs *routeSearch) hubBound() float64 {
	d, inf := rs.d, math.Inf(1)
	lo, hi := rs.states(rs.start)
	for s := lo; s < hi; s++ {
		d[s] = rs.rc[rs.cand[s]].ret + rs.cost[s]
	}
	for b := rs.start + 1; b < rs.end; b++ {
		best, second := int32(-1), int32(-1)
		for s := lo; s < hi; s++ {
			switch {
			case best < 0 || d[s] < d[best]:
				best, second = s, best
			case second < 0 || d[s] < d[second]:
				second = s
			}
		}
		lo, hi = rs.states(b)
		for t := lo; t < hi; t++ {
			k := rs.cand[t]
			v := inf
			if st := rs.stay[t]; st >= 0 {
				v = d[st]
			}
			h := best
			if rs.cand[h] == k {
				h = second
			}
			if h >= 0 && d[h]+routeOverhead < v {
				if e, ok := routeEdgeBelow(&rs.rc[rs.cand[h]], &rs.rc[k], v-d[h]); ok {
					v = min(v, d[h]+e)
				}
			}
			d[t] = v + rs.cost[t]
		}
	}
	ub := inf
	for s := lo; s < hi; s++ {
		ub = min(ub, d[s]+rs.rc[rs.cand[s]].ret)
	}
	return ub
}

// search runs the dynamic program over the blocks, keeping only the states
// that may lie on a route that costs less than limit (d + lb < limit), and
// returns the best cost and the last state of the best route.
func (rs *routeSearch) search(limit float64) (float64, int32) {
	d, prev, inf := rs.d, rs.prev, math.Inf(1)
	lo, hi := rs.states(rs.start)
	for s := lo; s < hi; s++ {
		d[s], prev[s] = inf, -1
		if v := rs.rc[rs.cand[s]].ret + rs.cost[s]; v+rs.lb[s] < limit {
			d[s] = v
		}
	}
	senders := rs.senders
	defer func() { rs.senders = senders }()
	var pc routePieces
	for b := rs.start + 1; b < rs.end; b++ {
		senders = senders[:0]
		pc.reset(rs.np)
		for s := lo; s < hi; s++ {
			if d[s] == inf {
				continue
			}
			k := rs.cand[s]
			r := &rs.rc[k]
			senders = append(senders, routeSender{d: d[s], s: s, k: k})
			pc.add(d[s], k, r)
		}
		slices.SortFunc(senders, func(x, y routeSender) int {
			if c := cmp.Compare(x.d, y.d); c != 0 {
				return c
			}
			return cmp.Compare(x.k, y.k)
		})
		lo, hi = rs.states(b)
		for t := lo; t < hi; t++ {
			q := rs.cand[t]
			rq := &rs.rc[q]
			// The state survives if its cost before block b is below thr.
			thr := limit - rs.cost[t] - rs.lb[t]
			best, pred := inf, int32(-1)
			if st := rs.stay[t]; st >= 0 && d[st] < thr {
				best, pred = d[st], st
			}
			if g := pc.bound(q, rq, min(best, thr)); g < min(best, thr) {
				best, pred = rs.scan(senders, q, rq, best, pred, thr)
			}
			d[t], prev[t] = inf, pred
			if pred >= 0 {
				d[t] = best + rs.cost[t]
			}
		}
	}
	best, last := inf, int32(-1)
	for s := lo; s < hi; s++ {
		if v := d[s] + rs.rc[rs.cand[s]].ret; v < best {
			best, last = v, s
		}
	}
	return best, last
}

// scan looks for a hand-off into candidate q cheaper than best and thr,
// among the senders in increasing cost.
func (rs *routeSearch) scan(senders []routeSender, q int32, rq *routeCand, best float64, pred int32, thr float64) (float64, int32) {
	for _, p := range senders {
		lim := min(best, thr)
		if p.d+routeOverhead >= lim {
			break // no edge is cheaper than the overhead
		}
		if p.k == q {
			continue
		}
		if e, ok := routeEdgeBelow(&rs.rc[p.k], rq, lim-p.d); ok && p.d+e < lim {
			best, pred = p.d+e, p.s
		}
	}
	return best, pred
}

// routeEdgeBelow returns edge(p, q) if it may be below lim, and false as
// soon as it finds it cannot be: the edge is at least routeOverhead +
// (distance + sigma(p) + sigma(q))/2, and the distance only grows as the
// dimensions add up.
func routeEdgeBelow(p, q *routeCand, lim float64) (float64, bool) {
	if p.vec == nil || q.vec == nil || len(p.vec) != len(q.vec) {
		return routeUnknownEdge, routeUnknownEdge < lim
	}
	cut := 2*(lim-routeOverhead) - p.sigma - q.sigma + routeRounding
	if cut <= 0 {
		return 0, false
	}
	cut *= 1e-6 // seconds
	cut *= cut
	sum := 0.0
	for i, x := range p.vec {
		x -= q.vec[i]
		if sum += x * x; sum >= cut {
			return 0, false
		}
	}
	return routeEdgeOf(sum, p.height, p.adj, q.height, q.adj), true
}

// hops walks back from the last state, a block at a time; a change of
// candidate (or the requester) starts a hop.
func (rs *routeSearch) hops(last int32) []Hop {
	var hops []Hop
	hopEnd := rs.end
	for s, b := last, rs.end-1; s >= 0; s, b = rs.prev[s], b-1 {
		k := rs.cand[s]
		if p := rs.prev[s]; p < 0 || rs.cand[p] != k {
			hops = append(hops, Hop{Peer: rs.rc[k].id, Start: b, End: hopEnd})
			hopEnd = b
		}
	}
	slices.Reverse(hops)
	return hops
}

// usableCandidate reports whether a candidate's span and timings are well
// formed.
func usableCandidate(c *RouteCandidate) bool {
	if c.Start < 0 || c.End <= c.Start || len(c.BlockMicros) != c.End-c.Start {
		return false
	}
	for _, m := range c.BlockMicros {
		if !(m >= 0) || math.IsInf(m, 1) {
			return false
		}
	}
	return true
}

// routeEdge is the cost in µs of an edge between the holders of two
// coordinates (nil position: unknown): half the RTT that EstimateRTT gives
// (UnknownRouteRTT when it cannot) plus RouteHopOverhead. It computes what
// EstimateRTT does without allocating.
func routeEdge(av []float64, ah, aadj float64, bv []float64, bh, badj float64) float64 {
	if av == nil || bv == nil || len(av) != len(bv) {
		return float64(UnknownRouteRTT)/2e3 + routeOverhead
	}
	sum := 0.0
	for i := range av {
		x := av[i] - bv[i]
		sum += x * x
	}
	return routeEdgeOf(sum, ah, aadj, bh, badj)
}

// routeEdgeOf finishes routeEdge from the squared distance, as serf's
// DistanceTo does.
func routeEdgeOf(sum, ah, aadj, bh, badj float64) float64 {
	dist := math.Sqrt(sum) + ah + bh
	if adjusted := dist + aadj + badj; adjusted > 0 {
		dist = adjusted
	}
	rtt := time.Duration(dist * 1e9) // as serf rounds it
	return float64(rtt)/2e3 + routeOverhead
}
