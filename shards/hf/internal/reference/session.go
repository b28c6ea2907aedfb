package reference

import (
	"fmt"
	"math"
	"runtime"
	"sync"
)

// Session is one sequence's KV cache. It is not safe for concurrent use.
type Session struct {
	m *Model
	// k[l][pos], v[l][pos]: layer l's keys (after RoPE) and values at each
	// position, kvHeads*headDim each.
	k, v [][][]float64
}

// NewSession starts an empty sequence.
func (m *Model) NewSession() *Session {
	return &Session{m: m, k: make([][][]float64, m.p.layers), v: make([][][]float64, m.p.layers)}
}

// Len returns the number of positions in the cache.
func (s *Session) Len() int { return len(s.k[0]) }

// Step runs the tokens ids at the next positions (continuing from the cache)
// and returns the logits of each, [len(ids)][vocab]. It computes layer by
// layer over all the new positions, the way a batched forward pass does; a
// new position attends to the cache and to the new positions up to its own.
func (s *Session) Step(ids []int64) ([][]float64, error) {
	p := s.m.p
	for _, id := range ids {
		if id < 0 || id >= int64(p.vocab) {
			return nil, fmt.Errorf("reference: token %d outside the vocabulary of %d", id, p.vocab)
		}
	}
	start := s.Len()
	hs := make([][]float64, len(ids))
	for t, id := range ids {
		hs[t] = widen(s.m.embed.w[int(id)*p.hidden : (int(id)+1)*p.hidden])
	}
	for l := range s.m.layers {
		s.layer(l, start, hs)
	}
	normed := make([][]float64, len(hs))
	for t, h := range hs {
		normed[t] = rmsNorm(h, s.m.norm, p.eps)
	}
	return s.m.head.mul(normed, nil), nil
}

// layer runs decoder layer l over the hidden states hs of the new positions
// start, start+1, ..., updating hs in place and appending to the cache. The
// projections take all new positions at once (each weight is read once per
// step); position t then attends to the cache up to start+t.
func (s *Session) layer(l, start int, hs [][]float64) {
	p, ly := s.m.p, &s.m.layers[l]
	hd := p.headDim
	xs := make([][]float64, len(hs))
	for t, h := range hs {
		xs[t] = rmsNorm(h, ly.inNorm, p.eps)
	}
	qs, ks, vs := ly.q.apply(xs), ly.k.apply(xs), ly.v.apply(xs)
	for t := range hs {
		q, k := qs[t], ks[t]
		if p.qkNorm {
			for hh := 0; hh < p.heads; hh++ {
				copy(q[hh*hd:(hh+1)*hd], rmsNorm(q[hh*hd:(hh+1)*hd], ly.qNorm, p.eps))
			}
			for hh := 0; hh < p.kvHeads; hh++ {
				copy(k[hh*hd:(hh+1)*hd], rmsNorm(k[hh*hd:(hh+1)*hd], ly.kNorm, p.eps))
			}
		}
		pos := start + t
		for hh := 0; hh < p.heads; hh++ {
			rope(q[hh*hd:(hh+1)*hd], pos, p.invFreq)
		}
		for hh := 0; hh < p.kvHeads; hh++ {
			rope(k[hh*hd:(hh+1)*hd], pos, p.invFreq)
		}
		s.k[l] = append(s.k[l], k)
		s.v[l] = append(s.v[l], vs[t])
	}
	attns := make([][]float64, len(hs))
	for t := range hs {
		attns[t] = s.attend(l, start+t, qs[t])
	}
	for t, o := range ly.o.apply(attns) {
		for i := range o {
			hs[t][i] += o[i]
		}
	}
	for t, h := range hs {
		xs[t] = rmsNorm(h, ly.postNorm, p.eps)
	}
	gs, us := ly.gate.apply(xs), ly.up.apply(xs)
	for t, g := range gs {
		for i := range g {
			g[i] = silu(g[i]) * us[t][i]
		}
	}
	for t, d := range ly.down.apply(gs) {
		for i := range d {
			hs[t][i] += d[i]
		}
	}
}

