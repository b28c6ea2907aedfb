package simulations

// How the work spread over the peers (Summary.Load) and what the mesh could
// have run (Summary.Capacity): issue 15's measures of herding.

import (
	"math"
	"math/rand/v2"
	"slices"
)

// LoadSpread is how a run's compute spread over its peers. A peer's
// utilisation is its compute time over its slot time: the pass time of
// every pass it ran, over its time online times its slots (PeerStat.Busy),
// queueing not counted.
type LoadSpread struct {
	// Peers were ever online; Serving of them ran at least one pass;
	// ServingShare is Serving / Peers.
	Peers        int     `json:"peers"`
	Serving      int     `json:"serving"`
	ServingShare float64 `json:"serving_share"`
	// Holders held a span when they left or the run ended (the model's
	// replicas, idle or not); the utilisation quantiles are theirs
	// (nearest rank).
	Holders int     `json:"holders"`
	P50     float64 `json:"util_p50"`
	P99     float64 `json:"util_p99"`
	Max     float64 `json:"util_max"`
	// ServingP50 and ServingP99 are the utilisation quantiles of the
	// Serving peers alone (where most holders idle, the holders' p50 is 0).
	ServingP50 float64 `json:"serving_util_p50"`
	ServingP99 float64 `json:"serving_util_p99"`
	// A holder's ratio is its utilisation over the mean, over the blocks
	// of its span, of the median utilisation of each block's holders.
	// WorstRatio is the largest finite one, WorstPeer its peer's ID
	// (-1: none); OverTwice counts the holders whose ratio is above 2
	// (the goal is none); Unbounded those of them that computed on blocks
	// whose replicas' medians are all 0 (their ratio is infinite: most of
	// each of their blocks' holders ran nothing).
	WorstRatio float64 `json:"worst_ratio"`
	WorstPeer  int     `json:"worst_peer"`
	OverTwice  int     `json:"over_2x"`
	Unbounded  int     `json:"unbounded"`
}

// peerLoad is one peer's part in a LoadSpread: its ID, utilisation,
// whether it ran any pass, and the span it held at the end ([start, end),
// empty: none).
type peerLoad struct {
	id         int
	util       float64
	ran        bool
	start, end int
}

// loadSpread is the LoadSpread of peers over a model of blocks blocks.
func loadSpread(peers []peerLoad, blocks int) LoadSpread {
	ls := LoadSpread{Peers: len(peers), WorstPeer: -1}
	perBlock := make([][]float64, blocks)
	var utils, serving []float64
	for _, p := range peers {
		if p.ran {
			ls.Serving++
			serving = append(serving, p.util)
		}
		if p.start >= p.end {
			continue
		}
		utils = append(utils, p.util)
		for b := p.start; b < p.end; b++ {
			perBlock[b] = append(perBlock[b], p.util)
		}
	}
	if ls.Peers > 0 {
		ls.ServingShare = float64(ls.Serving) / float64(ls.Peers)
	}
	slices.Sort(serving)
	ls.ServingP50, ls.ServingP99 = quantile(serving, 0.5), quantile(serving, 0.99)
	ls.Holders = len(utils)
	if len(utils) == 0 {
		return ls
	}
	slices.Sort(utils)
	ls.P50, ls.P99, ls.Max = quantile(utils, 0.5), quantile(utils, 0.99), utils[len(utils)-1]
	median := make([]float64, blocks)
	for b, us := range perBlock {
		slices.Sort(us)
		median[b] = quantile(us, 0.5)
	}
	for _, p := range peers {
		if p.start >= p.end {
			continue
		}
		ref := 0.0
		for b := p.start; b < p.end; b++ {
			ref += median[b]
		}
		ref /= float64(p.end - p.start)
		switch {
		case p.util <= 0:
		case ref <= 0:
			ls.Unbounded++
			ls.OverTwice++
		default:
			r := p.util / ref
			if r > 2 {
				ls.OverTwice++
			}
			if r > ls.WorstRatio {
				ls.WorstRatio, ls.WorstPeer = r, p.id
			}
		}
	}
	return ls
}

