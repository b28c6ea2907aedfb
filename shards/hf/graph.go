package hf

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/internal/onnxgraph"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// producer names the importer in every block; the IR and opset versions
// are onnxgraph's (IR 8, opset 17), as shards/build's.
const producer = "infermesh shard import"

// graph accumulates one block's ONNX graph. Nodes and small constants live
// in the graph message; the checkpoint's weights are only referenced
// (weights), and streamed into the file when the block is written.
type graph struct {
	*onnxgraph.Graph
	weights []weightRef
	dtype   protocol.DType // what non-quantized weights are stored as: Float32 or Float16
	quant   Quantization   // how projections, the head and the embedding are stored
	// quantOf overrides quant for some source tensors (the embedding
	// and the head under q4, see Quantization.ends).
	quantOf map[string]Quantization
	casts   map[string]string
	contrib bool // the graph uses an operator of the com.microsoft domain
}

// weightPart says what a weightRef's initializer holds of its tensor.
type weightPart int

const (
	wholeWeight  weightPart = iota // the tensor, converted to the stored dtype
	packedWeight                   // its quantized integers, uint8 (see quant.go)
	weightScales                   // its quantization scales, float32
)

// weightRef is an initializer whose data comes from a source tensor:
// converted to dtype as it is written, or quantized (a packedWeight, then
// its weightScales, always in that order).
type weightRef struct {
	name   string         // initializer name
	tensor string         // source tensor name
	shape  []int64        // the source tensor's shape
	dims   []int64        // the initializer's shape
	dtype  protocol.DType // the initializer's element type
	part   weightPart
	quant  Quantization // of a packedWeight or weightScales
}

func (w weightRef) bytes() int64 { return protocol.NumElements(w.dims) * int64(w.dtype.Size()) }

func newGraph(name string, dtype protocol.DType, quant Quantization) *graph {
	return &graph{Graph: onnxgraph.New(name), casts: map[string]string{}, dtype: dtype, quant: quant}
}

// Shorthands for the onnxgraph helpers the decoder calls most.
var (
	in       = onnxgraph.In
	attrInt  = onnxgraph.AttrInt
	attrInts = onnxgraph.AttrInts
	tensor   = onnxgraph.Tensor
)

// weight declares the checkpoint tensor as an initializer called name (the
// tensor's own name unless given) and returns a float32 view of it: the
// initializer itself, or a Cast of it when weights are stored as float16
// (onnxruntime folds that Cast at load).
func (g *graph) weight(tensor string, shape []int64, name ...string) string {
	init := g.rawWeight(tensor, shape, name...)
	if g.dtype == protocol.Float32 {
		return init
	}
	if c, ok := g.casts[init]; ok {
		return c
	}
	c := init + ":float32"
	g.OpTo(c, "Cast", in(init), attrInt("to", int64(protocol.Float32)))
	g.casts[init] = c
	return c
}

// rawWeight declares the initializer in the stored element type.
func (g *graph) rawWeight(tensor string, shape []int64, name ...string) string {
	n := tensor
	if len(name) > 0 {
		n = name[0]
	}
	if g.Has(n) {
		return n
	}
	g.Reserve(n)
	g.weights = append(g.weights, weightRef{name: n, tensor: tensor, shape: shape, dims: shape, dtype: g.dtype})
	return n
}

// quantWeight declares the matrix tensor [n, k] quantized as g.quant (or
// its override in g.quantOf, returned as q): the
// initializers name (the tensor's name unless given; uint8 integers) and
// name:scales (float32 [n, k/block]). The integers are shaped for
// MatMulNBits ([n, k/block, block·bits/8]), or for GatherBlockQuantized
// ([n, k·bits/8]) when gather is set.
func (g *graph) quantWeight(tensor string, n, k int, gather bool, name ...string) (packed, scales string, q Quantization) {
	packed = tensor
	if len(name) > 0 {
		packed = name[0]
	}
	scales = packed + ":scales"
	q = g.quant
	if o, ok := g.quantOf[tensor]; ok {
		q = o
	}
	if g.Has(packed) {
		return packed, scales, q
	}
	shape := []int64{int64(n), int64(k)}
	dims := []int64{int64(n), int64(k / q.Block), int64(q.rowBytes(q.Block))}
	if gather {
		dims = []int64{int64(n), int64(q.rowBytes(k))}
	}
	g.Reserve(packed)
	g.Reserve(scales)
	g.weights = append(g.weights,
		weightRef{name: packed, tensor: tensor, shape: shape, dims: dims, dtype: protocol.Uint8, part: packedWeight, quant: q},
		weightRef{name: scales, tensor: tensor, shape: shape, dims: []int64{int64(n), int64(k / q.Block)}, dtype: protocol.Float32, part: weightScales, quant: q})
	return packed, scales, q
}

// Layers shared by the decoders.

