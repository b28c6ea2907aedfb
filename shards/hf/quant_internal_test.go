package hf

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// gaussRows returns n rows of k seeded Gaussian values, with a few outliers
// as real weights have.
func gaussRows(seed uint64, n, k int) []float32 {
	rng := rand.New(rand.NewPCG(seed, 7))
	x := make([]float32, n*k)
	for i := range x {
		x[i] = float32(rng.NormFloat64() * 0.05)
		if rng.IntN(200) == 0 {
			x[i] *= 8
		}
	}
	return x
}

// quantizeAll quantizes x [n, k] row by row.
func quantizeAll(q Quantization, x []float32, n, k int) (packed []byte, scales []float32) {
	packed = make([]byte, n*q.rowBytes(k))
	scales = make([]float32, n*k/q.Block)
	for r := range n {
		q.quantizeRow(packed[r*q.rowBytes(k):(r+1)*q.rowBytes(k)], scales[r*k/q.Block:(r+1)*k/q.Block], x[r*k:(r+1)*k])
	}
	return packed, scales
}

// TestQuantizePacking checks the packing against a direct reading of the
// layout: byte order, nibble order, the default zero point, and d·q.
func TestQuantizePacking(t *testing.T) {
	// One block of 32 with known integers: x = d·q exactly.
	for _, bits := range []int{4, 8} {
		q := Quantization{Bits: bits, Block: 32}
		lo, hi := -8, 7
		if bits == 8 {
			lo, hi = -128, 127
		}
		const d = 0.25
		ints := make([]int, 32)
		x := make([]float32, 32)
		for i := range ints {
			ints[i] = lo + (i*5)%(hi-lo+1)
			x[i] = d * float32(ints[i])
		}
		ints[3], x[3] = lo, d*float32(lo) // the extreme value, so the scale is d
		packed, scales := quantizeAll(q, x, 1, 32)
		if len(packed) != 32*bits/8 || len(scales) != 1 {
			t.Fatalf("%d bits: %d bytes, %d scales", bits, len(packed), len(scales))
		}
		if bits == 8 && math.Abs(float64(scales[0])-float64(-lo)*d/127) > 1e-7 {
			t.Fatalf("8 bits: scale %g, want max|x|/127 = %g", scales[0], float64(-lo)*d/127)
		}
		if bits == 4 && math.Abs(float64(scales[0])-d) > 1e-7 {
			t.Fatalf("4 bits: scale %g, want %g", scales[0], d)
		}
		got := make([]float32, 32)
		q.dequantizeRow(got, packed, scales)
		for i := range x {
			// Direct reading of the layout.
			var u int
			if bits == 8 {
				u = int(packed[i])
			} else if i%2 == 0 {
				u = int(packed[i/2] & 0x0f)
			} else {
				u = int(packed[i/2] >> 4)
			}
			direct := scales[0] * float32(u-(1<<(bits-1)))
			if got[i] != direct {
				t.Fatalf("%d bits element %d: dequantized %g, layout says %g", bits, i, got[i], direct)
			}
			if bits == 4 && u-8 != ints[i] {
				t.Fatalf("4 bits element %d: stored %d (q+8), want %d", i, u, ints[i]+8)
			}
			if math.Abs(float64(got[i]-x[i])) > float64(scales[0])/2+1e-6 {
				t.Fatalf("%d bits element %d: %g for %g", bits, i, got[i], x[i])
			}
		}
	}
}

