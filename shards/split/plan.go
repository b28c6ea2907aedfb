package split

import (
	"errors"
	"fmt"
	"math"
	"sort"
)

// life is the stretch of the node order over which a tensor is alive: it
// crosses every cut position p with from < p <= to. A position p cuts the
// order between its nodes p-1 and p.
type life struct {
	name  string
	from  int   // position of the producer; -1 for a model input
	to    int   // last position that reads it; n for a graph output
	bytes int64 // size at the sample input sizes, 0 if unknown
}

// plan is what choosing cuts needs to know about a graph, free of ONNX: the
// weight of each node in order, the tensors' lives, and the positions where
// no cut may fall.
type plan struct {
	n      int
	weight []float64 // per position
	lives  []life
	forbid []string // per position 0..n: why no cut may fall there, "" if one may

	count []int   // per position: how many tensors cross it
	bytes []int64 // per position: how many bytes cross it
}

// ErrNoCut is returned, wrapped with the reason, when the cuts asked for
// cannot be made.
var ErrNoCut = errors.New("cannot cut there")

func newPlan(weight []float64, lives []life) *plan {
	n := len(weight)
	pl := &plan{n: n, weight: weight, lives: lives, forbid: make([]string, n+1), count: make([]int, n+2), bytes: make([]int64, n+2)}
	pl.forbid[0] = "nothing would come before the cut"
	pl.forbid[n] = "nothing would be left after the cut"
	for _, l := range lives {
		if l.to <= l.from {
			continue
		}
		lo, hi := max(l.from+1, 0), min(l.to, n)
		if lo > hi {
			continue
		}
		pl.count[lo]++
		pl.count[hi+1]--
		pl.bytes[lo] += l.bytes
		pl.bytes[hi+1] -= l.bytes
	}
	for p := 1; p <= n+1; p++ {
		pl.count[p] += pl.count[p-1]
		pl.bytes[p] += pl.bytes[p-1]
	}
	return pl
}

// forbidRange forbids cut positions (lo, hi] for the given reason, keeping
// an earlier reason.
func (pl *plan) forbidRange(lo, hi int, why string) {
	for p := max(lo+1, 0); p <= min(hi, pl.n); p++ {
		if pl.forbid[p] == "" {
			pl.forbid[p] = why
		}
	}
}

// crossing returns the indices in lives of the tensors crossing position p,
// in lives' order.
func (pl *plan) crossing(p int) []int {
	var out []int
	for i, l := range pl.lives {
		if l.from < p && p <= l.to {
			out = append(out, i)
		}
	}
	return out
}

// score is how costly a cut at p is: bytes crossing, with the tensor count
// breaking ties (and standing alone when sizes are unknown).
func (pl *plan) score(p int) float64 {
	return float64(pl.bytes[p]) + float64(pl.count[p])
}

// choose picks blocks-1 cut positions. Block k ideally ends where the
// cumulative weight reaches k/blocks of the total. Each cut is the allowed
// position, among those whose cumulative weight lies within slack of a
// block's share from that ideal, that minimises the bytes crossing it
// times (1 + its distance from the ideal in shares): a cut half as wide is
// worth moving up to a whole share for. Where no allowed position lies in
// the window, the window widens.
func (pl *plan) choose(blocks int, slack float64) ([]int, error) {
	if blocks < 1 {
		return nil, fmt.Errorf("%w: %d blocks", ErrNoCut, blocks)
	}
	if blocks == 1 {
		return nil, nil
	}
	// avail[p]: allowed positions after p.
	avail := make([]int, pl.n+1)
	for p := pl.n - 1; p >= 0; p-- {
		avail[p] = avail[p+1]
		if pl.forbid[p+1] == "" {
			avail[p]++
		}
	}
	if avail[0] < blocks-1 {
		return nil, fmt.Errorf("%w: %d blocks need %d cut positions, the graph has %d allowed (of %d nodes)", ErrNoCut, blocks, blocks-1, avail[0], pl.n)
	}
	cum := make([]float64, pl.n+1)
	for p := 1; p <= pl.n; p++ {
		cum[p] = cum[p-1] + pl.weight[p-1]
	}
	share := cum[pl.n] / float64(blocks)
	var cuts []int
	prev := 0
	for k := 1; k < blocks; k++ {
		target := float64(k) * share
		var cands []int
		for s := slack; len(cands) == 0; s *= 2 {
			for p := prev + 1; p < pl.n; p++ {
				if pl.forbid[p] != "" || avail[p] < blocks-1-k {
					continue
				}
				if math.Abs(cum[p]-target) <= s*share || s > float64(blocks) {
					cands = append(cands, p)
				}
			}
		}
		pick, best := -1, math.Inf(1)
		for _, p := range cands {
			dev := math.Abs(cum[p]-target) / share
			cost := pl.score(p) * (1 + dev)
			if cost < best || (cost == best && dev < math.Abs(cum[pick]-target)/share) {
				pick, best = p, cost
			}
		}
		cuts = append(cuts, pick)
		prev = pick
	}
	return cuts, nil
}

// check validates explicit cut positions, sorted and deduplicated.
func (pl *plan) check(cuts []int) ([]int, error) {
	sort.Ints(cuts)
	var out []int
	for i, p := range cuts {
		if i > 0 && p == cuts[i-1] {
			continue
		}
		if p < 0 || p > pl.n {
			return nil, fmt.Errorf("%w: position %d outside [0,%d]", ErrNoCut, p, pl.n)
		}
		if why := pl.forbid[p]; why != "" {
			return nil, fmt.Errorf("%w: %s", ErrNoCut, why)
		}
		out = append(out, p)
	}
	return out, nil
}
