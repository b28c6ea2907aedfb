package hf

import (
	"fmt"
	"math"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// Names of the imported model's tensors, as the GPT test model of
// shards/build names them.
const (
	inputIDs      = "input_ids"      // int64 [batch, seq]
	positionIDs   = "position_ids"   // int64 [batch, seq]
	attentionMask = "attention_mask" // int64 [batch, total], 1 = attend
	logitsName    = "logits"         // float32 [batch, seq, vocab]
)

// A blockPlan is one block to write: its spec (without CID and size) and
// the function that emits its nodes and weights.
type blockPlan struct {
	spec shards.BlockSpec
	emit func(g *graph)
}

// hidden is the residual stream after i decoder layers.
func (c *Config) hidden(i int) shards.TensorSpec {
	return tensor(fmt.Sprintf("h%d", i), protocol.Float32, "batch", "seq", c.Hidden)
}

func (c *Config) modelIO() (inputs, outputs []shards.TensorSpec) {
	return []shards.TensorSpec{
			tensor(inputIDs, protocol.Int64, "batch", "seq"),
			tensor(positionIDs, protocol.Int64, "batch", "seq"),
			tensor(attentionMask, protocol.Int64, "batch", "total"),
		}, []shards.TensorSpec{
			tensor(logitsName, protocol.Float32, "batch", "seq", c.Vocab),
		}
}

// plan lists the model's blocks: the embedding, the decoder layers
// perBlock at a time, and the head.
func (c *Config) plan(perBlock int) []blockPlan {
	inputs, outputs := c.modelIO()
	ids, pos, mask := inputs[0], inputs[1], inputs[2]
	plans := []blockPlan{c.embedding(ids)}
	for a := 0; a < c.Layers; a += perBlock {
		plans = append(plans, c.decoderBlock(a, min(a+perBlock, c.Layers), pos, mask))
	}
	return append(plans, c.head(outputs[0]))
}

func (c *Config) embedding(ids shards.TensorSpec) blockPlan {
	h := c.hidden(0)
	return blockPlan{
		spec: shards.BlockSpec{Inputs: []shards.TensorSpec{ids}, Outputs: []shards.TensorSpec{h}},
		emit: func(g *graph) {
			g.scope = "embed"
			// Gather on the table as stored, then Cast the rows: a float16
			// table is never widened as a whole.
			table := g.rawWeight("model.embed_tokens.weight", []int64{int64(c.Vocab), int64(c.Hidden)})
			if g.dtype == protocol.Float32 {
				g.opTo(h.Name, "Gather", in(table, ids.Name))
				return
			}
			g.opTo(h.Name, "Cast", in(g.op("Gather", in(table, ids.Name))), attrInt("to", int64(protocol.Float32)))
		},
	}
}

func (c *Config) cache(kind string, i int, length string) shards.TensorSpec {
	return tensor(fmt.Sprintf("%s_%d", kind, i), protocol.Float32, "batch", c.KVHeads, length, c.HeadDim)
}

// decoderBlock is decoder layers [a, b) as one block.
func (c *Config) decoderBlock(a, b int, pos, mask shards.TensorSpec) blockPlan {
	x, y := c.hidden(a), c.hidden(b)
	spec := shards.BlockSpec{Inputs: []shards.TensorSpec{x, pos, mask}, Outputs: []shards.TensorSpec{y}}
	for i := a; i < b; i++ {
		pk, pv := c.cache("past_key", i, "past"), c.cache("past_value", i, "past")
		sk, sv := c.cache("present_key", i, "total"), c.cache("present_value", i, "total")
		spec.Inputs = append(spec.Inputs, pk, pv)
		spec.Outputs = append(spec.Outputs, sk, sv)
		spec.State = append(spec.State, shards.StatePair{Input: pk.Name, Output: sk.Name}, shards.StatePair{Input: pv.Name, Output: sv.Name})
	}
	return blockPlan{spec: spec, emit: func(g *graph) {
		g.scope = fmt.Sprintf("block%d", a)
		shape := g.op("Shape", in(x.Name))
		bs := g.op("Slice", in(shape, g.ints("[0]", 0), g.ints("[2]", 2))) // [batch, seq]
		flat := g.op("Reshape", in(x.Name, g.ints(fmt.Sprintf("[-1,%d]", c.Hidden), -1, int64(c.Hidden))))
		r := rope{}
		r.cos, r.sin = c.rotary(g, pos.Name)
		allowed := attendable(g, fmt.Sprintf("past_key_%d", a), mask.Name)
		for i := a; i < b; i++ {
			g.scope = fmt.Sprintf("layer%d", i)
			flat = c.layer(g, i, flat, bs, r, allowed)
		}
		g.scope = fmt.Sprintf("block%d", a)
		g.opTo(y.Name, "Reshape", in(flat, g.op("Concat", in(bs, g.ints(fmt.Sprintf("[%d]", c.Hidden), int64(c.Hidden))), attrInt("axis", 0))))
	}}
}

type rope struct{ cos, sin string } // float32 [batch, 1, seq, head_dim]

// rotary returns RoPE's cos and sin tables for the positions, with the
// inverse frequencies computed at import in float64 and stored as a
// float32 constant, as Hugging Face keeps inv_freq.
func (c *Config) rotary(g *graph, pos string) (cos, sin string) {
	p := g.op("Unsqueeze", in(g.op("Cast", in(pos), attrInt("to", int64(protocol.Float32))), g.ints("axes[2]", 2))) // [b, s, 1]
	freqs := g.op("Mul", in(p, g.floats("inv_freq", float32s(c.InvFreq()))))                                        // [b, s, d/2]
	emb := g.op("Concat", in(freqs, freqs), attrInt("axis", -1))                                                    // [b, s, d]
	axis1 := g.ints("axes[1]", 1)
	return g.op("Unsqueeze", in(g.op("Cos", in(emb)), axis1)), g.op("Unsqueeze", in(g.op("Sin", in(emb)), axis1))
}

// apply rotates x [batch, heads, seq, head_dim] as Hugging Face's
// apply_rotary_pos_emb: x·cos + rotate_half(x)·sin, rotate_half(x) being
// (-x2, x1) for the halves x1, x2 of the last axis.
func (r rope) apply(g *graph, x string, headDim int) string {
	half := int64(headDim / 2)
	axis := g.ints("[-1]", -1)
	x1 := g.op("Slice", in(x, g.ints("[0]", 0), g.ints(fmt.Sprintf("[%d]", half), half), axis))
	x2 := g.op("Slice", in(x, g.ints(fmt.Sprintf("[%d]", half), half), g.ints(fmt.Sprintf("[%d]", 2*half), 2*half), axis))
	rot := g.op("Concat", in(g.op("Neg", in(x2)), x1), attrInt("axis", -1))
	return g.op("Add", in(g.op("Mul", in(x, r.cos)), g.op("Mul", in(rot, r.sin))))
}

// attendable returns a bool [batch, 1, seq, total] tensor saying which keys
// each query may attend: the query at position past+j sees key t when
// t <= past+j (causal) and mask[b, t] is 1 (not padding). past is read off
// the first layer's cache, total off the mask.
func attendable(g *graph, past, mask string) string {
	dim := func(t string, i int64) string {
		return g.op("Gather", in(g.op("Shape", in(t)), g.scalarInt(fmt.Sprint(i), i)), attrInt("axis", 0))
	}
	p, t := dim(past, 2), dim(mask, 1)
	zero, one := g.scalarInt("0", 0), g.scalarInt("1", 1)
	queries := g.op("Unsqueeze", in(g.op("Range", in(p, t, one)), g.ints("axes[1]", 1))) // [seq, 1]
	keys := g.op("Range", in(zero, t, one))                                              // [total]
	causal := g.op("LessOrEqual", in(keys, queries))                                     // [seq, total]
	pad := g.op("Cast", in(g.op("Unsqueeze", in(mask, g.ints("axes[1,2]", 1, 2)))),      // [batch, 1, 1, total]
		attrInt("to", int64(onnxpb.TensorProto_BOOL)))
	return g.op("And", in(causal, pad))
}

// layer emits decoder layer i on the flattened residual stream x
// [batch·seq, hidden] and returns the new one.
func (c *Config) layer(g *graph, i int, x, bs string, r rope, allowed string) string {
	p := fmt.Sprintf("model.layers.%d.", i)
	nH, kvH, d := int64(c.Heads), int64(c.KVHeads), int64(c.HeadDim)
	heads := func(t string, n int64, norm string) string { // [b·s, n·d] -> [b, n, s, d]
		t = g.op("Reshape", in(t, g.op("Concat", in(bs, g.ints(fmt.Sprintf("[%d,%d]", n, d), n, d)), attrInt("axis", 0))))
		if c.QKNorm && norm != "" {
			t = g.rmsNorm(t, p+norm, c.HeadDim, c.RMSNormEps)
		}
		return g.op("Transpose", in(t), attrInts("perm", 0, 2, 1, 3))
	}

	// Attention.
	a := g.rmsNorm(x, p+"input_layernorm.weight", c.Hidden, c.RMSNormEps)
	q := heads(g.linear(p+"self_attn.q_proj", a, c.Hidden, c.Heads*c.HeadDim, c.AttentionBias), nH, "self_attn.q_norm.weight")
	k := heads(g.linear(p+"self_attn.k_proj", a, c.Hidden, c.KVHeads*c.HeadDim, c.AttentionBias), kvH, "self_attn.k_norm.weight")
	v := heads(g.linear(p+"self_attn.v_proj", a, c.Hidden, c.KVHeads*c.HeadDim, c.AttentionBias), kvH, "")
	q, k = r.apply(g, q, c.HeadDim), r.apply(g, k, c.HeadDim)
	presK, presV := fmt.Sprintf("present_key_%d", i), fmt.Sprintf("present_value_%d", i)
	g.opTo(presK, "Concat", in(fmt.Sprintf("past_key_%d", i), k), attrInt("axis", 2))
	g.opTo(presV, "Concat", in(fmt.Sprintf("past_value_%d", i), v), attrInt("axis", 2))

	// Grouped-query attention without repeating the cache: query head h
	// uses KV head h / (heads/kv_heads), so the queries of one KV head are
	// contiguous and [b, heads, s, d] reshapes to [b, kv_heads, rep·s, d].
	grouped := g.op("Reshape", in(q, g.ints(fmt.Sprintf("[0,%d,-1,%d]", kvH, d), 0, kvH, -1, d)))
	scores := g.op("MatMul", in(grouped, g.op("Transpose", in(presK), attrInts("perm", 0, 1, 3, 2)))) // [b, kv, rep·s, t]
	scores = g.op("Reshape", in(scores, g.ints(fmt.Sprintf("[0,%d,-1,0]", nH), 0, nH, -1, 0)))        // [b, heads, s, t]
	scores = g.op("Mul", in(scores, g.scalarFloat(fmt.Sprintf("1/sqrt(%d)", d), float32(1/math.Sqrt(float64(d))))))
	scores = g.op("Where", in(allowed, scores, g.scalarFloat("-1e9", -1e9)))
	probs := g.op("Softmax", in(scores), attrInt("axis", -1))
	probs = g.op("Reshape", in(probs, g.ints(fmt.Sprintf("[0,%d,-1,0]", kvH), 0, kvH, -1, 0)))
	o := g.op("MatMul", in(probs, presV))                                                // [b, kv, rep·s, d]
	o = g.op("Reshape", in(o, g.ints(fmt.Sprintf("[0,%d,-1,%d]", nH, d), 0, nH, -1, d))) // [b, heads, s, d]
	o = g.op("Transpose", in(o), attrInts("perm", 0, 2, 1, 3))
	o = g.op("Reshape", in(o, g.ints(fmt.Sprintf("[-1,%d]", nH*d), -1, nH*d)))
	h := g.op("Add", in(x, g.linear(p+"self_attn.o_proj", o, c.Heads*c.HeadDim, c.Hidden, c.OutputBias)))

	// SwiGLU MLP.
	m := g.rmsNorm(h, p+"post_attention_layernorm.weight", c.Hidden, c.RMSNormEps)
	gate := g.silu(g.linear(p+"mlp.gate_proj", m, c.Hidden, c.Intermediate, c.MLPBias))
	up := g.linear(p+"mlp.up_proj", m, c.Hidden, c.Intermediate, c.MLPBias)
	down := g.linear(p+"mlp.down_proj", g.op("Mul", in(gate, up)), c.Intermediate, c.Hidden, c.MLPBias)
	return g.op("Add", in(h, down))
}

func (c *Config) head(logits shards.TensorSpec) blockPlan {
	x := c.hidden(c.Layers)
	return blockPlan{
		spec: shards.BlockSpec{Inputs: []shards.TensorSpec{x}, Outputs: []shards.TensorSpec{logits}},
		emit: func(g *graph) {
			g.scope = "head"
			shape := g.op("Shape", in(x.Name))
			bs := g.op("Slice", in(shape, g.ints("[0]", 0), g.ints("[2]", 2)))
			flat := g.op("Reshape", in(x.Name, g.ints(fmt.Sprintf("[-1,%d]", c.Hidden), -1, int64(c.Hidden))))
			n := g.rmsNorm(flat, "model.norm.weight", c.Hidden, c.RMSNormEps)
			// lm_head.weight is [vocab, hidden]; tied, it is the embedding
			// table itself, under the name lm_head.weight so that a span
			// fusing the embedding and the head has no clash.
			src := "lm_head.weight"
			if c.TieEmbeddings {
				src = "model.embed_tokens.weight"
			}
			w := g.weight(src, []int64{int64(c.Vocab), int64(c.Hidden)}, "lm_head.weight")
			l := g.op("Gemm", in(n, w), attrInt("transB", 1))
			g.opTo(logits.Name, "Reshape", in(l, g.op("Concat", in(bs, g.ints(fmt.Sprintf("[%d]", c.Vocab), int64(c.Vocab))), attrInt("axis", 0))))
		},
	}
}
