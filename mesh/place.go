package mesh

// Placement: which contiguous blocks of a model a node serves. Place and
// ShouldMove are pure functions of their arguments (no I/O, no clock, no
// randomness), so that the node and the simulator run the same code; the
// node adds the jitter between rebalancing checks.
//
// # Model
//
// The throughput of a peer for block b, in passes per second, is
//
//	tput(p, b) = 1e6 / BlockMicros[b] / load(p)
//	load(p)    = 1 + (InFlight + Queued) / RouteLoadSlots
//
// (the load factor of the route cost model; a block time under 1 µs counts
// as 1 µs). The mesh's throughput for block b is the sum over the peers that
// serve it, 0 for a block nobody serves, and the mesh's bottleneck is the
// minimum over all blocks: a pipeline runs no faster than its weakest
// block. This is the idea of Petals' block_selection: a joining node serves
// the contiguous blocks where throughput is short.
//
// # Choice
//
// Place tries every start of a span of req.Span blocks and keeps the one
// whose per-block totals after placing, sorted in increasing order, are
// lexicographically largest (leximin): first the highest bottleneck, then,
// among equal bottlenecks, the highest second-weakest block, and so on.
// Blocks nobody serves count as 0, so a placement covering more of them
// wins. Remaining ties go to the lowest start. Totals within a relative
// 1e-9 of each other count as equal, so rounding does not decide. The
// candidates are sorted by peer ID before the sums, so the order in which
// they are given does not matter. The cost is O(Blocks² log Blocks).
//
// # Rebalancing
//
// ShouldMove compares the mesh with this node on its current span and on
// the best span (Place's). It moves only when the best span is better by
// the leximin order above and clearly so:
//
//   - some block is unserved, and the move leaves fewer unserved;
//   - or every block is served, and the move leaves fewer blocks under
//     margin times the current bottleneck: in particular when it raises
//     the bottleneck itself by the margin, but also
//     when the weak blocks are more than one span can lift (a run of
//     blocks served by one slow peer): each move then lifts part of them
//     and the bottleneck rises once the last part is, where a rule on the
//     bottleneck alone would never move anyone;
//
// and never when the move would uncover a block that the current span
// alone serves. With the rest of the mesh fixed, every move strictly
// improves the leximin order of the mesh's per-block totals, which has no
// cycles: a mesh whose nodes take turns (the node adds jitter so that they
// do) settles after finitely many moves, and its bottleneck never falls.
// Loads change the inputs between turns; the margin keeps small changes
// from moving anyone.
//
// # Copies
//
// Throughput alone lets every joining node widen the same well-served
// blocks while others rest on one node: when that node leaves, they are
// gone from the mesh. With PlaceRequest.Replicas = R > 1, a node counts as
// holding the blocks of its served span, and placement weighs copies
// before throughput: first the sorted per-block copy counts, each capped at
// R, compared leximin as above (so a span giving a second copy to blocks
// only one node holds beats one giving a third copy to others); then, among
// equal counts, the fewer further spans of this size it would take to give
// one more copy to every block still short of R (a span ending at the edge
// of a run of such blocks leaves one run to cover, not two); then
// throughput. ShouldMove moves when the capped copy counts get better by
// that leximin order, stays when they get worse, and weighs throughput as
// before when they are equal. Every move still raises a quantity all nodes
// see alike (capped copy counts, then throughput), so moves still settle,
// provided the nodes ask for the same R.
//
// # Spreading
//
// Nodes that join at the same moment see the same mesh and would all pick
// the same span. With PlaceRequest.Spread > 0, every start whose copy
// counts and further spans equal the best's and whose sorted throughputs
// are each within a relative Spread of the best's counts as equally good,
// and the choice among them goes to the highest hash of Self and the start
// (rendezvous hashing): deterministic for one node, different from node to
// node.

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"slices"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
)

// ErrBadPlaceRequest is returned by Place for a request with no blocks, a
// span under 1, or unusable timings of its own.
var ErrBadPlaceRequest = errors.New("bad place request")

