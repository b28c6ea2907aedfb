package hf_test

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
)

// Goals of the quantized imports against the float32 import of the same
// checkpoint, over quantRuns prompts of 8 random tokens and 32 greedy
// steps each, both models fed the float32 model's tokens: the mean cosine
// similarity of the logits, and (q8) the share of steps where the greedy
// tokens agree.
const (
	quantRuns     = 4
	cosineQ8      = 0.999
	cosineQ4      = 0.98
	greedyAgreeQ8 = 0.95
)

// quantStats compares a quantized model's logits with the float model's.
type quantStats struct {
	meanCos, minCos float64
	agree, steps    int
}

func (s quantStats) String() string {
	return fmt.Sprintf("logits cosine mean %.5f min %.5f; greedy tokens agree %d/%d (%.1f%%)",
		s.meanCos, s.minCos, s.agree, s.steps, 100*float64(s.agree)/float64(s.steps))
}

// compareLogits runs both models over quantRuns prompts.
func compareLogits(tb testing.TB, float, quant *shards.Model, vocab int) quantStats {
	tb.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		tb.Skip(err)
	}
	load := func(m *shards.Model) *shards.Span {
		s, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { s.Close() })
		return s
	}
	fs, qs := load(float), load(quant)
	st := quantStats{minCos: 1}
	var sumCos float64
	var n int
	for run := range quantRuns {
		rng := rand.New(rand.NewPCG(uint64(run), 99))
		tokens := make([]int64, 8)
		for i := range tokens {
			tokens[i] = rng.Int64N(int64(vocab))
		}
		fsess, qsess := fs.NewSession(), qs.NewSession()
		fed := 0
		for step := range decodeSteps + 1 {
			in := shards.StepInputs(float.Manifest.Decoder, tokens, fed)
			fo, err := fsess.Step(in)
			if err != nil {
				tb.Fatal(err)
			}
			qo, err := qsess.Step(in)
			if err != nil {
				tb.Fatal(err)
			}
			f, q := rows(tb, fo["logits"]), rows(tb, qo["logits"])
			for p := range f {
				c := cosine(f[p], q[p])
				sumCos += c
				n++
				st.minCos = min(st.minCos, c)
			}
			last := len(f) - 1
			next := argmax(f[last])
			if step > 0 { // the prompt's last position is not a decode step
				st.steps++
				if argmax(q[last]) == next {
					st.agree++
				}
			}
			fed = len(tokens)
			tokens = append(tokens, next)
		}
		fsess.Close()
		qsess.Close()
	}
	st.meanCos = sumCos / float64(n)
	return st
}

func cosine(a, b []float64) float64 {
	var ab, aa, bb float64
	for i := range a {
		ab += a[i] * b[i]
		aa += a[i] * a[i]
		bb += b[i] * b[i]
	}
	return ab / math.Sqrt(aa*bb)
}

// TestQuantizedAgainstFloat imports tiny checkpoints of each architecture
// as float32, q8 and q4 blocks (block 32, and 128 on a wider Llama) and
// compares the quantized models' logits and greedy tokens with the float32
// model's.
func TestQuantizedAgainstFloat(t *testing.T) {
	wide := checkpoint.Tiny(checkpoint.Llama)
	wide.Hidden, wide.Intermediate, wide.Heads, wide.KVHeads = 256, 512, 4, 2
	cases := []struct {
		name  string
		cfg   checkpoint.Config
		block int
	}{
		{"llama", checkpoint.Tiny(checkpoint.Llama), 32},
		{"mistral", checkpoint.Tiny(checkpoint.Mistral), 32},
		{"qwen2", checkpoint.Tiny(checkpoint.Qwen2), 32},
		{"qwen3", checkpoint.Tiny(checkpoint.Qwen3), 32},
		{"llama-wide", wide, 128},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := writeCheckpoint(t, tc.cfg)
			float := importModel(t, src, hf.Options{DType: "float32"})
			for _, bits := range []string{"q8", "q4"} {
				m := importModel(t, src, hf.Options{DType: "float32", Quantize: bits, QuantBlock: tc.block})
				if got, want := m.Manifest.Info.Quantization, fmt.Sprintf("%s/%d", bits, tc.block); got != want {
					t.Fatalf("manifest quantization %q, want %q", got, want)
				}
				st := compareLogits(t, float, m, tc.cfg.Vocab)
				t.Logf("%s/%d: %s; blocks %d bytes, float32 %d (%.3fx)", bits, tc.block, st,
					m.Manifest.TotalSize(), float.Manifest.TotalSize(), float64(m.Manifest.TotalSize())/float64(float.Manifest.TotalSize()))
				goal := cosineQ8
				if bits == "q4" {
					goal = cosineQ4
				}
				if st.meanCos < goal {
					t.Errorf("%s: mean logits cosine %.5f, want >= %g", bits, st.meanCos, goal)
				}
				if bits == "q8" && float64(st.agree) < greedyAgreeQ8*float64(st.steps) {
					t.Errorf("q8: greedy tokens agree on %d of %d steps, want >= %.0f%%", st.agree, st.steps, 100*greedyAgreeQ8)
				}
			}
		})
	}
}