// TestQuantizeError measures the relative RMS error of the quantizers on
// Gaussian weights with outliers, and that the 4-bit scale search beats
// Q4_0's reference scale (max/-8).
func TestQuantizeError(t *testing.T) {
	const n, k = 64, 1024
	x := gaussRows(3, n, k)
	var ref float64
	for _, v := range x {
		ref += float64(v) * float64(v)
	}
	rmse := func(q Quantization, packed []byte, scales []float32) float64 {
		got := make([]float32, k)
		var e float64
		for r := range n {
			q.dequantizeRow(got, packed[r*q.rowBytes(k):], scales[r*k/q.Block:])
			for i, v := range got {
				d := float64(v - x[r*k+i])
				e += d * d
			}
		}
		return math.Sqrt(e / ref)
	}
	for _, q := range []Quantization{{8, 32}, {8, 128}, {4, 32}, {4, 128}} {
		packed, scales := quantizeAll(q, x, n, k)
		e := rmse(q, packed, scales)
		msg := fmt.Sprintf("%s: relative RMS error %.4f", q, e)
		if q.Bits == 4 {
			// Q4_0's reference: d = m/-8 for the signed largest m, q = round(x/d) clamped.
			rp, rs := make([]byte, len(packed)), make([]float32, len(scales))
			for r := range n {
				for b := range k / q.Block {
					blk := x[r*k+b*q.Block : r*k+(b+1)*q.Block]
					m := float32(0)
					for _, v := range blk {
						if abs32(v) > abs32(m) {
							m = v
						}
					}
					d := m / -8
					rs[r*k/q.Block+b] = d
					for i, v := range blk {
						u := clampRound(v/d, -8, 7) + 8
						j := r*q.rowBytes(k) + (b*q.Block+i)/2
						rp[j] |= byte(u) << (4 * (i % 2))
					}
				}
			}
			re := rmse(q, rp, rs)
			msg += fmt.Sprintf(" (Q4_0 reference scale: %.4f)", re)
			if e > re {
				t.Errorf("%s: the scale search (%.4f) is worse than the reference (%.4f)", q, e, re)
			}
		}
		t.Log(msg)
	}
}

// probeRuntime opens the CPU runtime or skips.
func probeRuntime(tb testing.TB) *shards.Runtime {
	tb.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		tb.Skip(err)
	}
	return rt
}

// TestMatMulNBits runs onnxruntime's MatMulNBits on weights packed by
// quantizeRow and compares with x·dequant(W)ᵀ + b computed here: bits 4
// and 8, blocks 32 and 128, accuracy levels 0 and 4, with the bias input.
func TestMatMulNBits(t *testing.T) {
	rt := probeRuntime(t)
	const m, k, n = 3, 256, 48
	w := gaussRows(1, n, k)
	x := gaussRows(2, m, k)
	bias := gaussRows(4, 1, n)
	for _, q := range []Quantization{{4, 32}, {4, 128}, {8, 32}, {8, 128}} {
		for _, level := range []int64{0, 4} {
			t.Run(fmt.Sprintf("%s/level%d", q, level), func(t *testing.T) {
				packed, scales := quantizeAll(q, w, n, k)
				defer func(l int64) { accuracyLevel = l }(accuracyLevel)
				accuracyLevel = level
				g := newGraph("probe", protocol.Float32, q)
				xs := tensor("x", protocol.Float32, m, k)
				ys := tensor("y", protocol.Float32, m, n)
				g.Input(xs)
				bn := g.Initializer("B", protocol.NewTensor([]int64{n, int64(k / q.Block), int64(q.rowBytes(q.Block))}, packed))
				sn := g.Initializer("scales", protocol.NewTensor([]int64{n, int64(k / q.Block)}, scales))
				b := g.Initializer("bias", protocol.NewTensor([]int64{n}, bias))
				g.OpTo("y", "Identity", in(g.matMulNBits(xs.Name, bn, sn, b, k, n, q)))
				g.Output(ys)
				out := runProbe(t, rt, g, shards.Tensors{"x": protocol.NewTensor([]int64{m, k}, x)})
				got, _ := protocol.View[float32](out["y"])
				deq := make([]float32, k)
				worst, scale := 0.0, 0.0
				for j := range n {
					q.dequantizeRow(deq, packed[j*q.rowBytes(k):], scales[j*k/q.Block:])
					for i := range m {
						want := float64(bias[j])
						for l := range k {
							want += float64(x[i*k+l]) * float64(deq[l])
						}
						worst = max(worst, math.Abs(float64(got[i*n+j])-want))
						scale = max(scale, math.Abs(want))
					}
				}
				t.Logf("max |diff| %.3g of max |y| %.3g", worst, scale)
				tol := 1e-5
				if level == 4 {
					tol = 2e-2 // activations quantized to int8 per block
				}
				if worst > tol*scale {
					t.Fatalf("MatMulNBits differs from x·dequant(W)ᵀ+b by %.3g (max |y| %.3g)", worst, scale)
				}
			})
		}
	}
}