// placeEps is the relative difference under which two throughputs count as
// equal.
const placeEps = 1e-9

// PlaceRequest describes the node choosing its span.
type PlaceRequest struct {
	// Blocks is the model's block count (> 0).
	Blocks int
	// Span is how many contiguous blocks this node can hold (>= 1), from
	// its memory and the block sizes. A span of Blocks or more serves all.
	Span int
	// MyMicros is this node's expected time of one pass through each block,
	// in µs: Blocks entries, or one entry for every block. Nil (or empty)
	// means the median of the BlockMicros the other candidates advertise
	// (1e6, one pass per second, when there are none).
	MyMicros []float64
	// Self is this node's peer ID: its own candidate, if listed, is left
	// out of the others (its current span is what ShouldMove weighs).
	Self peer.ID
	// Replicas is how many nodes should hold each block (see Copies in
	// the file comment). 0 or 1: copies are not counted, only whether a
	// block is served at all, through its throughput.
	Replicas int
	// Spread is the relative tolerance within which spans count as equally
	// good, the tie going to a hash of Self and the start (see Spreading).
	// 0: only exact ties, and they go to the lowest start.
	Spread float64
	// NoReason leaves Placement.Reason empty, for a caller that only acts
	// on the choice (the simulator, which places and rebalances peers by
	// the hundred thousand): the same choice, without the formatting.
	NoReason bool
}

// DefaultPlaceSpread is the Spread a node joining a live mesh uses: spans
// within 10% of the best count as equally good.
const DefaultPlaceSpread = 0.1

// Placement is a chosen span and why.
type Placement struct {
	// Start and End bound the blocks to serve, [Start, End).
	Start, End int
	// Bottleneck is the mesh's lowest block throughput (passes per second)
	// with this node on [Start, End); Before is the same without this node.
	Bottleneck, Before float64
	// Reason explains the choice in one line, for logs and `infermesh peers`.
	Reason string
}

// placeMesh is the rest of the mesh and this node, per block.
type placeMesh struct {
	blocks int
	others []float64 // total throughput of the other candidates
	mine   []float64 // this node's throughput
	guess  bool      // mine is the median of the others' (or a unit default)

	copies   []int // how many of the other candidates hold each block
	replicas int   // PlaceRequest.Replicas; copies count when > 1
	hist     []int // copyHist without this node (when counted)
	full     bool  // counted, and every block has Replicas copies already
	spread   float64
	self     peer.ID
	noReason bool
}