// TestQuantizedBlockBytes checks the size of decoder blocks of a realistic
// aspect (hidden 256, MLP 1024, no grouped-query attention) against
// float32: q4 with block 32 stores 4 bits and a fourth of a bit of scale
// per weight, 0.156x of float32; q8 0.281x.
func TestQuantizedBlockBytes(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Llama)
	cfg.Hidden, cfg.Intermediate, cfg.Heads, cfg.KVHeads = 256, 1024, 4, 4
	src := writeCheckpoint(t, cfg)
	decoderBytes := func(m *shards.Model) (n int64) {
		for _, b := range m.Manifest.Blocks[1 : len(m.Manifest.Blocks)-1] {
			n += b.Size
		}
		return n
	}
	f32 := decoderBytes(importModel(t, src, hf.Options{DType: "float32"}))
	for _, tc := range []struct {
		quant string
		block int
		limit float64
	}{{"q8", 32, 0.29}, {"q4", 32, 0.16}, {"q8", 128, 0.27}, {"q4", 128, 0.14}} {
		m := importModel(t, src, hf.Options{Quantize: tc.quant, QuantBlock: tc.block})
		r := float64(decoderBytes(m)) / float64(f32)
		t.Logf("%s/%d: decoder blocks %d bytes, float32 %d: %.4fx; whole model %d bytes", tc.quant, tc.block, decoderBytes(m), f32, r, m.Manifest.TotalSize())
		if r > tc.limit {
			t.Errorf("%s/%d: %.4fx of float32, want <= %g", tc.quant, tc.block, r, tc.limit)
		}
	}
}

// TestQuantizeRefuses: an unknown quantization, a block size other than 32
// and 128, and one that does not divide a weight's input size are errors
// wrapping ErrBadQuantization, and nothing is written.
func TestQuantizeRefuses(t *testing.T) {
	src := writeCheckpoint(t, checkpoint.Tiny(checkpoint.Qwen2)) // hidden 64
	for _, tc := range []struct {
		opts  hf.Options
		names string
	}{
		{hf.Options{Quantize: "q5"}, `"q5"`},
		{hf.Options{Quantize: "q4", QuantBlock: 64}, "block size 64"},
		{hf.Options{Quantize: "q8", QuantBlock: 128}, "does not divide the input size 64"},
	} {
		out := t.TempDir()
		_, err := hf.Import(src, out, tc.opts)
		if !errors.Is(err, hf.ErrBadQuantization) || !strings.Contains(err.Error(), tc.names) {
			t.Fatalf("%+v: got %v, want ErrBadQuantization naming %s", tc.opts, err, tc.names)
		}
		if _, err := os.Stat(filepath.Join(out, shards.ManifestFile)); err == nil {
			t.Fatal("a refused import wrote a manifest")
		}
		t.Log(err)
	}
}

// TestAccuracyLevels measures what MatMulNBits' accuracy_level 4 (int8
// activations, the default) costs against level 0 (float32 activations).
func TestAccuracyLevels(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Qwen3)
	src := writeCheckpoint(t, cfg)
	float := importModel(t, src, hf.Options{DType: "float32"})
	for _, bits := range []string{"q8", "q4"} {
		var cos [2]float64
		for i, level := range []int64{0, 4} {
			restore := hf.SetAccuracyLevel(level)
			m := importModel(t, src, hf.Options{DType: "float32", Quantize: bits})
			restore()
			st := compareLogits(t, float, m, cfg.Vocab)
			cos[i] = st.meanCos
			t.Logf("%s accuracy_level %d: %s", bits, level, st)
		}
		if cos[1] < cos[0]-1e-3 {
			t.Errorf("%s: level 4 loses %.5f of mean cosine against level 0", bits, cos[0]-cos[1])
		}
	}
}