// TestGatherBlockQuantized runs onnxruntime's GatherBlockQuantized on an
// embedding table packed by quantizeRow and compares with the rows
// dequantized here.
func TestGatherBlockQuantized(t *testing.T) {
	rt := probeRuntime(t)
	const vocab, hidden = 40, 256
	w := gaussRows(5, vocab, hidden)
	ids := []int64{0, 39, 7, 7, 12, 3}
	for _, q := range []Quantization{{4, 32}, {4, 128}, {8, 32}, {8, 128}} {
		t.Run(q.String(), func(t *testing.T) {
			packed, scales := quantizeAll(q, w, vocab, hidden)
			g := newGraph("probe", protocol.Float32, q)
			is := tensor("ids", protocol.Int64, 2, 3)
			g.Input(is)
			dn := g.Initializer("data", protocol.NewTensor([]int64{vocab, int64(q.rowBytes(hidden))}, packed))
			sn := g.Initializer("scales", protocol.NewTensor([]int64{vocab, int64(hidden / q.Block)}, scales))
			g.gatherBlockQuantized("h", dn, sn, is.Name, q)
			g.Output(tensor("h", protocol.Float32, 2, 3, hidden))
			out := runProbe(t, rt, g, shards.Tensors{"ids": protocol.NewTensor([]int64{2, 3}, ids)})
			got, _ := protocol.View[float32](out["h"])
			deq := make([]float32, hidden)
			for p, id := range ids {
				q.dequantizeRow(deq, packed[int(id)*q.rowBytes(hidden):], scales[int(id)*hidden/q.Block:])
				for l := range hidden {
					if got[p*hidden+l] != deq[l] {
						t.Fatalf("token %d element %d: %g, want %g", id, l, got[p*hidden+l], deq[l])
					}
				}
			}
		})
	}
}