// newPlaceMesh checks req and sums the candidates' throughputs.
func newPlaceMesh(cands []RouteCandidate, req PlaceRequest) (*placeMesh, error) {
	if req.Blocks <= 0 || req.Span < 1 {
		return nil, fmt.Errorf("%w: span of %d blocks of a %d-block model", ErrBadPlaceRequest, req.Span, req.Blocks)
	}
	if req.Replicas < 0 || !(req.Spread >= 0) || math.IsInf(req.Spread, 1) {
		return nil, fmt.Errorf("%w: %d replicas, spread %v", ErrBadPlaceRequest, req.Replicas, req.Spread)
	}
	if n := len(req.MyMicros); n != 0 && n != 1 && n != req.Blocks {
		return nil, fmt.Errorf("%w: %d block timings for a %d-block model", ErrBadPlaceRequest, n, req.Blocks)
	}
	for _, m := range req.MyMicros {
		if !(m > 0) || math.IsInf(m, 1) {
			return nil, fmt.Errorf("%w: block timing %v", ErrBadPlaceRequest, m)
		}
	}

	// Usable candidates other than Self, sorted by peer ID, one per peer.
	order := make([]int, 0, len(cands))
	for i := range cands {
		if c := &cands[i]; c.Peer != req.Self && usableCandidate(c) && c.Start < req.Blocks {
			order = append(order, i)
		}
	}
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(cands[a].Peer, cands[b].Peer) })
	order = slices.CompactFunc(order, func(a, b int) bool { return cands[a].Peer == cands[b].Peer })

	pm := &placeMesh{blocks: req.Blocks, others: make([]float64, req.Blocks), mine: make([]float64, req.Blocks),
		copies: make([]int, req.Blocks), replicas: req.Replicas, spread: req.Spread, self: req.Self,
		noReason: req.NoReason}
	var all []float64 // advertised timings, for the median
	for _, i := range order {
		c := &cands[i]
		load := float64(max(c.Load.InFlight, 0)) + float64(max(c.Load.Queued, 0))
		f := 1 + load/RouteLoadSlots
		for b := c.Start; b < min(c.End, req.Blocks); b++ {
			m := c.BlockMicros[b-c.Start]
			pm.others[b] += 1e6 / max(m, 1) / f
			pm.copies[b]++
			if req.MyMicros == nil {
				all = append(all, m)
			}
		}
	}
	if pm.counted() {
		pm.hist = make([]int, pm.replicas+1)
		for _, c := range pm.copies {
			pm.hist[min(c, pm.replicas)]++
		}
		pm.full = pm.hist[pm.replicas] == pm.blocks
	}
	switch len(req.MyMicros) {
	case 0:
		pm.guess = true
		m := 1e6
		if len(all) > 0 {
			slices.Sort(all)
			m = all[len(all)/2]
			if len(all)%2 == 0 {
				m = (all[len(all)/2-1] + m) / 2
			}
		}
		for b := range pm.mine {
			pm.mine[b] = 1e6 / max(m, 1)
		}
	case 1:
		for b := range pm.mine {
			pm.mine[b] = 1e6 / max(req.MyMicros[0], 1)
		}
	default:
		for b, m := range req.MyMicros {
			pm.mine[b] = 1e6 / max(m, 1)
		}
	}
	return pm, nil
}

// sorted writes into buf the per-block totals with this node on
// [start, end) (none when start == end), in increasing order.
func (pm *placeMesh) sorted(start, end int, buf []float64) []float64 {
	buf = append(buf[:0], pm.others...)
	for b := start; b < end; b++ {
		buf[b] += pm.mine[b]
	}
	slices.Sort(buf)
	return buf
}

// placeCmp compares two throughputs, equal within placeEps.
func placeCmp(a, b float64) int {
	if math.Abs(a-b) <= placeEps*max(math.Abs(a), math.Abs(b)) {
		return 0
	}
	return cmp.Compare(a, b)
}

// placeLeximin compares two sorted vectors of totals: the first that differs
// decides.
func placeLeximin(a, b []float64) int {
	for i := range a {
		if c := placeCmp(a[i], b[i]); c != 0 {
			return c
		}
	}
	return 0
}

// placeZeros counts the blocks of a sorted vector of totals that nobody serves.
func placeZeros(v []float64) int {
	n := 0
	for n < len(v) && v[n] == 0 {
		n++
	}
	return n
}

// counted reports whether copies count (Replicas > 1).
func (pm *placeMesh) counted() bool { return pm.replicas > 1 }

// copyHist writes into buf the histogram of the per-block copy counts
// with this node on [start, end), each capped at Replicas: buf[k] blocks
// are held k times. Two histograms compare (placeCmpHist) as the sorted
// capped counts they stand for compare leximin, without sorting.
func (pm *placeMesh) copyHist(start, end int, buf []int) []int {
	buf = append(buf[:0], pm.hist...)
	for b := max(start, 0); b < min(end, pm.blocks); b++ {
		if c := pm.copies[b]; c < pm.replicas {
			buf[c]--
			buf[c+1]++
		}
	}
	return buf
}

// placeCmpHist compares two copy histograms of the same blocks as their
// sorted capped counts compare leximin: the first count that differs
// decides, fewer blocks at a lower count being better.
func placeCmpHist(a, b []int) int {
	for k := range a {
		if a[k] != b[k] {
			return cmp.Compare(b[k], a[k])
		}
	}
	return 0
}

