package build

import (
	"fmt"
	"math"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// GPTConfig sizes a GPT-style decoder. Zero fields take the defaults.
type GPTConfig struct {
	// Layers is the number of decoder blocks; 0 means 4. The model has
	// Layers+2 blocks: the embedding, the decoders and the head.
	Layers int
	// Dim is the width of the residual stream; 0 means 256.
	Dim int
	// Heads is the number of attention heads; 0 means 4. Dim must be a
	// multiple of Heads.
	Heads int
	// Vocab is the number of tokens; 0 means 256 (one per byte, the
	// "bytes" tokenizer). It must be at least 256.
	Vocab int
	// Context is the longest sequence, past included (the size of the
	// learned position embedding); 0 means 256.
	Context int
	// Seed draws the weights: the same config and seed give byte-identical
	// files.
	Seed int64
}

func (c GPTConfig) withDefaults() (GPTConfig, error) {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.Layers, 4)
	def(&c.Dim, 256)
	def(&c.Heads, 4)
	def(&c.Vocab, 256)
	def(&c.Context, 256)
	switch {
	case c.Layers < 0 || c.Dim < 0 || c.Heads < 0 || c.Context < 0:
		return c, fmt.Errorf("gpt: layers, dim, heads and context must be positive")
	case c.Dim%c.Heads != 0:
		return c, fmt.Errorf("gpt: dim %d is not a multiple of heads %d", c.Dim, c.Heads)
	case c.Vocab < 256:
		return c, fmt.Errorf("gpt: vocab %d is under 256, the byte tokenizer's", c.Vocab)
	}
	return c, nil
}

// Names of the GPT model's tensors.
const (
	gptInputIDs      = "input_ids"      // int64 [batch, seq]
	gptPositionIDs   = "position_ids"   // int64 [batch, seq]
	gptAttentionMask = "attention_mask" // int64 [batch, total], 1 = attend
	gptLogits        = "logits"         // float32 [batch, seq, vocab]
)

// GPT writes a GPT-style decoder with a KV cache into dir, and the same
// model unsplit as dir/full.onnx. Its blocks are:
//
//   - embed: input_ids and position_ids to h0 (token plus learned position
//     embedding);
//   - Layers pre-LayerNorm decoder blocks, block i reading h{i},
//     attention_mask and its KV cache past_key_i, past_value_i
//     [batch, heads, past, head_dim], and writing h{i+1} and present_key_i,
//     present_value_i [batch, heads, total, head_dim] with total = past+seq;
//     attention is causal (the query at position past+j sees keys
//     0..past+j) and skips keys whose attention_mask is 0;
//   - head: final LayerNorm and projection to logits.
//
// Tokens are bytes (Vocab 256 by default).
func GPT(cfg GPTConfig, dir string) (*shards.Model, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	ids := tensor(gptInputIDs, protocol.Int64, "batch", "seq")
	pos := tensor(gptPositionIDs, protocol.Int64, "batch", "seq")
	mask := tensor(gptAttentionMask, protocol.Int64, "batch", "total")
	logits := tensor(gptLogits, protocol.Float32, "batch", "seq", c.Vocab)

	layers := []layer{c.embedding(ids, pos)}
	for i := range c.Layers {
		layers = append(layers, c.decoder(i, mask))
	}
	layers = append(layers, c.head(logits))

	m := &shards.Manifest{
		Name:    fmt.Sprintf("gpt-l%d-d%d-h%d-v%d-c%d-seed%d", c.Layers, c.Dim, c.Heads, c.Vocab, c.Context, c.Seed),
		Kind:    "gpt",
		Inputs:  []shards.TensorSpec{ids, pos, mask},
		Outputs: []shards.TensorSpec{logits},
		Decoder: &shards.DecoderSpec{
			Tokenizer:     "bytes",
			InputIDs:      gptInputIDs,
			PositionIDs:   gptPositionIDs,
			AttentionMask: gptAttentionMask,
			Logits:        gptLogits,
			Vocab:         c.Vocab,
			MaxContext:    c.Context,
		},
	}
	return write(dir, m, c.Seed, layers)
}

// hidden is the residual stream after i decoder blocks.
func (c GPTConfig) hidden(i int) shards.TensorSpec {
	return tensor(fmt.Sprintf("h%d", i), protocol.Float32, "batch", "seq", c.Dim)
}

func (c GPTConfig) embedding(ids, pos shards.TensorSpec) layer {
	h := c.hidden(0)
	return layer{
		scope: "embed",
		block: shards.BlockSpec{Inputs: []shards.TensorSpec{ids, pos}, Outputs: []shards.TensorSpec{h}},
		emit: func(g *graph) {
			wte := g.weight("token", []int64{int64(c.Vocab), int64(c.Dim)}, centered(1))
			wpe := g.weight("position", []int64{int64(c.Context), int64(c.Dim)}, centered(0.5))
			g.OpTo(h.Name, "Add", in(g.Op("Gather", in(wte, ids.Name)), g.Op("Gather", in(wpe, pos.Name))))
		},
	}
}

