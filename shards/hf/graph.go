package hf

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/internal/onnxgraph"
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
	dtype   protocol.DType // what weights are stored as: Float32 or Float16
	casts   map[string]string
}

// weightRef is an initializer whose data is a checkpoint tensor, converted
// to dtype as it is written.
type weightRef struct {
	name   string // initializer name
	tensor string // checkpoint tensor name
	shape  []int64
	dtype  protocol.DType
}

func (w weightRef) bytes() int64 { return protocol.NumElements(w.shape) * int64(w.dtype.Size()) }

func newGraph(name string, dtype protocol.DType) *graph {
	return &graph{Graph: onnxgraph.New(name), casts: map[string]string{}, dtype: dtype}
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
	g.weights = append(g.weights, weightRef{name: n, tensor: tensor, shape: shape, dtype: g.dtype})
	return n
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
func (g *graph) linear(prefix, x string, inDim, outDim int, bias bool) string {
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
	if header, err = opts.Marshal(onnxgraph.Model(producer, nil)); err != nil {
		return nil, nil, err
	}
	if body, err = opts.Marshal(g.Proto); err != nil {
		return nil, nil, err
	}
	return header, body, nil
}

// float32s rounds float64 values to float32.
func float32s(v []float64) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out
}