// short counts the blocks held by fewer than Replicas nodes with this node
// on [start, end).
func (pm *placeMesh) short(start, end int) int {
	n := 0
	for b, c := range pm.copies {
		if b >= start && b < end {
			c++
		}
		if c < pm.replicas {
			n++
		}
	}
	return n
}

// need is how many further spans of n blocks it takes to give one more
// copy to every block held by fewer than Replicas nodes, with this node on
// [start, start+n): the runs of such blocks, each ceil(length/n) spans.
func (pm *placeMesh) need(start, n int) int {
	total, run := 0, 0
	for b := 0; b <= pm.blocks; b++ {
		if b < pm.blocks {
			c := pm.copies[b]
			if b >= start && b < start+n {
				c++
			}
			if c < pm.replicas {
				run++
				continue
			}
		}
		total += (run + n - 1) / n
		run = 0
	}
	return total
}

// placeOption is one start weighed by best.
type placeOption struct {
	start  int
	copies []int     // capped copy counts' histogram (nil when not counted)
	need   int       // further spans needed (0 when not counted)
	tput   []float64 // sorted totals
}

// placeCmpCopies compares two options on copies alone: capped counts
// leximin, then fewer further spans.
func placeCmpCopies(a, b *placeOption) int {
	if c := placeCmpHist(a.copies, b.copies); c != 0 {
		return c
	}
	return cmp.Compare(b.need, a.need)
}

// option weighs a span of n blocks from start, writing its vectors into
// tbuf and hbuf (nil: new ones).
func (pm *placeMesh) option(start, n int, tbuf []float64, hbuf []int) placeOption {
	o := placeOption{start: start, tput: pm.sorted(start, start+n, tbuf)}
	if pm.counted() && !pm.full { // full: every option's counts are the same, none short
		o.copies = pm.copyHist(start, start+n, hbuf)
		o.need = pm.need(start, n)
	}
	return o
}

// best returns the best start for a span of n blocks (copies, then
// leximin throughput; near-ties spread by Self), and the sorted totals with
// this node there.
func (pm *placeMesh) best(n int) (int, []float64) {
	m := pm.blocks - n + 1
	opts := make([]placeOption, 0, m)
	// One backing array each for the options' vectors.
	tbuf := make([]float64, m*pm.blocks)
	var hbuf []int
	if pm.counted() && !pm.full {
		hbuf = make([]int, m*(pm.replicas+1))
	}
	bi := 0
	for s := 0; s+n <= pm.blocks; s++ {
		var h []int
		if hbuf != nil {
			h = hbuf[s*(pm.replicas+1) : s*(pm.replicas+1) : (s+1)*(pm.replicas+1)]
		}
		opts = append(opts, pm.option(s, n, tbuf[s*pm.blocks:s*pm.blocks:(s+1)*pm.blocks], h))
		o, b := &opts[s], &opts[bi]
		if c := placeCmpCopies(o, b); c > 0 || c == 0 && placeLeximin(o.tput, b.tput) > 0 {
			bi = s
		}
	}
	if pm.spread > 0 && len(opts) > 1 {
		b := opts[bi]
		var top uint64
		found := false
		for i := range opts {
			o := &opts[i]
			if placeCmpCopies(o, &b) != 0 || !placeWithin(o.tput, b.tput, pm.spread) {
				continue
			}
			if h := placeHash(pm.self, o.start); !found || h > top {
				top, bi, found = h, i, true
			}
		}
	}
	return opts[bi].start, opts[bi].tput
}

// placeWithin reports whether every entry of a is within a relative tol of
// the same entry of b (both sorted totals).
func placeWithin(a, b []float64, tol float64) bool {
	for i := range a {
		if math.Abs(a[i]-b[i]) > tol*max(math.Abs(a[i]), math.Abs(b[i])) {
			return false
		}
	}
	return true
}