func (c GPTConfig) decoder(i int, mask shards.TensorSpec) layer {
	headDim := c.Dim / c.Heads
	cache := func(kind string, length string) shards.TensorSpec {
		return tensor(fmt.Sprintf("%s_%d", kind, i), protocol.Float32, "batch", c.Heads, length, headDim)
	}
	x, y := c.hidden(i), c.hidden(i+1)
	pastK, pastV := cache("past_key", "past"), cache("past_value", "past")
	presK, presV := cache("present_key", "total"), cache("present_value", "total")
	// Residual branches end in a projection scaled down by √(2·Layers), as
	// in GPT-2, so the residual stream stays O(1) however deep the model.
	out := 1 / math.Sqrt(2*float64(c.Layers))
	return layer{
		scope: fmt.Sprintf("layer%d", i),
		block: shards.BlockSpec{
			Inputs:  []shards.TensorSpec{x, mask, pastK, pastV},
			Outputs: []shards.TensorSpec{y, presK, presV},
			State:   []shards.StatePair{{Input: pastK.Name, Output: presK.Name}, {Input: pastV.Name, Output: presV.Name}},
		},
		emit: func(g *graph) {
			// Attention.
			a := g.layerNorm("ln1", x.Name, c.Dim)
			q := c.splitHeads(g, g.linear("q", a, c.Dim, c.Dim, 1))
			g.OpTo(presK.Name, "Concat", in(pastK.Name, c.splitHeads(g, g.linear("k", a, c.Dim, c.Dim, 1))), attrInt("axis", 2))
			g.OpTo(presV.Name, "Concat", in(pastV.Name, c.splitHeads(g, g.linear("v", a, c.Dim, c.Dim, 1))), attrInt("axis", 2))
			kT := g.Op("Transpose", in(presK.Name), attrInts("perm", 0, 1, 3, 2))
			scores := g.Op("Mul", in(g.Op("MatMul", in(q, kT)), g.ScalarFloat("1/sqrt(head_dim)", float32(1/math.Sqrt(float64(headDim))))))
			scores = g.Op("Where", in(attendable(g, pastK.Name, presK.Name, mask.Name), scores, g.ScalarFloat("-1e9", -1e9)))
			attn := g.Op("MatMul", in(g.Op("Softmax", in(scores), attrInt("axis", -1)), presV.Name))
			h := g.Op("Add", in(x.Name, g.linear("proj", c.mergeHeads(g, attn), c.Dim, c.Dim, out)))
			// MLP.
			m := g.linear("fc1", g.layerNorm("ln2", h, c.Dim), c.Dim, 4*c.Dim, 1)
			m = g.linear("fc2", g.gelu(m), 4*c.Dim, c.Dim, out)
			g.OpTo(y.Name, "Add", in(h, m))
		},
	}
}

// splitHeads turns [batch, seq, dim] into [batch, heads, seq, head_dim].
func (c GPTConfig) splitHeads(g *graph, x string) string {
	x = g.Op("Reshape", in(x, g.Ints("shape[0,0,heads,head_dim]", 0, 0, int64(c.Heads), int64(c.Dim/c.Heads))))
	return g.Op("Transpose", in(x), attrInts("perm", 0, 2, 1, 3))
}

// mergeHeads is splitHeads' inverse.
func (c GPTConfig) mergeHeads(g *graph, x string) string {
	x = g.Op("Transpose", in(x), attrInts("perm", 0, 2, 1, 3))
	return g.Op("Reshape", in(x, g.Ints("shape[0,0,dim]", 0, 0, int64(c.Dim))))
}

// attendable returns a bool [batch, 1, seq, total] tensor saying which keys
// each query may attend: the query at position past+j sees key t when
// t <= past+j (causal) and mask[b, t] is 1 (not padding). past and total
// are read off the cache tensors' shapes.
func attendable(g *graph, past, present, mask string) string {
	length := func(cache string) string { // dimension 2, as an int64 scalar
		return g.Op("Gather", in(g.Op("Shape", in(cache)), g.ScalarInt("2", 2)), attrInt("axis", 0))
	}
	p, t := length(past), length(present)
	zero, one := g.ScalarInt("0", 0), g.ScalarInt("1", 1)
	queries := g.Op("Unsqueeze", in(g.Op("Range", in(p, t, one)), g.Ints("axes[1]", 1))) // [seq, 1]
	keys := g.Op("Range", in(zero, t, one))                                              // [total]
	causal := g.Op("LessOrEqual", in(keys, queries))                                     // [seq, total]
	pad := g.Op("Cast", in(g.Op("Unsqueeze", in(mask, g.Ints("axes[1,2]", 1, 2)))),      // [batch, 1, 1, total]
		attrInt("to", int64(onnxpb.TensorProto_BOOL)))
	return g.Op("And", in(causal, pad))
}

func (c GPTConfig) head(logits shards.TensorSpec) layer {
	x := c.hidden(c.Layers)
	return layer{
		scope: "head",
		block: shards.BlockSpec{Inputs: []shards.TensorSpec{x}, Outputs: []shards.TensorSpec{logits}},
		emit: func(g *graph) {
			w := g.weight("logits.weight", []int64{int64(c.Dim), int64(c.Vocab)}, centered(1/math.Sqrt(float64(c.Dim))))
			g.OpTo(logits.Name, "MatMul", in(g.layerNorm("ln", x.Name, c.Dim), w))
		},
	}
}
