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
			g.Scope = "embed"
			if g.quant.On() {
				data, scales, q := g.quantWeight("model.embed_tokens.weight", c.Vocab, c.Hidden, true)
				g.gatherBlockQuantized(h.Name, data, scales, ids.Name, q)
				return
			}
			// Gather on the table as stored, then Cast the rows: a float16
			// table is never widened as a whole.
			table := g.rawWeight("model.embed_tokens.weight", []int64{int64(c.Vocab), int64(c.Hidden)})
			if g.dtype == protocol.Float32 {
				g.OpTo(h.Name, "Gather", in(table, ids.Name))
				return
			}
			g.OpTo(h.Name, "Cast", in(g.Op("Gather", in(table, ids.Name))), attrInt("to", int64(protocol.Float32)))
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
		g.Scope = fmt.Sprintf("block%d", a)
		shape := g.Op("Shape", in(x.Name))
		bs := g.Op("Slice", in(shape, g.Ints("[0]", 0), g.Ints("[2]", 2))) // [batch, seq]
		flat := g.Op("Reshape", in(x.Name, g.Ints(fmt.Sprintf("[-1,%d]", c.Hidden), -1, int64(c.Hidden))))
		r := rope{}
		r.cos, r.sin = c.rotary(g, pos.Name)
		allowed := attendable(g, fmt.Sprintf("past_key_%d", a), mask.Name)
		for i := a; i < b; i++ {
			g.Scope = fmt.Sprintf("layer%d", i)
			flat = c.layer(g, i, flat, bs, r, allowed)
		}
		g.Scope = fmt.Sprintf("block%d", a)
		g.OpTo(y.Name, "Reshape", in(flat, g.Op("Concat", in(bs, g.Ints(fmt.Sprintf("[%d]", c.Hidden), int64(c.Hidden))), attrInt("axis", 0))))
	}}
}

type rope struct{ cos, sin string } // float32 [batch, 1, seq, head_dim]

// rotary returns RoPE's cos and sin tables for the positions, with the
// inverse frequencies computed at import in float64 and stored as a
// float32 constant, as Hugging Face keeps inv_freq.
func (c *Config) rotary(g *graph, pos string) (cos, sin string) {
	p := g.Op("Unsqueeze", in(g.Op("Cast", in(pos), attrInt("to", int64(protocol.Float32))), g.Ints("axes[2]", 2))) // [b, s, 1]
	freqs := g.Op("Mul", in(p, g.Floats("inv_freq", float32s(c.InvFreq()))))                                        // [b, s, d/2]
	emb := g.Op("Concat", in(freqs, freqs), attrInt("axis", -1))                                                    // [b, s, d]
	axis1 := g.Ints("axes[1]", 1)
	return g.Op("Unsqueeze", in(g.Op("Cos", in(emb)), axis1)), g.Op("Unsqueeze", in(g.Op("Sin", in(emb)), axis1))
}

// apply rotates x [batch, heads, seq, head_dim] as Hugging Face's
// apply_rotary_pos_emb: x·cos + rotate_half(x)·sin, rotate_half(x) being
// (-x2, x1) for the halves x1, x2 of the last axis.
func (r rope) apply(g *graph, x string, headDim int) string {
	half := int64(headDim / 2)
	axis := g.Ints("[-1]", -1)
	x1 := g.Op("Slice", in(x, g.Ints("[0]", 0), g.Ints(fmt.Sprintf("[%d]", half), half), axis))
	x2 := g.Op("Slice", in(x, g.Ints(fmt.Sprintf("[%d]", half), half), g.Ints(fmt.Sprintf("[%d]", 2*half), 2*half), axis))
	rot := g.Op("Concat", in(g.Op("Neg", in(x2)), x1), attrInt("axis", -1))
	return g.Op("Add", in(g.Op("Mul", in(x, r.cos)), g.Op("Mul", in(rot, r.sin))))
}

// attendable returns a bool [batch, 1, seq, total] tensor saying which keys
// each query may attend: the query at position past+j sees key t when
// t <= past+j (causal) and mask[b, t] is 1 (not padding). past is read off
// the first layer's cache, total off the mask.
func attendable(g *graph, past, mask string) string {
	dim := func(t string, i int64) string {
		return g.Op("Gather", in(g.Op("Shape", in(t)), g.ScalarInt(fmt.Sprint(i), i)), attrInt("axis", 0))
	}
	p, t := dim(past, 2), dim(mask, 1)
	zero, one := g.ScalarInt("0", 0), g.ScalarInt("1", 1)
	queries := g.Op("Unsqueeze", in(g.Op("Range", in(p, t, one)), g.Ints("axes[1]", 1))) // [seq, 1]
	keys := g.Op("Range", in(zero, t, one))                                              // [total]
	causal := g.Op("LessOrEqual", in(keys, queries))                                     // [seq, total]
	pad := g.Op("Cast", in(g.Op("Unsqueeze", in(mask, g.Ints("axes[1,2]", 1, 2)))),      // [batch, 1, 1, total]
		attrInt("to", int64(onnxpb.TensorProto_BOOL)))
	return g.Op("And", in(causal, pad))
}