// Capacity is what the mesh could run of the scenario's workload, and how
// much of it it ran.
//
// A peer p runs slots_p passes at once, and a pass through its whole span
// takes Σ_{b in span} micros_p[b] per single-token pass, a prompt of T
// tokens (1 + (T-1) × prefill_p) times that (the engine's passNs). A
// request's passes at p average W_p single-token passes,
//
//	W_p = 1 + (E[prompt] - 1) × prefill_p + generate × (E[output] - 1)
//
// (its prompt pass, then for the share of generation requests one
// one-token pass per output token after the first). So p can run
//
//	cap_p = slots_p / (W_p × Σ_{b in span} micros_p[b])  requests/s
//
// through its span, and block b's capacity is Σ cap_p over its online
// holders, averaged over the sample ticks (peers come, go and move); the
// bottleneck is the block with the least. A hop that runs only part of a
// peer's span costs it less, so a mesh routing over partial spans may
// exceed it; failovers, replays and resumed ring steps are extra work it
// does not count, which keeps a saturated mesh below it.
//
// The mesh's capacity (Flow) counts partial spans: it is the most
// requests/s the online peers could run through every block were each
// peer's time split among its blocks as routes best split it, the
// largest X for which a flow exists from the peers (p supplying
// slots_p / (W_p × mean_{b in span} micros_p[b]) block passes per
// second) to the blocks (each taking X), p's passes going only to the
// blocks it holds: a max flow, by bisection on X. It is at least RPS and
// at most the least block's Σ slots_p / (W_p × micros_p[b]), and the
// throughput never exceeds it but for what runs beside the compute
// (nothing does, in the model) and the window's edges. (A peer whose block
// times differ across its span counts at their mean: exact in the
// geography mode, where a class has one block time.)
type Capacity struct {
	// RPS is the bottleneck block's mean capacity, requests/s; Block that
	// block.
	RPS   float64 `json:"rps"`
	Block int     `json:"bottleneck_block"`
	// Share is Summary.Throughput / RPS: near 1 at saturation when the
	// mesh uses what it has; a run below saturation has a small one.
	Share float64 `json:"throughput_share"`
	// FlowRPS is the mesh's capacity with its work split over partial
	// spans (the max flow above), averaged over the samples; FlowShare is
	// Summary.Throughput / FlowRPS.
	FlowRPS   float64 `json:"flow_rps"`
	FlowShare float64 `json:"flow_share"`
}

// capacityDraws is how many draws estimate E[prompt] and E[output] (their
// clamping makes the distributions' own means inexact).
const capacityDraws = 1 << 16

// workUnits returns the per-peer factor of W_p but for the peer's own
// prefill: W_p = base + extra × prefill_p. The draws come from a stream of
// their own, so they change no other.
func workUnits(w *Workload, seed uint64) (base, extra float64) {
	k := uint64(streamCapacity)
	rng := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15*k)) // as newSim's streams
	var ps, outs float64
	for range capacityDraws {
		ps += float64(w.Prompt.draw(rng))
	}
	if w.Generate > 0 {
		for range capacityDraws {
			outs += float64(w.Output.draw(rng))
		}
	}
	ep, eo := ps/capacityDraws, outs/capacityDraws
	base = 1
	if w.Generate > 0 {
		base += w.Generate * (eo - 1)
	}
	return base, ep - 1
}

// sampleCapacity adds each block's capacity now (Σ cap_p over its
// online holders, requests/s) to s.capSum.
func (s *sim) sampleCapacity() {
	if s.capSum == nil {
		s.capSum = make([]float64, s.sc.Model.Blocks)
		s.capBase, s.capExtra = workUnits(&s.sc.Workload, uint64(s.sc.Seed))
	}
	supply := map[[2]int]float64{} // per span, the block passes/s its holders run
	for _, p := range s.peers {
		if !p.online || p.start >= p.end {
			continue
		}
		span := 0.0
		for b := p.start; b < p.end; b++ {
			span += p.micros[b]
		}
		per := float64(len(p.slots)) * 1e6 / ((s.capBase + s.capExtra*p.prefill) * max(span, 1e-3))
		for b := p.start; b < p.end; b++ {
			s.capSum[b] += per
		}
		supply[[2]int{p.start, p.end}] += per * float64(p.end-p.start)
	}
	s.flowSum += flowCapacity(supply, s.sc.Model.Blocks)
	s.capSamples++
}