// placeHash is the rendezvous hash of a node and a start.
func placeHash(self peer.ID, start int) uint64 {
	h := fnv.New64a()
	h.Write([]byte(self))
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(start))
	h.Write(b[:])
	return h.Sum64()
}

// Place chooses the contiguous span of req.Span blocks that raises the
// mesh's bottleneck most (see the file comment), given the other
// candidates (req.Self is left out; malformed candidates, and all but the
// first of a peer listed more than once, are ignored; blocks at or past
// req.Blocks too). It returns an error wrapping ErrBadPlaceRequest for a bad
// request. Place does not modify its arguments and is safe for concurrent
// use.
func Place(cands []RouteCandidate, req PlaceRequest) (Placement, error) {
	pm, err := newPlaceMesh(cands, req)
	if err != nil {
		return Placement{}, err
	}
	return pm.place(req.Span), nil
}

func (pm *placeMesh) place(span int) Placement {
	n := min(span, pm.blocks)
	s, after := pm.best(n)
	p := Placement{Start: s, End: s + n, Bottleneck: after[0], Before: slices.Min(pm.others)}
	if pm.noReason {
		return p
	}
	var sb strings.Builder
	if n == pm.blocks {
		fmt.Fprintf(&sb, "serve all %d blocks", pm.blocks)
	} else {
		fmt.Fprintf(&sb, "serve blocks [%d, %d) of %d", p.Start, p.End, pm.blocks)
		var unserved []int
		weak := p.Start
		for b := p.Start; b < p.End; b++ {
			if pm.others[b] == 0 {
				unserved = append(unserved, b)
			}
			if pm.others[b] < pm.others[weak] {
				weak = b
			}
		}
		if unserved != nil {
			fmt.Fprintf(&sb, ", covering unserved blocks %s", routeBlockRanges(unserved))
		} else {
			fmt.Fprintf(&sb, ", the least served (block %d at %.4g passes/s)", weak, pm.others[weak])
		}
	}
	fmt.Fprintf(&sb, ": bottleneck %.4g -> %.4g passes/s", p.Before, p.Bottleneck)
	if pm.counted() {
		fmt.Fprintf(&sb, ", blocks held by fewer than %d nodes %d -> %d", pm.replicas, pm.short(0, 0), pm.short(p.Start, p.End))
	}
	if u := placeZeros(after); u > 0 {
		fmt.Fprintf(&sb, ", %d blocks still unserved", u)
	}
	if pm.guess {
		sb.WriteString(" (own speed assumed: the median of the mesh's)")
	}
	p.Reason = sb.String()
	return p
}

