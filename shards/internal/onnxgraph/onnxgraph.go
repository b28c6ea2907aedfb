// Package onnxgraph builds ONNX graphs node by node, for the model
// generators of shards/build and the checkpoint importer of shards/hf.
//
// A Graph adds nodes, constants and initializers under a scope (one per
// layer), naming each intermediate tensor scope/Op_n, so that a layer
// emitted twice (into its block and into a whole model) gets the same
// names. Encoding is deterministic: the same graph gives the same bytes,
// hence the same CID.
package onnxgraph

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// The ONNX versions every generated file declares: IR 8 and the default
// domain's opset 17, which onnxruntime 1.24 loads and which has
// LayerNormalization.
const (
	IRVersion = 8
	Opset     = 17
)

// Graph accumulates one ONNX graph. It is not safe for concurrent use.
type Graph struct {
	// Proto is the graph being built.
	Proto *onnxpb.GraphProto
	// Scope prefixes the names of nodes, intermediate tensors and
	// constants added from now on ("embed", "layer3", "head").
	Scope string
	count map[string]int  // per scope+op, for naming node outputs
	inits map[string]bool // initializer names, to catch a name used twice
}

// New returns an empty graph called name.
func New(name string) *Graph {
	return &Graph{Proto: &onnxpb.GraphProto{Name: proto.String(name)}, count: map[string]int{}, inits: map[string]bool{}}
}

// Input declares a graph input.
func (g *Graph) Input(t shards.TensorSpec) { g.Proto.Input = append(g.Proto.Input, ValueInfo(t)) }

// Output declares a graph output.
func (g *Graph) Output(t shards.TensorSpec) { g.Proto.Output = append(g.Proto.Output, ValueInfo(t)) }

// name returns a fresh tensor name in the current scope, such as
// "layer3/MatMul_2".
func (g *Graph) name(op string) string {
	key := g.Scope + "/" + op
	g.count[key]++
	return fmt.Sprintf("%s_%d", key, g.count[key])
}

// Op adds a node with one output, named after the op, and returns that name.
func (g *Graph) Op(opType string, inputs []string, attrs ...*onnxpb.AttributeProto) string {
	out := g.name(opType)
	g.OpTo(out, opType, inputs, attrs...)
	return out
}

// OpTo adds a node whose one output is the given name: a tensor other
// blocks or the caller see, such as "h3" or "present_key_2".
func (g *Graph) OpTo(out, opType string, inputs []string, attrs ...*onnxpb.AttributeProto) {
	g.Proto.Node = append(g.Proto.Node, &onnxpb.NodeProto{
		Name:      proto.String(out),
		OpType:    proto.String(opType),
		Input:     inputs,
		Output:    []string{out},
		Attribute: attrs,
	})
}

// In lists a node's inputs; it only makes call sites read like the graph.
func In(names ...string) []string { return names }

// Ints, ScalarInt, ScalarFloat and Floats add constants (shapes, axes,
// indices, coefficients) as initializers of the current scope, named
// scope/name:type ("layer0/axes[1]:int64"). A constant's name must say its
// value: asking twice for one name and type returns the first.
func (g *Graph) Ints(name string, v ...int64) string {
	return g.Constant(name, protocol.NewTensor([]int64{int64(len(v))}, v))
}

// ScalarInt adds an int64 scalar constant; see Ints.
func (g *Graph) ScalarInt(name string, v int64) string {
	return g.Constant(name, protocol.NewTensor([]int64{}, []int64{v}))
}

// ScalarFloat adds a float32 scalar constant; see Ints.
func (g *Graph) ScalarFloat(name string, v float32) string {
	return g.Constant(name, protocol.NewTensor([]int64{}, []float32{v}))
}

// Floats adds a float32 vector constant; see Ints.
func (g *Graph) Floats(name string, v []float32) string {
	return g.Constant(name, protocol.NewTensor([]int64{int64(len(v))}, v))
}

// Constant adds t as the initializer scope/name:type unless it exists, and
// returns its name.
func (g *Graph) Constant(name string, t *protocol.Tensor) string {
	full := g.Scope + "/" + name + ":" + t.DType.String()
	if g.inits[full] {
		return full
	}
	return g.Initializer(full, t)
}

// Has reports whether an initializer called name exists.
func (g *Graph) Has(name string) bool { return g.inits[name] }

// Initializer adds t as an initializer called name (no scope added) and
// returns the name. It panics if the name is taken: a model definition bug.
func (g *Graph) Initializer(name string, t *protocol.Tensor) string {
	g.Reserve(name)
	g.Proto.Initializer = append(g.Proto.Initializer, &onnxpb.TensorProto{
		Name:     proto.String(name),
		DataType: proto.Int32(int32(t.DType)),
		Dims:     t.Shape,
		RawData:  t.Data, // little-endian, as protocol.Tensor holds it
	})
	return name
}

// Reserve claims an initializer name whose tensor the caller adds to the
// encoded model itself (streamed weights). It panics if the name is taken.
func (g *Graph) Reserve(name string) {
	if g.inits[name] {
		panic("onnxgraph: initializer " + name + " defined twice")
	}
	g.inits[name] = true
}

// Model wraps the graph in a ModelProto (IRVersion, Opset) naming producer.
// Graph may be nil, for a caller that encodes the graph itself.
func Model(producer string, graph *onnxpb.GraphProto) *onnxpb.ModelProto {
	return &onnxpb.ModelProto{
		IrVersion:    proto.Int64(IRVersion),
		ProducerName: proto.String(producer),
		OpsetImport:  []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(Opset)}},
		Graph:        graph,
	}
}

// Encode returns the graph's model, deterministically encoded.
func (g *Graph) Encode(producer string) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(Model(producer, g.Proto))
}

// Attributes.

// AttrInt is an INT attribute.
func AttrInt(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

// AttrInts is an INTS attribute.
func AttrInts(name string, v ...int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: v}
}

// AttrFloat is a FLOAT attribute.
func AttrFloat(name string, v float32) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(v)}
}

// ValueInfo converts a TensorSpec to an ONNX graph input or output,
// symbolic dimensions as dim_param.
func ValueInfo(t shards.TensorSpec) *onnxpb.ValueInfoProto {
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

// Tensor is a shorthand for a TensorSpec; dims are ints (fixed) or strings
// (symbolic).
func Tensor(name string, dtype protocol.DType, dims ...any) shards.TensorSpec {
	t := shards.TensorSpec{Name: name, DType: dtype}
	for _, d := range dims {
		switch d := d.(type) {
		case string:
			t.Shape = append(t.Shape, shards.Dim{Param: d})
		case int:
			t.Shape = append(t.Shape, shards.Dim{Size: int64(d)})
		default:
			panic(fmt.Sprintf("onnxgraph: dimension %v of type %T", d, d))
		}
	}
	return t
}