// flowCapacity is the largest X such that the spans' supplies (block
// passes per second, each to be spent on its span's blocks only) can give
// every one of blocks blocks X passes per second: a max flow from the
// spans to the blocks (source -> span: its supply; span -> its blocks:
// unbounded; block -> sink: X). 0 when some block has no holder.
//
// It starts from X = the least block's holders' total, each spending all
// on it (an upper bound), and goes down by Dinkelbach's rule: where the
// max flow falls short of X × blocks, the min cut (the spans and blocks
// the residual graph reaches from the source) leaves out spans whose
// supply a is all the cut-off blocks can have, b blocks stay on the
// source's side, and no X above a / (blocks - b) is feasible; that is the
// next X. Each step cuts X down and the cuts are finitely many, so it
// ends, at X*, in a few max flows.
func flowCapacity(supply map[[2]int]float64, blocks int) float64 {
	spans := make([][2]int, 0, len(supply))
	for sp := range supply {
		spans = append(spans, sp)
	}
	slices.SortFunc(spans, func(a, b [2]int) int {
		if a[0] != b[0] {
			return a[0] - b[0]
		}
		return a[1] - b[1]
	})
	x := math.Inf(1)
	for b := range blocks {
		all := 0.0
		for _, sp := range spans {
			if sp[0] <= b && b < sp[1] {
				all += supply[sp]
			}
		}
		x = min(x, all)
	}
	if !(x > 0) || math.IsInf(x, 1) {
		return 0
	}
	// Nodes: 0 the source, 1..n the spans, n+1..n+blocks the blocks, then
	// the sink.
	n := len(spans)
	g := newFlowGraph(n + blocks + 2)
	sink := n + blocks + 1
	for i, sp := range spans {
		g.add(0, 1+i, supply[sp])
		for b := sp[0]; b < sp[1]; b++ {
			g.add(1+i, n+1+b, math.Inf(1))
		}
	}
	sinks := make([]int, blocks) // the block -> sink edges
	for b := range blocks {
		sinks[b] = g.add(n+1+b, sink, 0)
	}
	for range 4 * (n + blocks) { // a bound the cuts never reach
		g.reset()
		for _, e := range sinks {
			g.cap[e] = x
		}
		if g.maxFlow(0, sink) >= x*float64(blocks)*(1-1e-9) {
			return x
		}
		// The min cut: what the last search of maxFlow reached.
		a, b := 0.0, 0
		for i, sp := range spans {
			if g.level[1+i] < 0 {
				a += supply[sp]
			}
		}
		for k := range blocks {
			if g.level[n+1+k] >= 0 {
				b++
			}
		}
		next := a / float64(blocks-b)
		if b >= blocks || !(next < x) {
			return x // rounding: no cut lowers it further
		}
		x = next
	}
	return x
}

// flowGraph is a flow network for Dinic's algorithm: edge e goes to[e],
// its reverse is e^1.
type flowGraph struct {
	head       [][]int
	to         []int
	cap, orig  []float64
	level, ptr []int
}

func newFlowGraph(n int) *flowGraph {
	return &flowGraph{head: make([][]int, n), level: make([]int, n), ptr: make([]int, n)}
}

// add adds an edge u -> v of capacity c and returns its index.
func (g *flowGraph) add(u, v int, c float64) int {
	e := len(g.to)
	g.head[u] = append(g.head[u], e)
	g.head[v] = append(g.head[v], e+1)
	g.to = append(g.to, v, u)
	g.cap = append(g.cap, c, 0)
	g.orig = append(g.orig, c, 0)
	return e
}

// reset restores every capacity (sink edges are set after).
func (g *flowGraph) reset() { copy(g.cap, g.orig) }

func (g *flowGraph) maxFlow(s, t int) float64 {
	const eps = 1e-12
	total := 0.0
	for {
		for i := range g.level {
			g.level[i] = -1
		}
		g.level[s] = 0
		q := []int{s}
		for len(q) > 0 {
			u := q[0]
			q = q[1:]
			for _, e := range g.head[u] {
				if v := g.to[e]; g.cap[e] > eps && g.level[v] < 0 {
					g.level[v] = g.level[u] + 1
					q = append(q, v)
				}
			}
		}
		if g.level[t] < 0 {
			return total
		}
		clear(g.ptr)
		for {
			f := g.push(s, t, math.Inf(1))
			if !(f > eps) {
				break
			}
			total += f
		}
	}
}

func (g *flowGraph) push(u, t int, f float64) float64 {
	if u == t {
		return f
	}
	for ; g.ptr[u] < len(g.head[u]); g.ptr[u]++ {
		e := g.head[u][g.ptr[u]]
		v := g.to[e]
		if g.cap[e] > 1e-12 && g.level[v] == g.level[u]+1 {
			if d := g.push(v, t, min(f, g.cap[e])); d > 1e-12 {
				g.cap[e] -= d
				g.cap[e^1] += d
				return d
			}
		}
	}
	return 0
}

// capacity is the run's Capacity at a throughput of tput requests/s.
func (s *sim) capacity(tput float64) Capacity {
	c := Capacity{Block: -1}
	if s.capSamples == 0 {
		return c
	}
	c.RPS = math.Inf(1)
	for b, sum := range s.capSum {
		if v := sum / float64(s.capSamples); v < c.RPS {
			c.RPS, c.Block = v, b
		}
	}
	if c.RPS > 0 {
		c.Share = tput / c.RPS
	}
	if c.FlowRPS = s.flowSum / float64(s.capSamples); c.FlowRPS > 0 {
		c.FlowShare = tput / c.FlowRPS
	}
	return c
}
