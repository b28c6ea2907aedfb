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
type Capacity struct {
	// RPS is the bottleneck block's mean capacity, requests/s; Block that
	// block.
	RPS   float64 `json:"rps"`
	Block int     `json:"bottleneck_block"`
	// Share is Summary.Throughput / RPS: near 1 at saturation when the
	// mesh uses what it has; a run below saturation has a small one.
	Share float64 `json:"throughput_share"`
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
	}
	s.capSamples++
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
	return c
}