// runProbe encodes g (weights as plain initializers) and runs it once.
func runProbe(tb testing.TB, rt *shards.Runtime, g *graph, inputs shards.Tensors) shards.Tensors {
	tb.Helper()
	header, body, err := g.encode()
	if err != nil {
		tb.Fatal(err)
	}
	data := protowire.AppendTag(header, modelGraph, protowire.BytesType)
	data = protowire.AppendBytes(data, body)
	span, err := rt.LoadONNX(data)
	if err != nil {
		tb.Fatal(err)
	}
	defer span.Close()
	out, err := span.Run(inputs)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// quantSource holds the 2-D weights of a checkpoint as if quantized with
// q (a GGUF file would), counting the rows read that way.
type quantSource struct {
	Source
	q    Quantization
	rows int
}

func (s *quantSource) Quantized(name string) (Quantization, bool) {
	shape, ok := s.Shape(name)
	return s.q, ok && len(shape) == 2
}

func (s *quantSource) ReadQuantizedRows(name string, row0, n int, packed []byte, scales []float32) error {
	shape, _ := s.Shape(name)
	k := int(shape[1])
	x := make([]float32, n*k)
	if err := s.ReadFloat32(name, int64(row0)*int64(k), x); err != nil {
		return err
	}
	rb, sb := s.q.rowBytes(k), k/s.q.Block
	for i := range n {
		s.q.quantizeRow(packed[i*rb:(i+1)*rb], scales[i*sb:(i+1)*sb], x[i*k:(i+1)*k])
	}
	s.rows += n
	return nil
}

// TestImportFromSource imports through ImportFrom as a GGUF importer
// would: a Config built field by field (no config.json read), the files
// given as bytes, and a QuantizedSource whose rows are copied. The model
// is the one Import writes from the folder.
func TestImportFromSource(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tiny")
	if err := checkpoint.Write(dir, checkpoint.Tiny(checkpoint.Qwen2), []byte(`{"model":{}}`), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	opts := Options{Quantize: "q8", Name: "tiny"}
	want, err := Import(dir, t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	p, err := ReadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &Config{
		Architecture: p.Architecture, Hidden: p.Hidden, Intermediate: p.Intermediate, Layers: p.Layers,
		Heads: p.Heads, KVHeads: p.KVHeads, Vocab: p.Vocab, MaxPositions: p.MaxPositions, // HeadDim left to Check
		RMSNormEps: p.RMSNormEps, RopeTheta: p.RopeTheta, TieEmbeddings: p.TieEmbeddings,
		AttentionBias: true, EOS: p.EOS,
	}
	files := map[string][]byte{}
	for _, n := range modelFiles {
		if b, err := os.ReadFile(filepath.Join(dir, n)); err == nil {
			files[n] = b
		}
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	src := &quantSource{Source: SafetensorsSource(ckpt), q: Quantization{Bits: 8, Block: 32}}
	got, err := ImportFrom(src, cfg, files, t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if src.rows == 0 {
		t.Fatal("no row was copied from the QuantizedSource")
	}
	if !got.ID.Equals(want.ID) {
		t.Fatalf("ImportFrom wrote model %s, Import %s", got.ID, want.ID)
	}
	t.Logf("%d rows copied; model %s", src.rows, got.ID)

	// A Config missing what its architecture implies is refused.
	bad := *cfg
	bad.AttentionBias = false
	if _, err := ImportFrom(src, &bad, files, t.TempDir(), opts); !errors.Is(err, ErrBadConfig) {
		t.Fatalf("Qwen2 without q/k/v biases: %v", err)
	}
}

// BenchmarkMatMulNBits times one decode-step product x [1, 2048] · Wᵀ for
// W [8192, 2048] (Llama 3.2 1B's gate_proj): float32 Gemm against
// MatMulNBits at 8 and 4 bits, block 32, accuracy levels 0 and 4 (8 bits at
// level 0 is left out: onnxruntime 1.24 has no fast kernel for it, 250 ms a
// product here against 2.8 ms for Gemm).
func BenchmarkMatMulNBits(b *testing.B) {
	rt := probeRuntime(b)
	const k, n = 2048, 8192
	w := gaussRows(1, n, k)
	x := shards.Tensors{"x": protocol.NewTensor([]int64{1, k}, gaussRows(2, 1, k))}
	run := func(b *testing.B, g *graph) {
		header, body, err := g.encode()
		if err != nil {
			b.Fatal(err)
		}
		data := protowire.AppendTag(header, modelGraph, protowire.BytesType)
		span, err := rt.LoadONNX(protowire.AppendBytes(data, body))
		if err != nil {
			b.Fatal(err)
		}
		defer span.Close()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := span.Run(x); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("f32-gemm", func(b *testing.B) {
		g := newGraph("bench", protocol.Float32, Quantization{})
		g.Input(tensor("x", protocol.Float32, 1, k))
		wn := g.Initializer("W", protocol.NewTensor([]int64{n, k}, w))
		g.OpTo("y", "Gemm", in("x", wn), attrInt("transB", 1))
		g.Output(tensor("y", protocol.Float32, 1, n))
		run(b, g)
	})
	for _, q := range []Quantization{{8, 32}, {4, 32}} {
		packed, scales := quantizeAll(q, w, n, k)
		for _, level := range []int64{0, 4} {
			if q.Bits == 8 && level == 0 {
				continue
			}
			b.Run(fmt.Sprintf("q%d-level%d", q.Bits, level), func(b *testing.B) {
				defer func(l int64) { accuracyLevel = l }(accuracyLevel)
				accuracyLevel = level
				g := newGraph("bench", protocol.Float32, q)
				g.Input(tensor("x", protocol.Float32, 1, k))
				bn := g.Initializer("B", protocol.NewTensor([]int64{n, int64(k / q.Block), int64(q.rowBytes(q.Block))}, packed))
				sn := g.Initializer("scales", protocol.NewTensor([]int64{n, int64(k / q.Block)}, scales))
				g.OpTo("y", "Identity", in(g.matMulNBits("x", bn, sn, "", k, n, q)))
				g.Output(tensor("y", protocol.Float32, 1, n))
				run(b, g)
			})
		}
	}
}

// BenchmarkQuantizeRow times quantizing a row of 2048 weights (Llama 3.2
// 1B's hidden size): what an import spends per row of a projection.
func BenchmarkQuantizeRow(b *testing.B) {
	const k = 2048
	x := gaussRows(1, 1, k)
	for _, q := range []Quantization{{8, 32}, {4, 32}, {4, 128}} {
		b.Run(q.String(), func(b *testing.B) {
			packed, scales := make([]byte, q.rowBytes(k)), make([]float32, k/q.Block)
			b.SetBytes(4 * k)
			for b.Loop() {
				q.quantizeRow(packed, scales, x)
			}
		})
	}
}

// TestClampRound checks the fast rounding against math.Round (half away
// from zero) at the halfway points and just under them.
func TestClampRound(t *testing.T) {
	vals := []float32{0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 6.5, 7.5, -7.5, -8.5, 100, -100,
		math.Nextafter32(0.5, 0), math.Nextafter32(-0.5, 0), math.Nextafter32(2.5, 0), math.Nextafter32(-2.5, 0)}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 10000 {
		vals = append(vals, float32(rng.NormFloat64()*5))
	}
	for _, v := range vals {
		want := min(7, max(-8, int(math.Round(float64(v)))))
		if got := clampRound(v, -8, 7); got != want {
			t.Fatalf("clampRound(%v) = %d, want %d", v, got, want)
		}
	}
}
