package hf_test

import (
	"math"
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/hf/internal/reference"
)

// Tolerances of the comparison with the float64 reference, as a fraction
// of the largest |logit|. With float32 weights, or float16 weights that
// hold the checkpoint's values exactly (from float16 or bfloat16), the
// blocks differ from the reference only by float32 arithmetic (measured
// under 1e-6). Float16 weights rounded from a float32 checkpoint (a
// relative 2^-11 per weight) move the logits by about 1e-3 of the largest
// (measured 1.1e-3 on tiny Llama); both sessions are fed the reference's
// greedy tokens, and ours may pick another only where the reference's top
// two logits are that close (at most one step in eight).
const (
	tolFloat32  = 1e-4
	tolFloat16  = 1e-2
	decodeSteps = 32
)

var prompt = []int64{1, 17, 42, 99, 5, 250, 8, 301}

type refCase struct {
	name string
	cfg  checkpoint.Config
	opts hf.Options
	tol  float64
	// perBlock runs each block in its own onnxruntime session (as a chain
	// of peers does) instead of one fused session.
	perBlock bool
}

func refCases() []refCase {
	llama := checkpoint.Tiny(checkpoint.Llama) // float32, llama3 rope scaling, untied
	tied := llama
	tied.TieEmbeddings, tied.DType, tied.Shards, tied.AttentionBias = true, "bfloat16", 3, true
	qwen2 := checkpoint.Tiny(checkpoint.Qwen2)     // bfloat16, tied, q/k/v biases
	qwen3 := checkpoint.Tiny(checkpoint.Qwen3)     // bfloat16, tied, q/k norm, head_dim 32 of hidden 64 / 4 heads
	mistral := checkpoint.Tiny(checkpoint.Mistral) // float16, sliding window over the context
	return []refCase{
		{name: "llama-f32-llama3-rope", cfg: llama, tol: tolFloat32},
		{name: "llama-bf16-tied-sharded-biases", cfg: tied, opts: hf.Options{DType: "float32"}, tol: tolFloat32, perBlock: true},
		{name: "qwen2-bf16-biases", cfg: qwen2, opts: hf.Options{DType: "float32"}, tol: tolFloat32},
		{name: "qwen3-bf16-qknorm-headdim", cfg: qwen3, opts: hf.Options{DType: "float32"}, tol: tolFloat32},
		{name: "qwen3-layers-per-block-2", cfg: qwen3, opts: hf.Options{DType: "float32", LayersPerBlock: 2}, tol: tolFloat32, perBlock: true},
		{name: "mistral-f16", cfg: mistral, tol: tolFloat32}, // float16 weights as the checkpoint has them: exact
		{name: "mistral-f16-as-f32", cfg: mistral, opts: hf.Options{DType: "float32"}, tol: tolFloat32},
		{name: "qwen2-bf16-as-f16", cfg: qwen2, tol: tolFloat32}, // bfloat16 to float16 is exact for these weights
		{name: "llama-f32-as-f16", cfg: llama, opts: hf.Options{DType: "float16"}, tol: tolFloat16},
	}
}