// attend returns the attention output (heads × head_dim) of the query q at
// position pos over layer l's cache: per query head, softmax(q·kᵀ /
// sqrt(head_dim)) over the keys at positions ≤ pos (and > pos - window)
// times the values; query head h reads KV head h / (heads/kvHeads), as
// transformers' repeat_kv lays them out.
func (s *Session) attend(l, pos int, q []float64) []float64 {
	p := s.m.p
	hd := p.headDim
	group := p.heads / p.kvHeads
	scale := 1 / math.Sqrt(float64(hd))
	first := 0
	if w := p.window[l]; w > 0 {
		first = max(0, pos-w+1)
	}
	attn := make([]float64, p.heads*hd)
	scores := make([]float64, pos+1-first)
	for hh := 0; hh < p.heads; hh++ {
		qh := q[hh*hd : (hh+1)*hd]
		kvh := hh / group
		peak := math.Inf(-1)
		for j := first; j <= pos; j++ {
			k := s.k[l][j][kvh*hd : (kvh+1)*hd]
			var dot float64
			for d := range hd {
				dot += qh[d] * k[d]
			}
			scores[j-first] = dot * scale
			peak = max(peak, scores[j-first])
		}
		var sum float64
		for i := range scores {
			scores[i] = math.Exp(scores[i] - peak)
			sum += scores[i]
		}
		out := attn[hh*hd : (hh+1)*hd]
		for j := first; j <= pos; j++ {
			w := scores[j-first] / sum
			v := s.v[l][j][kvh*hd : (kvh+1)*hd]
			for d := range hd {
				out[d] += w * v[d]
			}
		}
	}
	return attn
}

// rmsNorm returns x / sqrt(mean(x²) + eps) · w.
func rmsNorm(x []float64, w []float32, eps float64) []float64 {
	var ss float64
	for _, v := range x {
		ss += v * v
	}
	r := 1 / math.Sqrt(ss/float64(len(x))+eps)
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = v * r * float64(w[i])
	}
	return out
}

// rope rotates one head's vector x in place at position pos, HF's
// rotate_half way: x[i] pairs with x[i+d/2] at frequency invFreq[i].
func rope(x []float64, pos int, invFreq []float64) {
	half := len(x) / 2
	for i := range half {
		angle := float64(pos) * invFreq[i]
		c, s := math.Cos(angle), math.Sin(angle)
		a, b := x[i], x[i+half]
		x[i] = a*c - b*s
		x[i+half] = b*c + a*s
	}
}

func silu(x float64) float64 { return x / (1 + math.Exp(-x)) }

// parallelMACs is the size (rows × cols) from which mul splits its rows
// over the CPUs; each row is still summed in the same order, so the result
// does not depend on the split.
const parallelMACs = 1 << 20

// mul returns m·x (+b) for each x of xs: out[t][r] = Σ_c m[r,c]·xs[t][c].
func (m matrix) mul(xs [][]float64, b []float32) [][]float64 {
	out := make([][]float64, len(xs))
	for t := range out {
		out[t] = make([]float64, m.rows)
	}
	rows := func(lo, hi int) {
		for r := lo; r < hi; r++ {
			row := m.w[r*m.cols : (r+1)*m.cols]
			for t, x := range xs {
				var acc float64
				for c, w := range row {
					acc += float64(w) * x[c]
				}
				if b != nil {
					acc += float64(b[r])
				}
				out[t][r] = acc
			}
		}
	}
	n := runtime.GOMAXPROCS(0)
	if m.rows*m.cols < parallelMACs || n == 1 {
		rows(0, m.rows)
		return out
	}
	var wg sync.WaitGroup
	for i := range n {
		lo, hi := m.rows*i/n, m.rows*(i+1)/n
		wg.Go(func() { rows(lo, hi) })
	}
	wg.Wait()
	return out
}

func (l linear) apply(xs [][]float64) [][]float64 { return l.m.mul(xs, l.b) }

func widen(v []float32) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}
