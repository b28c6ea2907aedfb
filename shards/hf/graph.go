package hf

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// The ONNX versions every block declares: IR 8 and the default domain's
// opset 17, as the blocks of shards/build.
const (
	irVersion = 8
	opset     = 17
	producer  = "infermesh shard import"
)

// graph accumulates one block's ONNX graph. Nodes and small constants live
// in the graph message; the checkpoint's weights are only referenced
// (weights), and streamed into the file when the block is written.
type graph struct {
	g       *onnxpb.GraphProto
	scope   string
	count   map[string]int
	consts  map[string]bool
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
	return &graph{
		g:      &onnxpb.GraphProto{Name: proto.String(name)},
		count:  map[string]int{},
		consts: map[string]bool{},
		casts:  map[string]string{},
		dtype:  dtype,
	}
}

func (g *graph) input(t shards.TensorSpec)  { g.g.Input = append(g.g.Input, valueInfo(t)) }
func (g *graph) output(t shards.TensorSpec) { g.g.Output = append(g.g.Output, valueInfo(t)) }

// op adds a node with one output, named after the scope and op, and returns
// that name.
func (g *graph) op(opType string, inputs []string, attrs ...*onnxpb.AttributeProto) string {
	key := g.scope + "/" + opType
	g.count[key]++
	out := fmt.Sprintf("%s_%d", key, g.count[key])
	g.opTo(out, opType, inputs, attrs...)
	return out
}

// opTo adds a node whose one output is the given name.
func (g *graph) opTo(out, opType string, inputs []string, attrs ...*onnxpb.AttributeProto) {
	g.g.Node = append(g.g.Node, &onnxpb.NodeProto{
		Name:      proto.String(out),
		OpType:    proto.String(opType),
		Input:     inputs,
		Output:    []string{out},
		Attribute: attrs,
	})
}

func in(names ...string) []string { return names }

// ints, scalarInt, scalarFloat and floats add small constants of the
// current scope, named scope/name:type; a name must say its value.
func (g *graph) ints(name string, v ...int64) string {
	return g.constant(name, protocol.NewTensor([]int64{int64(len(v))}, v))
}

func (g *graph) scalarInt(name string, v int64) string {
	return g.constant(name, protocol.NewTensor([]int64{}, []int64{v}))
}

func (g *graph) scalarFloat(name string, v float32) string {
	return g.constant(name, protocol.NewTensor([]int64{}, []float32{v}))
}

func (g *graph) floats(name string, v []float32) string {
	return g.constant(name, protocol.NewTensor([]int64{int64(len(v))}, v))
}

func (g *graph) constant(name string, t *protocol.Tensor) string {
	full := g.scope + "/" + name + ":" + t.DType.String()
	if g.consts[full] {
		return full
	}
	g.consts[full] = true
	g.g.Initializer = append(g.g.Initializer, &onnxpb.TensorProto{
		Name:     proto.String(full),
		DataType: proto.Int32(int32(t.DType)),
		Dims:     t.Shape,
		RawData:  t.Data,
	})
	return full
}

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
	g.opTo(c, "Cast", in(init), attrInt("to", int64(protocol.Float32)))
	g.casts[init] = c
	return c
}

// rawWeight declares the initializer in the stored element type.
func (g *graph) rawWeight(tensor string, shape []int64, name ...string) string {
	n := tensor
	if len(name) > 0 {
		n = name[0]
	}
	for _, w := range g.weights {
		if w.name == n {
			return n
		}
	}
	g.weights = append(g.weights, weightRef{name: n, tensor: tensor, shape: shape, dtype: g.dtype})
	return n
}

// Layers shared by the decoders.

// rmsNorm is x / sqrt(mean(x², last axis) + eps) · weight, in float32.
func (g *graph) rmsNorm(x, weight string, dim int, eps float64) string {
	w := g.weight(weight, []int64{int64(dim)})
	ms := g.op("ReduceMean", in(g.op("Mul", in(x, x))), attrInts("axes", -1), attrInt("keepdims", 1))
	rms := g.op("Sqrt", in(g.op("Add", in(ms, g.scalarFloat(fmt.Sprintf("eps=%g", eps), float32(eps))))))
	return g.op("Mul", in(g.op("Div", in(x, rms)), w))
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
	return g.op("Gemm", inputs, attrInt("transB", 1))
}

// silu is x·sigmoid(x).
func (g *graph) silu(x string) string { return g.op("Mul", in(x, g.op("Sigmoid", in(x)))) }

// model encodes the graph's model without the streamed weights: header is
// the ModelProto's fields other than the graph, body the graph's fields.
func (g *graph) encode() (header, body []byte, err error) {
	m := &onnxpb.ModelProto{
		IrVersion:    proto.Int64(irVersion),
		ProducerName: proto.String(producer),
		OpsetImport:  []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(opset)}},
	}
	opts := proto.MarshalOptions{Deterministic: true}
	if header, err = opts.Marshal(m); err != nil {
		return nil, nil, err
	}
	if body, err = opts.Marshal(g.g); err != nil {
		return nil, nil, err
	}
	return header, body, nil
}

func attrInt(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

func attrInts(name string, v ...int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: v}
}

// valueInfo converts a TensorSpec to an ONNX graph input or output.
func valueInfo(t shards.TensorSpec) *onnxpb.ValueInfoProto {
	shape := &onnxpb.TensorShapeProto{}
	for _, d := range t.Shape {
		dim := &onnxpb.TensorShapeProto_Dimension{}
		if d.Param != "" {
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: d.Param}
		} else {
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d.Size}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnxpb.ValueInfoProto{
		Name: proto.String(t.Name),
		Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{
			ElemType: proto.Int32(int32(t.DType)),
			Shape:    shape,
		}}},
	}
}

// tensor is a shorthand for a TensorSpec; dims are ints (fixed) or strings
// (symbolic).
func tensor(name string, dtype protocol.DType, dims ...any) shards.TensorSpec {
	t := shards.TensorSpec{Name: name, DType: dtype}
	for _, d := range dims {
		switch d := d.(type) {
		case string:
			t.Shape = append(t.Shape, shards.Dim{Param: d})
		case int:
			t.Shape = append(t.Shape, shards.Dim{Size: int64(d)})
		default:
			panic(fmt.Sprintf("hf: dimension %v of type %T", d, d))
		}
	}
	return t
}

// float32s rounds float64 values to float32.
func float32s(v []float64) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float32(x)
	}
	return out
}
