package mesh

// Policy: the decisions a requester and a serving node take around routing
// and placement (which peers to leave out, how long to ban a failed one,
// where a session replays from, when to move), as pure functions. The node
// (client.go, node/join.go) and the simulator (simulations/) both call
// them, so that a simulated mesh behaves as the real one does.

import (
	"errors"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// Limits of route planning over large views.
const (
	// MaxRouteCandidates is the view size above which routing first keeps,
	// per block, the RoutePerBlock most promising candidates
	// (SelectCandidates): PlanRoute costs about 140 ns per (candidate,
	// block) state, so a view of 100k peers would take tens of ms a route,
	// and the far or slow peers it would scan never win anyway.
	MaxRouteCandidates = 1000
	// RoutePerBlock is how many candidates per block SelectCandidates keeps
	// for routing: enough that a few bans or busy peers still leave
	// several choices per block.
	RoutePerBlock = 16
)

// PlanRouteTiered is how a requester routes: PlanRoute with avoided and
// banned peers left out; when that leaves a block uncovered, with only the
// banned ones left out; then with none. Avoided and banned peers are
// preferences, let back in rather than the request failing. A view larger
// than MaxRouteCandidates is cut to the RoutePerBlock best candidates per
// block (SelectCandidates) for each tier. req.Exclude is ignored.
func PlanRouteTiered(cands []RouteCandidate, req RouteRequest, avoid, banned map[peer.ID]bool) (Route, error) {
	return PlanRouteInView(cands, len(cands), req, avoid, banned)
}

// PlanRouteTrusting is how a requester routes over its view: PlanRouteTiered
// over the peers it trusts and, when they cannot cover the request, again
// with the peers it distrusts (it failed to reach them since their last
// record) whose ban has lapsed and that are not avoided, as a last resort:
// a dial that timed out on a busy machine does not prove a peer dead, and a
// route through it may still work where no other exists. A distrusted peer
// still banned failed too recently to be worth a try: without a route the
// requester waits and asks again (the view learns of new peers meanwhile)
// rather than spend its failovers on it.
func PlanRouteTrusting(trusted, distrusted []RouteCandidate, req RouteRequest, avoid, banned map[peer.ID]bool) (Route, error) {
	r, err := PlanRouteTiered(trusted, req, avoid, banned)
	if !errors.Is(err, ErrNoRoute) {
		return r, err
	}
	all := slices.Clip(trusted)
	for _, c := range distrusted {
		if !banned[c.Peer] && !avoid[c.Peer] {
			all = append(all, c)
		}
	}
	if len(all) > len(trusted) {
		r, err = PlanRouteTiered(all, req, avoid, banned)
	}
	return r, err
}

// PlanRouteInView is PlanRouteTiered over cands drawn from a view of
// viewSize candidates: the selection applies when the view is larger than
// MaxRouteCandidates, as it would over the view itself. When cands holds,
// for every block, the RoutePerBlock candidates SelectCandidates would keep
// from the whole view under each tier's exclusions (a SelectCandidates of
// the view with a larger perBlock, from a nearby point, does in practice),
// the answer is the same as over the view, at a fraction of the cost; with
// req.Rand, under the same draws too (PlanRoute draws one per usable
// candidate, and both see the same ones).
func PlanRouteInView(cands []RouteCandidate, viewSize int, req RouteRequest, avoid, banned map[peer.ID]bool) (Route, error) {
	both := banned
	if len(avoid) > 0 {
		both = make(map[peer.ID]bool, len(avoid)+len(banned))
		for p := range avoid {
			both[p] = true
		}
		for p := range banned {
			both[p] = true
		}
	}
	// A tier that leaves out no more than the next one is skipped.
	var tiers []map[peer.ID]bool
	if len(avoid) > 0 {
		tiers = append(tiers, both)
	}
	if len(banned) > 0 {
		tiers = append(tiers, banned)
	}
	tiers = append(tiers, nil)
	var r Route
	var err error
	for _, exclude := range tiers {
		req.Exclude = exclude
		c := cands
		if viewSize > MaxRouteCandidates {
			c = SelectCandidates(cands, req, RoutePerBlock)
		}
		if r, err = PlanRoute(c, req); !errors.Is(err, ErrNoRoute) {
			break
		}
	}
	return r, err
}

// SelectCandidates keeps, for each block of req's range, the perBlock
// usable candidates not in req.Exclude with the lowest estimated cost of
// running that block as a first hop (edge from the requester plus the
// block's compute under the candidate's load, as in PlanRoute's cost
// model; ties to the lower peer ID, then the earlier candidate), and
// returns their union in the order of cands. Near, fast, idle peers are
// what a route is made of; a peer that is not among the best perBlock for
// any block it serves wins only when its edges to the hops around it make
// up for it, which they rarely do by much (TestSelectCandidates measures
// it). It costs one pass over the candidates' blocks, with a bounded heap
// per block. It does not modify its arguments.
func SelectCandidates(cands []RouteCandidate, req RouteRequest, perBlock int) []RouteCandidate {
	return selectCandidates(cands, req, perBlock, 0)
}

// SelectCandidatesAround returns a superset of SelectCandidates(cands, r,
// perBlock) for every request r that differs from req only by a From
// within radius of req.From (the Euclidean distance of the positions, in
// RTT; the same height and adjustment): per block, every candidate whose
// score is within radius of the perBlock-th best, since moving the
// requester by radius changes an edge by at most radius/2 (the triangle
// inequality). A simulator draws the candidates of many requesters near
// one point from a view of 100k peers this way, once.
func SelectCandidatesAround(cands []RouteCandidate, req RouteRequest, perBlock int, radius time.Duration) []RouteCandidate {
	return selectCandidates(cands, req, perBlock, max(float64(radius)/1e3, 0))
}

// selectCandidates keeps per block the candidates at most slack µs worse
// than the perBlock-th best (with no slack: the perBlock best).
func selectCandidates(cands []RouteCandidate, req RouteRequest, perBlock int, slack float64) []RouteCandidate {
	start, end := req.Start, req.End
	if end == 0 {
		end = req.Blocks
	}
	if perBlock < 1 || start < 0 || end <= start {
		return nil
	}
	var from []float64
	var fh, fadj float64
	if req.HaveFrom && ValidateCoordinate(req.From) == nil {
		from, fh, fadj = req.From.Vec, req.From.Height, req.From.Adjustment
	}
	tokens := float64(max(req.Tokens, 1))
	// edge[i] is candidate i's first edge, µs, NaN when it is left out;
	// scale[i] what its block times are multiplied by (tokens, load).
	edge := make([]float64, len(cands))
	scale := make([]float64, len(cands))
	score := func(i, b int) float64 {
		c := &cands[i]
		return edge[i] + c.BlockMicros[b-c.Start]*scale[i]
	}
	heaps := make([]selectHeap, end-start)
	for i := range cands {
		c := &cands[i]
		if req.Exclude[c.Peer] || c.End <= start || c.Start >= end || !usableCandidate(c) {
			edge[i] = math.NaN()
			continue
		}
		load := float64(max(c.Load.InFlight, 0)) + float64(max(c.Load.Queued, 0))
		scale[i] = tokens * (1 + load/RouteLoadSlots)
		edge[i] = routeUnknownEdge
		if req.Self != "" && c.Peer == req.Self {
			edge[i] = 0
		} else if c.Coord != nil && from != nil && len(c.Coord.Vec) == len(from) && ValidateCoordinate(*c.Coord) == nil {
			edge[i] = routeEdge(from, fh, fadj, c.Coord.Vec, c.Coord.Height, c.Coord.Adjustment)
		}
		for b := max(c.Start, start); b < min(c.End, end); b++ {
			heaps[b-start].offer(selectItem{score: score(i, b), peer: c.Peer, idx: int32(i)}, perBlock)
		}
	}
	keep := make([]bool, len(cands))
	if slack == 0 {
		for _, h := range heaps {
			for _, it := range h {
				keep[it.idx] = true
			}
		}
	} else {
		limit := make([]float64, len(heaps))
		for b, h := range heaps {
			limit[b] = math.Inf(1)
			if len(h) == perBlock {
				limit[b] = h[0].score + slack + routeRounding
			}
		}
		for i := range cands {
			c := &cands[i]
			if math.IsNaN(edge[i]) {
				continue
			}
			for b := max(c.Start, start); b < min(c.End, end); b++ {
				if score(i, b) <= limit[b-start] {
					keep[i] = true
					break
				}
			}
		}
	}
	var out []RouteCandidate
	for i, k := range keep {
		if k {
			out = append(out, cands[i])
		}
	}
	return out
}

type selectItem struct {
	score float64
	peer  peer.ID
	idx   int32
}

// worse orders items by score, then peer ID, then index: the worst first.
func (a selectItem) worse(b selectItem) bool {
	if a.score != b.score {
		return a.score > b.score
	}
	if a.peer != b.peer {
		return a.peer > b.peer
	}
	return a.idx > b.idx
}

// selectHeap is a max-heap (worst on top) of at most n items.
type selectHeap []selectItem

func (h *selectHeap) offer(it selectItem, n int) {
	s := *h
	if len(s) < n {
		s = append(s, it)
		for i := len(s) - 1; i > 0; { // sift up
			p := (i - 1) / 2
			if !s[i].worse(s[p]) {
				break
			}
			s[i], s[p] = s[p], s[i]
			i = p
		}
		*h = s
		return
	}
	if !s[0].worse(it) {
		return
	}
	s[0] = it
	for i := 0; ; { // sift down
		l, w := 2*i+1, i
		if l < len(s) && s[l].worse(s[w]) {
			w = l
		}
		if r := l + 1; r < len(s) && s[r].worse(s[w]) {
			w = r
		}
		if w == i {
			break
		}
		s[i], s[w] = s[w], s[i]
		i = w
	}
}

// FailureKind classifies a failed hop, for how long it is banned.
type FailureKind int

const (
	// FailBusy: the peer answered busy; worth trying again soon.
	FailBusy FailureKind = iota
	// FailStall: no answer within the step timeout; slow or dead.
	FailStall
	// FailRefused: it answered with a refusal (no such session, bad
	// request...).
	FailRefused
	// FailHard: unreachable, its neighbour could not reach it, or it
	// answered garbage: also distrusted until it publishes again.
	FailHard
)

// Bans after a failure: a busy peer is worth trying again soon, a stalled
// one a little later, one that failed otherwise (unreachable, wrong
// answers) much later. Each repeated failure doubles the ban, up to MaxBan.
const (
	BusyBan  = time.Second
	StallBan = 5 * time.Second
	HardBan  = 30 * time.Second
	MaxBan   = 10 * time.Minute
)

// ErrStall is a step that got no answer in time from the hop blamed.
var ErrStall = errors.New("step timed out")

// ClassifyFailure says what kind of failure err is.
func ClassifyFailure(err error) FailureKind {
	var remote *protocol.RemoteError
	switch {
	case errors.Is(err, protocol.ErrBusy):
		return FailBusy
	case errors.Is(err, ErrStall):
		return FailStall
	case !errors.As(err, &remote), errors.Is(err, protocol.ErrUnreachable), errors.Is(err, protocol.ErrBadOutput):
		return FailHard
	default:
		return FailRefused
	}
}

// BanDuration is how long a peer is left out of routes after its count-th
// failure (count >= 1) of the given kind: the kind's base, doubled for each
// earlier failure, at most MaxBan.
func BanDuration(kind FailureKind, count int) time.Duration {
	base := StallBan
	switch kind {
	case FailBusy:
		base = BusyBan
	case FailHard:
		base = HardBan
	}
	return min(base<<min(max(count, 1)-1, 8), MaxBan)
}

// Distrusts reports whether a failure of this kind keeps the peer out of
// the view until it publishes a newer record.
func Distrusts(kind FailureKind) bool { return kind == FailHard }

// RetryBase is the first pause before retrying a step that found no route;
// it doubles with each attempt up to 16 times.
const RetryBase = 100 * time.Millisecond

// RetryPause is the pause before retry attempt (0-based) of a step that
// found no route or no replacement: busy bans lapse, the view learns of new
// peers meanwhile.
func RetryPause(attempt int) time.Duration { return RetryBase << min(max(attempt, 0), 4) }

// ReplayFrom returns the first hop a session replaces when hop failed
// fails: replaying needs every past input of the first replaced hop, so
// when complete(h) says some of hop h's never reached the requester, it
// replaces from an earlier hop whose history is whole (the first hop's
// always is: it is what the requester sent).
func ReplayFrom(failed int, complete func(h int) bool) int {
	r := failed
	for r > 0 && !complete(r) {
		r--
	}
	return r
}

// ResumeFrom returns the hop at which a session resumes the step in flight
// after replacing hops from r on: r, or earlier when r's input for this step
// never arrived (the hops before it had not reported): the last hop at or
// before r whose input for the step is known (hop 0's always is).
func ResumeFrom(r int, known func(h int) bool) int {
	for r > 0 && !known(r) {
		r--
	}
	return r
}

// RebalanceMargin is how much a move must raise the mesh's bottleneck
// (throughput of its least-served block) before a node moves: 20%.
const RebalanceMargin = 1.2

// Rebalance is a serving node's periodic check: should it move from
// current to a better span? Loads change from one check to the next, and
// moving on them would make nodes chase each other, so it looks at speeds
// only (loads zeroed), with RebalanceMargin. It returns the span to serve
// (current when staying) and whether that is a move. cands is not
// modified.
func Rebalance(cands []RouteCandidate, req PlaceRequest, current [2]int) (Placement, bool) {
	zeroed := make([]RouteCandidate, len(cands))
	copy(zeroed, cands)
	for i := range zeroed {
		zeroed[i].Load = protocol.Load{}
	}
	p, move := ShouldMove(zeroed, req, current, RebalanceMargin)
	if !move {
		return Placement{Start: current[0], End: current[1], Bottleneck: p.Bottleneck, Before: p.Before, Reason: p.Reason}, false
	}
	return p, true
}

// BlockTotals are the per-block sums that Place and ShouldMove depend on:
// each block's total throughput over the candidates (passes per second,
// load as in the file comment of place.go) and how many serve it.
type BlockTotals struct {
	Tput  []float64
	Count []int
}

// AggregateCandidates turns per-block totals into one synthetic candidate
// per served block whose throughput is that block's total divided by
// scale, and returns scale too: pass Place and ShouldMove your MyMicros
// multiplied by scale. They see the rest of the mesh only through these
// totals, and their choices (leximin order, relative margins, unserved
// blocks) do not change when every throughput is divided by one factor,
// so they answer the same on the aggregate as on the candidates it sums,
// up to rounding, in O(Blocks) candidates instead of one per peer; their
// Bottleneck and Before are divided by scale. Scale (>= 1) keeps every
// synthetic block time at 2 µs or more, since Place clamps times under 1 µs.
// A block whose count is 0 gets no candidate (it stays unserved). The
// synthetic peer IDs are "~agg/<block>", never a real peer's (whose IDs
// are multihashes). It hides how many peers hold each block: for a
// PlaceRequest with Replicas > 1, use AggregateCopies.
func AggregateCandidates(t BlockTotals) ([]RouteCandidate, float64) {
	return AggregateCopies(t, 1)
}

// AggregateCopies is AggregateCandidates for a PlaceRequest that counts
// copies (Replicas > 1): block b gets min(Count[b], replicas) synthetic
// candidates, each with an equal share of its total, so that Place and
// ShouldMove see the same throughput per block and the same copy counts
// capped at replicas (all they weigh of copies) as on the candidates the
// totals sum. replicas under 1 counts as 1 (AggregateCandidates). The
// synthetic peer IDs are "~agg/<block>" for a block's first and
// "~agg/<block>/<k>" for its k-th.
func AggregateCopies(t BlockTotals, replicas int) ([]RouteCandidate, float64) {
	replicas = max(replicas, 1)
	scale := 1.0
	for b, tp := range t.Tput {
		if t.Count[b] > 0 && tp > 0 && !math.IsInf(tp, 1) {
			scale = max(scale, tp/5e5)
		}
	}
	ids := aggPeerIDs(len(t.Tput), replicas)
	out := make([]RouteCandidate, 0, len(t.Tput))
	micros := make([]float64, len(t.Tput))
	for b, tp := range t.Tput {
		if t.Count[b] <= 0 || !(tp > 0) {
			continue
		}
		k := min(t.Count[b], replicas)
		micros[b] = scale * 1e6 * float64(k) / tp
		for i := range k {
			out = append(out, RouteCandidate{Peer: ids[b][i], Start: b, End: b + 1, BlockMicros: micros[b : b+1]})
		}
	}
	return out, scale
}

// aggPeers caches the synthetic IDs of AggregateCopies: per block, its
// copies'.
var aggPeers struct {
	sync.Mutex
	ids [][]peer.ID
}

// aggPeerIDs returns the synthetic IDs of blocks [0, blocks), replicas
// of each at least (see AggregateCopies).
func aggPeerIDs(blocks, replicas int) [][]peer.ID {
	aggPeers.Lock()
	defer aggPeers.Unlock()
	for len(aggPeers.ids) < blocks {
		aggPeers.ids = append(aggPeers.ids, nil)
	}
	for b := range blocks {
		ids := aggPeers.ids[b]
		if len(ids) >= replicas {
			continue
		}
		ids = slices.Clone(ids) // a caller may be reading the old one
		for len(ids) < replicas {
			id := "~agg/" + strconv.Itoa(b)
			if len(ids) > 0 {
				id += "/" + strconv.Itoa(len(ids))
			}
			ids = append(ids, peer.ID(id))
		}
		aggPeers.ids[b] = ids
	}
	return slices.Clone(aggPeers.ids[:blocks]) // the inner slices are never written again
}

// Accusations. A hop may report a fault of another hop (the next one
// unreachable, the previous one's activations malformed), but its word is
// no proof: a hostile hop could frame an honest one. A requester bans a
// peer only on its own report or the requester's own observation (a stall
// at it, a result refused, a connection lost); a report about another peer
// is an accusation, kept here until the evidence settles it: confirmed
// when the requester then sees the accused fail by itself, refuted when
// the accused does its part in a step that succeeds. A peer whose
// accusations were refuted more often than confirmed is a liar: its
// reports are not believed and it is routed around.

// AccusationWindow is how long an accusation waits to be confirmed or
// refuted before it is forgotten (counting neither way).
const AccusationWindow = 10 * time.Minute

// Bounds of an Accusations ledger: accusations pending against one peer,
// and the accusers it keeps a tally of (past it, those in good standing
// are forgotten).
const (
	maxPendingAccusations = 64
	maxAccusers           = 4096
)

// ErrFalseAccusation is the fault of a peer whose reports of other peers'
// faults were refuted more often than confirmed: it is banned and
// distrusted as for a hard failure.
var ErrFalseAccusation = errors.New("reported faults of other hops that the evidence refuted")

// Accusations is a requester's ledger of the faults hops reported about
// other hops. The zero value is ready; it is safe for concurrent use. It
// reads no clock: callers pass the time.
type Accusations struct {
	mu      sync.Mutex
	pending map[peer.ID][]accusation // by accused
	tally   map[peer.ID]*accuserTally
}

type accusation struct {
	by peer.ID
	at time.Time
}

type accuserTally struct{ right, wrong int }

// Accuse records that accuser reported a fault of accused at now.
func (a *Accusations) Accuse(accuser, accused peer.ID, now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.pending == nil {
		a.pending, a.tally = map[peer.ID][]accusation{}, map[peer.ID]*accuserTally{}
	}
	list := slices.DeleteFunc(a.pending[accused], func(x accusation) bool { return now.Sub(x.at) > AccusationWindow })
	if len(list) >= maxPendingAccusations {
		list = list[1:]
	}
	a.pending[accused] = append(list, accusation{by: accuser, at: now})
	if _, ok := a.tally[accuser]; !ok {
		if len(a.tally) >= maxAccusers {
			for p, t := range a.tally {
				if t.wrong <= t.right {
					delete(a.tally, p)
				}
			}
		}
		a.tally[accuser] = &accuserTally{}
	}
}

// Confirm settles the pending accusations of accused as right: the
// requester saw it fail by itself.
func (a *Accusations) Confirm(accused peer.ID, now time.Time) {
	a.settle(accused, now, true)
}

// Refute settles the pending accusations of accused as wrong: it did its
// part in a step that succeeded. It returns the accusers this makes liars
// (Liar turns true).
func (a *Accusations) Refute(accused peer.ID, now time.Time) []peer.ID {
	return a.settle(accused, now, false)
}

func (a *Accusations) settle(accused peer.ID, now time.Time, right bool) (liars []peer.ID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	list := a.pending[accused]
	if len(list) == 0 {
		return nil
	}
	delete(a.pending, accused)
	for _, x := range list {
		t := a.tally[x.by]
		if t == nil || now.Sub(x.at) > AccusationWindow {
			continue
		}
		was := t.wrong > t.right
		if right {
			t.right++
		} else {
			t.wrong++
		}
		if !was && t.wrong > t.right {
			liars = append(liars, x.by)
		}
	}
	return liars
}

// Liar reports whether p's accusations were refuted more often than
// confirmed.
func (a *Accusations) Liar(p peer.ID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	t := a.tally[p]
	return t != nil && t.wrong > t.right
}

// Tally returns how many of p's accusations were confirmed and refuted.
func (a *Accusations) Tally(p peer.ID) (right, wrong int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if t := a.tally[p]; t != nil {
		return t.right, t.wrong
	}
	return 0, 0
}

// Progress deadlines: a requester does not wait the whole step timeout to
// learn that a hop is dead. Once the hop before it has reported (or, for
// the first hop, once the request is sent), a hop must report progress or
// its result within HopProgressTimeout, or it is failed over as stalled.
// The step timeout remains the outer bound of the whole step.
const (
	// ProgressFloor is the least time a hop is given, whatever its
	// advertised speed: scheduling, garbage collection, opening a stream
	// to the next hop (milliseconds when alive) and a loaded machine's
	// jitter all fit in it.
	ProgressFloor = 2 * time.Second
	// ProgressColdFloor replaces ProgressFloor for a hop this node has not
	// yet seen complete a step on that span with that next hop: it may be
	// loading the span (a sub-span of what it serves is loaded on demand),
	// opening the session's state, or dialling its successor (up to
	// linkDialTimeout).
	ProgressColdFloor = 10 * time.Second
	// ProgressFactor multiplies a hop's advertised compute time for its
	// span (the sum of its block_micros, times the step's tokens): a hop
	// at its limit of steps in flight on a busy CPU, or whose timing was
	// measured idle, computes several times slower than it advertises.
	ProgressFactor = 10
	// ProgressUnknownRTT is the round trip assumed for a hop whose RTT
	// cannot be estimated from coordinates.
	ProgressUnknownRTT = 250 * time.Millisecond
)

// HopProgressTimeout is how long a requester waits for a hop's progress
// (or result) after the hop before it reported: floor, plus a round trip
// each way (request in, progress back), plus ProgressFactor times the
// hop's advertised compute time for the step, spanMicros (its span's
// block_micros summed) per token times tokens (a session's first step
// carries the whole prompt). A negative rtt is unknown.
func HopProgressTimeout(spanMicros float64, tokens int, rtt, floor time.Duration) time.Duration {
	if rtt < 0 {
		rtt = ProgressUnknownRTT
	}
	compute := spanMicros * float64(max(tokens, 1)) * ProgressFactor * float64(time.Microsecond)
	if compute > float64(time.Hour) || compute != compute { // absurd claims are bounded by the step timeout anyway
		compute = float64(time.Hour)
	}
	return floor + 2*rtt + time.Duration(max(compute, 0))
}