// TestAgainstReference imports tiny random checkpoints of each
// architecture and compares the blocks' logits with the float64 reference
// over a prompt and 32 greedy decode steps with the KV cache.
func TestAgainstReference(t *testing.T) {
	for _, tc := range refCases() {
		t.Run(tc.name, func(t *testing.T) {
			src := writeCheckpoint(t, tc.cfg)
			m := importModel(t, src, tc.opts)
			ref, err := reference.Load(src)
			if err != nil {
				t.Fatal(err)
			}
			rt, err := shards.OpenRuntime(shards.RuntimeConfig{SessionPerBlock: tc.perBlock})
			if err != nil {
				t.Fatal(err)
			}
			span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
			if err != nil {
				t.Fatal(err)
			}
			defer span.Close()
			sess := span.NewSession()
			defer sess.Close()
			rs := ref.NewSession()

			tokens, fed := append([]int64(nil), prompt...), 0
			worst, differ := 0.0, 0
			for step := range decodeSteps + 1 {
				out, err := sess.Step(shards.StepInputs(m.Manifest.Decoder, tokens, fed))
				if err != nil {
					t.Fatalf("step %d: %v", step, err)
				}
				want, err := rs.Step(tokens[fed:])
				if err != nil {
					t.Fatal(err)
				}
				got := rows(t, out["logits"])
				if len(got) != len(want) {
					t.Fatalf("step %d: %d positions, reference %d", step, len(got), len(want))
				}
				for p := range got {
					d := relDiff(got[p], want[p])
					worst = max(worst, d)
					if d > tc.tol {
						t.Fatalf("step %d position %d: logits differ by %.3g of the largest, tolerance %.3g", step, p, d, tc.tol)
					}
				}
				last := len(got) - 1
				next, refNext := argmax(got[last]), argmax(want[last])
				if next != refNext {
					if tc.tol == tolFloat32 {
						t.Fatalf("step %d: greedy token %d, reference %d", step, next, refNext)
					}
					differ++
				}
				fed = len(tokens)
				tokens = append(tokens, refNext)
			}
			if differ > decodeSteps/8 {
				t.Fatalf("%d of %d greedy tokens differ from the reference's", differ, decodeSteps+1)
			}
			t.Logf("%s, %d blocks, weights %s: max |logit diff| / max |logit| = %.3g over %d prompt tokens and %d steps; %d greedy tokens differ",
				tc.cfg.Architecture, len(m.Manifest.Blocks), m.Manifest.Info.DType, worst, len(prompt), decodeSteps, differ)
		})
	}
}

// TestPaddingIsMasked checks the attention mask with grouped-query
// attention: a prompt left-padded inside a batch gives the logits it gives
// alone.
func TestPaddingIsMasked(t *testing.T) {
	m := importModel(t, writeCheckpoint(t, checkpoint.Tiny(checkpoint.Qwen3)), hf.Options{DType: "float32"})
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()
	long, short := []int64{5, 6, 7, 8, 9, 10}, []int64{11, 12, 13}
	pad := len(long) - len(short)
	ids := append(append([]int64(nil), long...), append(make([]int64, pad), short...)...)
	pos := []int64{0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 1, 2}
	mask := []int64{1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1}
	out, err := span.Run(shards.Tensors{
		"input_ids":      protocol.NewTensor([]int64{2, 6}, ids),
		"position_ids":   protocol.NewTensor([]int64{2, 6}, pos),
		"attention_mask": protocol.NewTensor([]int64{2, 6}, mask),
	})
	if err != nil {
		t.Fatal(err)
	}
	alone, err := span.Run(shards.StepInputs(m.Manifest.Decoder, short, 0))
	if err != nil {
		t.Fatal(err)
	}
	padded, want := rows(t, out["logits"]), rows(t, alone["logits"])
	for p := range short {
		if d := relDiff(padded[6+pad+p], toFloat64(want[p])); d > 1e-5 {
			t.Fatalf("position %d: padding changes the logits by %.3g", p, d)
		}
	}
}

// rows returns logits [1 or batch, seq, vocab] as one row per position.
func rows(tb testing.TB, l *protocol.Tensor) [][]float64 {
	tb.Helper()
	v, err := protocol.View[float32](l)
	if err != nil {
		tb.Fatal(err)
	}
	vocab := int(l.Shape[2])
	out := make([][]float64, len(v)/vocab)
	for r := range out {
		out[r] = toFloat64(v[r*vocab : (r+1)*vocab])
	}
	return out
}

func toFloat64[T float32 | float64](v []T) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}

// relDiff is the largest |got-want| over the largest |want|.
func relDiff(got, want []float64) float64 {
	d, m := 0.0, 0.0
	for i := range want {
		d = max(d, math.Abs(got[i]-want[i]))
		m = max(m, math.Abs(want[i]))
	}
	return d / m
}

func argmax(v []float64) int64 {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return int64(best)
}
