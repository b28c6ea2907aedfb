package build_test

import (
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// The acceptance model: 8 decoder blocks of width 256 (10 blocks in all).
var gpt8 = build.GPTConfig{Layers: 8, Dim: 256, Heads: 4, Seed: 7}

func buildGPT(tb testing.TB, cfg build.GPTConfig) *shards.Model {
	tb.Helper()
	m, err := build.GPT(cfg, tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

// batch is a batch of token sequences being decoded, left-padded to a common
// length: padding has token 0, mask 0 and position 0, as tokenizers and
// generation loops commonly lay it out.
type batch struct {
	ids, mask, pos [][]int64
}

func newBatch(prompts ...string) *batch {
	longest := 0
	for _, p := range prompts {
		longest = max(longest, len(p))
	}
	b := &batch{}
	for _, p := range prompts {
		pad := longest - len(p)
		ids, mask, pos := make([]int64, longest), make([]int64, longest), make([]int64, longest)
		for j := range len(p) {
			ids[pad+j], mask[pad+j], pos[pad+j] = int64(p[j]), 1, int64(j)
		}
		b.ids, b.mask, b.pos = append(b.ids, ids), append(b.mask, mask), append(b.pos, pos)
	}
	return b
}

func (b *batch) len() int { return len(b.ids[0]) }

// append adds one token to each row.
func (b *batch) append(tokens []int64) {
	for r, tok := range tokens {
		b.ids[r] = append(b.ids[r], tok)
		b.mask[r] = append(b.mask[r], 1)
		b.pos[r] = append(b.pos[r], b.pos[r][len(b.pos[r])-1]+1)
	}
}

// inputs are the model inputs for the tokens from position from on, with the
// attention mask over the whole sequence (past included).
func (b *batch) inputs(from int) shards.Tensors {
	rows, n := int64(len(b.ids)), int64(b.len()-from)
	var ids, pos, mask []int64
	for r := range b.ids {
		ids = append(ids, b.ids[r][from:]...)
		pos = append(pos, b.pos[r][from:]...)
		mask = append(mask, b.mask[r]...)
	}
	return shards.Tensors{
		"input_ids":      protocol.NewTensor([]int64{rows, n}, ids),
		"position_ids":   protocol.NewTensor([]int64{rows, n}, pos),
		"attention_mask": protocol.NewTensor([]int64{rows, int64(b.len())}, mask),
	}
}

// lastLogits returns each row's logits at the last position.
func lastLogits(tb testing.TB, out shards.Tensors) [][]float32 {
	tb.Helper()
	l := out["logits"]
	v, err := protocol.View[float32](l)
	if err != nil {
		tb.Fatal(err)
	}
	rows, seq, vocab := int(l.Shape[0]), int(l.Shape[1]), int(l.Shape[2])
	last := make([][]float32, rows)
	for r := range last {
		last[r] = v[(r*seq+seq-1)*vocab : (r*seq+seq)*vocab]
	}
	return last
}

func argmax(v []float32) int64 {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return int64(best)
}

func maxDiff(a, b [][]float32) float64 {
	worst := 0.0
	for r := range a {
		for i := range a[r] {
			d := float64(a[r][i] - b[r][i])
			worst = max(worst, d, -d)
		}
	}
	return worst
}

func TestGPTBlocksEqualWhole(t *testing.T) {
	rt := openRuntime(t)
	m := buildGPT(t, gpt8)
	if n := len(m.Manifest.Blocks); n != gpt8.Layers+2 {
		t.Fatalf("%d blocks, want %d", n, gpt8.Layers+2)
	}
	// Two prompts of different lengths: the second is left-padded, so the
	// attention mask matters.
	in := newBatch("the mesh is ", "hello").inputs(0)
	want := run(t, loadWhole(t, rt, m), in)
	requireClose(t, "one span of all blocks", run(t, loadSpan(t, rt, m, 0, len(m.Manifest.Blocks)), in), want, 1e-5)
	requireClose(t, "one span per block", chainBlocks(t, rt, m, in), want, 1e-5)
}

// TestGPTDecodeWithCache decodes greedily for 64 steps after a prompt,
// through the blocks with their KV caches, and checks every step against
// recomputing the whole sequence without a cache and against full.onnx
// decoding with its own cache.
//
// It runs twice: with the span's blocks fused into one onnxruntime session
// (what a node does) and with one session per block, each block keeping its
// own KV cache (what a chain of peers does).
func TestGPTDecodeWithCache(t *testing.T) {
	m := buildGPT(t, gpt8)
	for _, perBlock := range []bool{false, true} {
		name := map[bool]string{false: "fused", true: "session-per-block"}[perBlock]
		t.Run(name, func(t *testing.T) {
			rt, err := shards.OpenRuntime(shards.RuntimeConfig{SessionPerBlock: perBlock})
			if err != nil {
				t.Fatal(err)
			}
			testDecodeWithCache(t, rt, m, perBlock)
		})
	}
}

func testDecodeWithCache(t *testing.T, rt *shards.Runtime, m *shards.Model, perBlock bool) {
	const steps = 64
	blocks := loadSpan(t, rt, m, 0, len(m.Manifest.Blocks))
	if want := map[bool]int{false: 1, true: len(m.Manifest.Blocks)}[perBlock]; blocks.Sessions() != want {
		t.Fatalf("span runs %d onnxruntime sessions, want %d", blocks.Sessions(), want)
	}
	cached := newSession(t, blocks)
	whole := newSession(t, loadWhole(t, rt, m))

	b := newBatch("once upon a time", "infermesh")
	from := 0 // the first step feeds the prompt, each later one a token
	worstRecompute, worstWhole := 0.0, 0.0
	for step := range steps + 1 {
		in := b.inputs(from)
		out, err := cached.Step(in)
		if err != nil {
			t.Fatalf("step %d: blocks: %v", step, err)
		}
		got := lastLogits(t, out)
		outWhole, err := whole.Step(in)
		if err != nil {
			t.Fatalf("step %d: full.onnx: %v", step, err)
		}
		viaWhole := lastLogits(t, outWhole)
		recomputed := lastLogits(t, run(t, blocks, b.inputs(0)))

		dr, dw := maxDiff(got, recomputed), maxDiff(got, viaWhole)
		worstRecompute, worstWhole = max(worstRecompute, dr), max(worstWhole, dw)
		if dr > 1e-4 {
			t.Fatalf("step %d: cached logits differ from recomputed ones by %g", step, dr)
		}
		if dw > 1e-4 {
			t.Fatalf("step %d: blocks' logits differ from full.onnx's by %g", step, dw)
		}
		next := make([]int64, len(got))
		for r := range got {
			next[r] = argmax(got[r])
			if a, w := argmax(recomputed[r]), argmax(viaWhole[r]); a != next[r] || w != next[r] {
				t.Fatalf("step %d row %d: token %d with cache, %d recomputed, %d through full.onnx", step, r, next[r], a, w)
			}
		}
		from = b.len()
		b.append(next)
	}
	if cached.Steps() != steps+1 || whole.Steps() != steps+1 {
		t.Fatalf("sessions ran %d and %d steps, want %d", cached.Steps(), whole.Steps(), steps+1)
	}
	t.Logf("%d steps; max abs diff of logits: %.3g cache vs recompute, %.3g blocks vs full.onnx", steps, worstRecompute, worstWhole)
	t.Logf("decoded: %q / %q", bytesOf(b.ids[0]), bytesOf(b.ids[1]))
}

func bytesOf(ids []int64) []byte {
	out := make([]byte, len(ids))
	for i, id := range ids {
		out[i] = byte(id)
	}
	return out
}

// TestGPTPaddingIsMasked checks the attention mask and positions: a prompt
// left-padded inside a batch gives the logits it gives alone.
func TestGPTPaddingIsMasked(t *testing.T) {
	rt := openRuntime(t)
	m := buildGPT(t, build.GPTConfig{Layers: 2, Dim: 64, Heads: 4, Seed: 1})
	span := loadSpan(t, rt, m, 0, len(m.Manifest.Blocks))
	padded := lastLogits(t, run(t, span, newBatch("a longer prompt", "short").inputs(0)))
	alone := lastLogits(t, run(t, span, newBatch("short").inputs(0)))
	if d := maxDiff(padded[1:], alone); d > 1e-5 {
		t.Fatalf("padding changes the logits by %g", d)
	}
	// And the mask is not ignored: attending to the padding changes them.
	in := newBatch("a longer prompt", "short").inputs(0)
	mask, _ := protocol.View[int64](in["attention_mask"])
	for i := range mask {
		mask[i] = 1
	}
	if d := maxDiff(lastLogits(t, run(t, span, in))[1:], alone); d < 1e-3 {
		t.Fatalf("unmasking the padding changes the logits by only %g", d)
	}
}
