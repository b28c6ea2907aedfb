package build

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// The ONNX versions every generated file declares: IR 8 and the default
// domain's opset 17, which onnxruntime 1.24 loads and which has
// LayerNormalization.
const (
	irVersion = 8
	opset     = 17
	producer  = "infermesh shard build"
)

// graph accumulates one ONNX graph. Model code adds nodes and weights to it
// inside a scope (one per layer), so that a layer emitted into its own block
// graph and into the whole-model graph gets the same node, tensor and
// weight names — and, weights being drawn from a generator seeded by seed
// and the weight's name, the same weights.
type graph struct {
	g     *onnxpb.GraphProto
	seed  int64
	scope string
	count map[string]int  // per scope+op, for naming node outputs
	inits map[string]bool // initializer names, to catch a name used twice
}

func newGraph(name string, seed int64) *graph {
	return &graph{g: &onnxpb.GraphProto{Name: proto.String(name)}, seed: seed, count: map[string]int{}, inits: map[string]bool{}}
}

// input declares a graph input.
func (g *graph) input(t shards.TensorSpec) { g.g.Input = append(g.g.Input, valueInfo(t)) }

// output declares a graph output.
func (g *graph) output(t shards.TensorSpec) { g.g.Output = append(g.g.Output, valueInfo(t)) }

// name returns a fresh tensor name in the current scope, such as
// "layer3/MatMul_2".
func (g *graph) name(op string) string {
	key := g.scope + "/" + op
	g.count[key]++
	return fmt.Sprintf("%s_%d", key, g.count[key])
}

// op adds a node with one output, named after the op, and returns that name.
func (g *graph) op(opType string, inputs []string, attrs ...*onnxpb.AttributeProto) string {
	out := g.name(opType)
	g.opTo(out, opType, inputs, attrs...)
	return out
}

// opTo adds a node whose one output is the given name: a tensor other
// blocks or the caller see, such as "h3" or "present_key_2".
func (g *graph) opTo(out, opType string, inputs []string, attrs ...*onnxpb.AttributeProto) {
	g.g.Node = append(g.g.Node, &onnxpb.NodeProto{
		Name:      proto.String(out),
		OpType:    proto.String(opType),
		Input:     inputs,
		Output:    []string{out},
		Attribute: attrs,
	})
}

// in lists a node's inputs; it only makes call sites read like the graph.
func in(names ...string) []string { return names }

// ints, scalarInt and scalarFloat add constants (shapes, axes, indices,
// coefficients) as initializers of the current scope, named scope/name:type
// ("layer0/axes[1]:int64"). A constant's name must say its value: asking
// twice for one name and type returns the first.
func (g *graph) ints(name string, v ...int64) string {
	return g.constant(name, protocol.NewTensor([]int64{int64(len(v))}, v))
}

func (g *graph) scalarInt(name string, v int64) string {
	return g.constant(name, protocol.NewTensor([]int64{}, []int64{v}))
}

func (g *graph) scalarFloat(name string, v float32) string {
	return g.constant(name, protocol.NewTensor([]int64{}, []float32{v}))
}

func (g *graph) constant(name string, t *protocol.Tensor) string {
	full := g.scope + "/" + name + ":" + t.DType.String()
	if g.inits[full] {
		return full
	}
	return g.initializer(full, t)
}

// dist says how a weight's values are drawn: uniformly with the given mean
// and standard deviation. Uniform rather than normal because it needs no
// transcendental functions, whose last bits may differ between platforms:
// the same seed gives the same bytes, hence the same CIDs, everywhere.
type dist struct {
	mean, std float64
}

// centered draws around zero; around draws around mean.
func centered(std float64) dist     { return dist{std: std} }
func around(mean, std float64) dist { return dist{mean: mean, std: std} }

func (d dist) draw(r *rand.Rand) float32 {
	u := 2*r.Float64() - 1 // exact: uniform on [-1, 1)
	// The explicit conversion rounds the product, so that no platform
	// fuses it with the addition.
	return float32(float64(d.std*math.Sqrt(3)*u) + d.mean)
}

// weight adds a float32 initializer named scope/name with values drawn from
// a PCG generator (math/rand/v2) seeded by the graph's seed and that full
// name, so a weight depends only on the seed and its name, never on the
// order of construction.
func (g *graph) weight(name string, shape []int64, how dist) string {
	full := g.scope + "/" + name
	h := fnv.New64a()
	h.Write([]byte(full))
	r := rand.New(rand.NewPCG(uint64(g.seed), h.Sum64()))
	v := make([]float32, protocol.NumElements(shape))
	for i := range v {
		v[i] = how.draw(r)
	}
	return g.initializer(full, protocol.NewTensor(shape, v))
}

func (g *graph) initializer(name string, t *protocol.Tensor) string {
	if g.inits[name] {
		panic("build: initializer " + name + " defined twice")
	}
	g.inits[name] = true
	g.g.Initializer = append(g.g.Initializer, &onnxpb.TensorProto{
		Name:     proto.String(name),
		DataType: proto.Int32(int32(t.DType)),
		Dims:     t.Shape,
		RawData:  t.Data, // little-endian, as protocol.Tensor holds it
	})
	return name
}

// model wraps the graph in a ModelProto and encodes it. The encoding is
// deterministic: the same graph gives the same bytes, hence the same CID.
func (g *graph) model() ([]byte, error) {
	m := &onnxpb.ModelProto{
		IrVersion:    proto.Int64(irVersion),
		ProducerName: proto.String(producer),
		OpsetImport:  []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(opset)}},
		Graph:        g.g,
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(m)
}

// Attributes.

func attrInt(name string, v int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(v)}
}

func attrInts(name string, v ...int64) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_INTS.Enum(), Ints: v}
}

func attrFloat(name string, v float32) *onnxpb.AttributeProto {
	return &onnxpb.AttributeProto{Name: proto.String(name), Type: onnxpb.AttributeProto_FLOAT.Enum(), F: proto.Float32(v)}
}

// valueInfo converts a TensorSpec to an ONNX graph input or output, symbolic
// dimensions as dim_param.
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
			panic(fmt.Sprintf("build: dimension %v of type %T", d, d))
		}
	}
	return t
}