// rmsNorm is x / sqrt(mean(x², last axis) + eps) · weight, in float32.
func (g *graph) rmsNorm(x, weight string, dim int, eps float64) string {
	w := g.weight(weight, []int64{int64(dim)})
	ms := g.Op("ReduceMean", in(g.Op("Mul", in(x, x))), attrInts("axes", -1), attrInt("keepdims", 1))
	rms := g.Op("Sqrt", in(g.Op("Add", in(ms, g.ScalarFloat(fmt.Sprintf("eps=%g", eps), float32(eps))))))
	return g.Op("Mul", in(g.Op("Div", in(x, rms)), w))
}

// linear is x·Wᵀ (+ b) on a 2-D x [n, in], for a Hugging Face Linear whose
// weight is [out, in]: Gemm with transB, so that nothing is transposed,
// neither at import nor when onnxruntime loads the block.
//
// With a quantization, the weight is quantized and the product is
// com.microsoft MatMulNBits, the bias its bias input.
func (g *graph) linear(prefix, x string, inDim, outDim int, bias bool) string {
	if g.quant.On() {
		packed, scales, q := g.quantWeight(prefix+".weight", outDim, inDim, false)
		b := ""
		if bias {
			b = g.weight(prefix+".bias", []int64{int64(outDim)})
		}
		return g.matMulNBits(x, packed, scales, b, inDim, outDim, q)
	}
	w := g.weight(prefix+".weight", []int64{int64(outDim), int64(inDim)})
	inputs := in(x, w)
	if bias {
		inputs = append(inputs, g.weight(prefix+".bias", []int64{int64(outDim)}))
	}
	return g.Op("Gemm", inputs, attrInt("transB", 1))
}

// silu is x·sigmoid(x).
func (g *graph) silu(x string) string { return g.Op("Mul", in(x, g.Op("Sigmoid", in(x)))) }

// encode encodes the graph's model without the streamed weights: header
// is the ModelProto's fields other than the graph, body the graph's fields.
func (g *graph) encode() (header, body []byte, err error) {
	opts := proto.MarshalOptions{Deterministic: true}
	if header, err = opts.Marshal(g.model()); err != nil {
		return nil, nil, err
	}
	if body, err = opts.Marshal(g.Proto); err != nil {
		return nil, nil, err
	}
	return header, body, nil
}

// contribDomain is onnxruntime's domain of contributed operators
// (MatMulNBits, GatherBlockQuantized), whose opset version 1 a block that
// uses them declares.
const contribDomain = "com.microsoft"

// contribOp adds a node of the com.microsoft domain whose output is out,
// or named after the op when out is "".
func (g *graph) contribOp(out, opType string, inputs []string, attrs ...*onnxpb.AttributeProto) string {
	if out == "" {
		out = g.Op(opType, inputs, attrs...)
	} else {
		g.OpTo(out, opType, inputs, attrs...)
	}
	g.Proto.Node[len(g.Proto.Node)-1].Domain = proto.String(contribDomain)
	g.contrib = true
	return out
}

// matMulNBits is x·Wᵀ (+ bias) for a weight W [n, k] quantized as q
// (packed and scales initializers in its layout, see quant.go) with
// com.microsoft MatMulNBits: x is [..., k], the result [..., n]. bias may be
// "". Its accuracy_level is accuracyLevel.
func (g *graph) matMulNBits(x, packed, scales, bias string, k, n int, q Quantization) string {
	inputs := in(x, packed, scales)
	if bias != "" {
		inputs = append(inputs, "", "", bias) // no zero_points, no g_idx
	}
	return g.contribOp("", "MatMulNBits", inputs,
		attrInt("K", int64(k)), attrInt("N", int64(n)), attrInt("bits", int64(q.Bits)),
		attrInt("block_size", int64(q.Block)), attrInt("accuracy_level", accuracyLevel))
}

// gatherBlockQuantized gathers the rows ids of a table [vocab, hidden]
// quantized as q (uint8 data [vocab, hidden·bits/8], scales
// [vocab, hidden/block]) with com.microsoft GatherBlockQuantized into out
// (named after the op if ""), dequantized: float32 [ids..., hidden].
func (g *graph) gatherBlockQuantized(out, data, scales, ids string, q Quantization) string {
	return g.contribOp(out, "GatherBlockQuantized", in(data, ids, scales),
		attrInt("gather_axis", 0), attrInt("quantize_axis", 1),
		attrInt("block_size", int64(q.Block)), attrInt("bits", int64(q.Bits)))
}

// model is the graph's ModelProto without the graph: onnxgraph's, plus the
// com.microsoft opset when the graph uses it (only then, so that float
// blocks stay plain ONNX).
func (g *graph) model() *onnxpb.ModelProto {
	m := onnxgraph.Model(producer, nil)
	if g.contrib {
		m.OpsetImport = append(m.OpsetImport, &onnxpb.OperatorSetIdProto{Domain: proto.String(contribDomain), Version: proto.Int64(1)})
	}
	return m
}

// float32s rounds float64 values to float32.
func float32s(v []float64) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out
}