// ShouldMove reports whether this node, serving current ([start, end) of
// the model; an empty span means it serves nothing yet), should move to the
// best span, and returns that span's Placement with a Reason that explains
// the decision. margin is how much better the mesh must get (1.2: 20%;
// under 1 counts as 1). It answers true when the node serves nothing yet
// (it should place), and otherwise by the rules of the file comment:
// fewer unserved blocks, or fewer blocks under margin times the current
// bottleneck, never uncovering a block only the current span serves. It
// answers false for a bad request (see Place) and when the current span
// already is the best. The current span's length is taken as it is: a node
// whose capacity changed calls Place. Like Place, it is pure.
func ShouldMove(cands []RouteCandidate, req PlaceRequest, current [2]int, margin float64) (Placement, bool) {
	pm, err := newPlaceMesh(cands, req)
	if err != nil {
		return Placement{Reason: err.Error()}, false
	}
	best := pm.place(req.Span)
	// why formats a part of Reason (nothing with NoReason).
	why := func(format string, a ...any) string {
		if pm.noReason {
			return ""
		}
		return fmt.Sprintf(format, a...)
	}
	cs, ce := max(current[0], 0), min(current[1], pm.blocks)
	if ce <= cs {
		best.Reason = why("not serving yet: %s", best.Reason)
		return best, true
	}
	if !(margin >= 1) {
		margin = 1
	}
	if cs == best.Start && ce == best.End {
		best.Reason = why("stay: %s", best.Reason)
		return best, false
	}
	now := pm.sorted(cs, ce, nil)
	after := pm.sorted(best.Start, best.End, nil)
	stay := func(reason string) (Placement, bool) {
		best.Reason = why("stay on [%d, %d): %s", cs, ce, reason)
		return best, false
	}
	for b := cs; b < ce; b++ {
		if pm.others[b] == 0 && (b < best.Start || b >= best.End) {
			return stay(why("only it serves block %d, which [%d, %d) would leave uncovered", b, best.Start, best.End))
		}
	}
	zNow, zAfter := placeZeros(now), placeZeros(after)
	if pm.counted() {
		cNow := pm.copyHist(cs, ce, nil)
		cAfter := pm.copyHist(best.Start, best.End, nil)
		switch c := placeCmpHist(cAfter, cNow); {
		case c < 0:
			return stay(why("[%d, %d) would leave fewer copies of some block", best.Start, best.End))
		case c > 0:
			gain := why("blocks held by fewer than %d nodes %d -> %d", pm.replicas, pm.short(cs, ce), pm.short(best.Start, best.End))
			if zAfter < zNow {
				gain = why("unserved blocks %d -> %d", zNow, zAfter)
			}
			best.Reason = why("move from [%d, %d) (bottleneck %.4g passes/s, %s): %s", cs, ce, now[0], gain, best.Reason)
			return best, true
		}
	}
	level := margin * now[0]
	wNow, wAfter := placeBelow(now, level), placeBelow(after, level)
	var gain string
	switch {
	case placeLeximin(after, now) <= 0:
		return stay(why("[%d, %d) would not serve the mesh better", best.Start, best.End))
	case zNow > 0 && zAfter < zNow:
		gain = why("unserved blocks %d -> %d", zNow, zAfter)
	case zNow > 0:
		return stay(why("%d blocks unserved either way", zNow))
	case wAfter == 0:
		gain = why("over %.3gx", margin)
	case wAfter < wNow:
		gain = why("blocks under %.3gx the bottleneck %d -> %d", margin, wNow, wAfter)
	default:
		return stay(why("[%d, %d) would take the bottleneck from %.4g to %.4g passes/s, not over %.3gx, and leave %d blocks under that",
			best.Start, best.End, now[0], best.Bottleneck, margin, wAfter))
	}
	best.Reason = why("move from [%d, %d) (bottleneck %.4g passes/s, %s): %s", cs, ce, now[0], gain, best.Reason)
	return best, true
}

// placeBelow counts the entries of a sorted vector of totals under level
// (by more than placeEps).
func placeBelow(v []float64, level float64) int {
	n := 0
	for n < len(v) && placeCmp(v[n], level) < 0 {
		n++
	}
	return n
}

// LastCopies lists, in increasing order, the blocks of current (a span
// this node serves) outside next (the span it moves to) that no other
// candidate holds: the blocks its move would drop from the mesh. A moving
// node fetches its new span before it drops the old one, and others may
// have moved off the same blocks meanwhile, on a view that still showed
// this node there; it asks again before it drops (and stays when the
// answer is not empty). req.Blocks and req.Self as for Place; the other
// fields are not used. It is pure.
func LastCopies(cands []RouteCandidate, req PlaceRequest, current, next [2]int) []int {
	held := make([]bool, max(req.Blocks, 0))
	for i := range cands {
		c := &cands[i]
		if c.Peer == req.Self || !usableCandidate(c) {
			continue
		}
		for b := max(c.Start, 0); b < min(c.End, req.Blocks); b++ {
			held[b] = true
		}
	}
	var out []int
	for b := max(current[0], 0); b < min(current[1], req.Blocks); b++ {
		if (b < next[0] || b >= next[1]) && !held[b] {
			out = append(out, b)
		}
	}
	return out
}