// layer emits decoder layer i on the flattened residual stream x
// [batch·seq, hidden] and returns the new one.
func (c *Config) layer(g *graph, i int, x, bs string, r rope, allowed string) string {
	p := fmt.Sprintf("model.layers.%d.", i)
	nH, kvH, d := int64(c.Heads), int64(c.KVHeads), int64(c.HeadDim)
	heads := func(t string, n int64, norm string) string { // [b·s, n·d] -> [b, n, s, d]
		t = g.Op("Reshape", in(t, g.Op("Concat", in(bs, g.Ints(fmt.Sprintf("[%d,%d]", n, d), n, d)), attrInt("axis", 0))))
		if c.QKNorm && norm != "" {
			t = g.rmsNorm(t, p+norm, c.HeadDim, c.RMSNormEps)
		}
		return g.Op("Transpose", in(t), attrInts("perm", 0, 2, 1, 3))
	}

	// Attention.
	a := g.rmsNorm(x, p+"input_layernorm.weight", c.Hidden, c.RMSNormEps)
	q := heads(g.linear(p+"self_attn.q_proj", a, c.Hidden, c.Heads*c.HeadDim, c.AttentionBias), nH, "self_attn.q_norm.weight")
	k := heads(g.linear(p+"self_attn.k_proj", a, c.Hidden, c.KVHeads*c.HeadDim, c.AttentionBias), kvH, "self_attn.k_norm.weight")
	v := heads(g.linear(p+"self_attn.v_proj", a, c.Hidden, c.KVHeads*c.HeadDim, c.AttentionBias), kvH, "")
	q, k = r.apply(g, q, c.HeadDim), r.apply(g, k, c.HeadDim)
	presK, presV := fmt.Sprintf("present_key_%d", i), fmt.Sprintf("present_value_%d", i)
	g.OpTo(presK, "Concat", in(fmt.Sprintf("past_key_%d", i), k), attrInt("axis", 2))
	g.OpTo(presV, "Concat", in(fmt.Sprintf("past_value_%d", i), v), attrInt("axis", 2))

	// Grouped-query attention without repeating the cache: query head h
	// uses KV head h / (heads/kv_heads), so the queries of one KV head are
	// contiguous and [b, heads, s, d] reshapes to [b, kv_heads, rep·s, d].
	grouped := g.Op("Reshape", in(q, g.Ints(fmt.Sprintf("[0,%d,-1,%d]", kvH, d), 0, kvH, -1, d)))
	scores := g.Op("MatMul", in(grouped, g.Op("Transpose", in(presK), attrInts("perm", 0, 1, 3, 2)))) // [b, kv, rep·s, t]
	scores = g.Op("Reshape", in(scores, g.Ints(fmt.Sprintf("[0,%d,-1,0]", nH), 0, nH, -1, 0)))        // [b, heads, s, t]
	scores = g.Op("Mul", in(scores, g.ScalarFloat(fmt.Sprintf("1/sqrt(%d)", d), float32(1/math.Sqrt(float64(d))))))
	scores = g.Op("Where", in(allowed, scores, g.ScalarFloat("-1e9", -1e9)))
	probs := g.Op("Softmax", in(scores), attrInt("axis", -1))
	probs = g.Op("Reshape", in(probs, g.Ints(fmt.Sprintf("[0,%d,-1,0]", kvH), 0, kvH, -1, 0)))
	o := g.Op("MatMul", in(probs, presV))                                                // [b, kv, rep·s, d]
	o = g.Op("Reshape", in(o, g.Ints(fmt.Sprintf("[0,%d,-1,%d]", nH, d), 0, nH, -1, d))) // [b, heads, s, d]
	o = g.Op("Transpose", in(o), attrInts("perm", 0, 2, 1, 3))
	o = g.Op("Reshape", in(o, g.Ints(fmt.Sprintf("[-1,%d]", nH*d), -1, nH*d)))
	h := g.Op("Add", in(x, g.linear(p+"self_attn.o_proj", o, c.Heads*c.HeadDim, c.Hidden, c.OutputBias)))

	// SwiGLU MLP.
	m := g.rmsNorm(h, p+"post_attention_layernorm.weight", c.Hidden, c.RMSNormEps)
	gate := g.silu(g.linear(p+"mlp.gate_proj", m, c.Hidden, c.Intermediate, c.MLPBias))
	up := g.linear(p+"mlp.up_proj", m, c.Hidden, c.Intermediate, c.MLPBias)
	down := g.linear(p+"mlp.down_proj", g.Op("Mul", in(gate, up)), c.Intermediate, c.Hidden, c.MLPBias)
	return g.Op("Add", in(h, down))
}

func (c *Config) head(logits shards.TensorSpec) blockPlan {
	x := c.hidden(c.Layers)
	return blockPlan{
		spec: shards.BlockSpec{Inputs: []shards.TensorSpec{x}, Outputs: []shards.TensorSpec{logits}},
		emit: func(g *graph) {
			g.Scope = "head"
			shape := g.Op("Shape", in(x.Name))
			bs := g.Op("Slice", in(shape, g.Ints("[0]", 0), g.Ints("[2]", 2)))
			flat := g.Op("Reshape", in(x.Name, g.Ints(fmt.Sprintf("[-1,%d]", c.Hidden), -1, int64(c.Hidden))))
			n := g.rmsNorm(flat, "model.norm.weight", c.Hidden, c.RMSNormEps)
			// lm_head.weight is [vocab, hidden]; tied, it is the embedding
			// table itself, under the name lm_head.weight so that a span
			// fusing the embedding and the head has no clash.
			src := "lm_head.weight"
			if c.TieEmbeddings {
				src = "model.embed_tokens.weight"
			}
			var l string
			if g.quant.On() {
				packed, scales, q := g.quantWeight(src, c.Vocab, c.Hidden, false, "lm_head.weight")
				l = g.matMulNBits(n, packed, scales, "", c.Hidden, c.Vocab, q)
			} else {
				w := g.weight(src, []int64{int64(c.Vocab), int64(c.Hidden)}, "lm_head.weight")
				l = g.Op("Gemm", in(n, w), attrInt("transB", 1))
			}
			g.OpTo(logits.Name, "Reshape", in(l, g.Op("Concat", in(bs, g.Ints(fmt.Sprintf("[%d]", c.Vocab), int64(c.Vocab))), attrInt("axis", 0))))
		},
	}
}
