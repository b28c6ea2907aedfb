package split_test

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/internal/onnxtest"
	"github.com/infermesh/infermesh/shards/onnxpb"
	"github.com/infermesh/infermesh/shards/split"
)

// runtime opens onnxruntime or fails the test: `make test` fetches it, and
// ORT_LIB points at another build.
func runtime(t testing.TB) *shards.Runtime {
	t.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 2})
	if err != nil {
		t.Fatalf("%v (run `make ort`, or set ORT_LIB)", err)
	}
	return rt
}

// graphBuilder builds small ONNX graphs by hand for the unit cases.
type graphBuilder struct {
	g     onnxpb.GraphProto
	opset int64
}

func newGraph() *graphBuilder { return &graphBuilder{opset: 17} }

// untyped declares a graph output by name only.
func untyped(name string) *onnxpb.ValueInfoProto {
	return &onnxpb.ValueInfoProto{Name: proto.String(name)}
}

func (b *graphBuilder) in(name string, dims ...any) *graphBuilder {
	b.g.Input = append(b.g.Input, onnxtest.ValueInfo(name, protocol.Float32, dims...))
	return b
}

func (b *graphBuilder) out(names ...string) *graphBuilder {
	for _, n := range names {
		b.g.Output = append(b.g.Output, untyped(n))
	}
	return b
}

func (b *graphBuilder) node(op string, ins []string, outs []string, attrs ...*onnxpb.AttributeProto) *graphBuilder {
	b.g.Node = append(b.g.Node, &onnxpb.NodeProto{OpType: proto.String(op), Name: proto.String(outs[0]), Input: ins, Output: outs, Attribute: attrs})
	return b
}

func floatTensor(name string, dims []int64, seed uint64) *onnxpb.TensorProto {
	rng := rand.New(rand.NewPCG(seed, 7))
	raw := make([]byte, 4*protocol.NumElements(dims))
	for i := 0; i < len(raw); i += 4 {
		binary.LittleEndian.PutUint32(raw[i:], math.Float32bits(rng.Float32()-0.5))
	}
	return &onnxpb.TensorProto{Name: proto.String(name), Dims: dims, DataType: proto.Int32(int32(protocol.Float32)), RawData: raw}
}

// weight adds an initializer of random values.
func (b *graphBuilder) weight(name string, dims ...int64) *graphBuilder {
	b.g.Initializer = append(b.g.Initializer, floatTensor(name, dims, uint64(len(b.g.Initializer))))
	return b
}

// constant adds a Constant node holding random values.
func (b *graphBuilder) constant(name string, dims ...int64) *graphBuilder {
	t := floatTensor("", dims, uint64(len(b.g.Node)+100))
	t.Name = nil
	return b.node("Constant", nil, []string{name}, &onnxpb.AttributeProto{Name: proto.String("value"), Type: onnxpb.AttributeProto_TENSOR.Enum(), T: t})
}

func (b *graphBuilder) model() *onnxpb.ModelProto {
	b.g.Name = proto.String("unit")
	return onnxtest.Model(&b.g, b.opset)
}

func (b *graphBuilder) bytes(t testing.TB) []byte {
	t.Helper()
	data, err := proto.Marshal(b.model())
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// shuffle returns the model with its nodes listed in a random order.
func shuffle(t testing.TB, data []byte, seed uint64) []byte {
	t.Helper()
	m, err := shards.ParseONNX(data)
	if err != nil {
		t.Fatal(err)
	}
	nodes := m.GetGraph().GetNode()
	rand.New(rand.NewPCG(seed, 1)).Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
	out, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// splitOK splits and fails the test on an error; it logs the report.
func splitOK(t testing.TB, data []byte, opts split.Options) (*shards.Model, *split.Report) {
	t.Helper()
	if opts.Runtime == nil {
		opts.Runtime = runtime(t)
	}
	model, rep, err := split.Split(data, t.TempDir(), opts)
	if rep != nil && testing.Verbose() {
		rep.WriteText(os.Stdout)
	}
	if err != nil {
		t.Fatal(err)
	}
	return model, rep
}

// cutNames lists the names of the tensors crossing each cut.
func cutNames(rep *split.Report) [][]string {
	var out [][]string
	for _, c := range rep.Cuts {
		var names []string
		for _, t := range c.Tensors {
			names = append(names, t.Name)
		}
		slices.Sort(names)
		out = append(out, names)
	}
	return out
}

// blockGraph parses block i of a model.
func blockGraph(t testing.TB, m *shards.Model, i int) *onnxpb.GraphProto {
	t.Helper()
	data, err := m.Block(i)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := shards.ParseONNX(data)
	if err != nil {
		t.Fatal(err)
	}
	return pm.GetGraph()
}

// hopByHop runs the model's blocks one span each, passing tensors on, and
// full.onnx, on the given inputs, and returns the largest difference.
func hopByHop(t testing.TB, rt *shards.Runtime, m *shards.Model, in shards.Tensors) float64 {
	t.Helper()
	whole, err := rt.LoadWhole(m)
	if err != nil {
		t.Fatal(err)
	}
	defer whole.Close()
	want, err := whole.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	got := in
	for i := range m.Manifest.Blocks {
		sp, err := rt.LoadSpan(m, i, i+1)
		if err != nil {
			t.Fatal(err)
		}
		got, err = sp.Run(got)
		sp.Close()
		if err != nil {
			t.Fatalf("block %d: %v", i, err)
		}
	}
	worst := 0.0
	for _, o := range m.Manifest.Outputs {
		d, err := protocol.MaxAbsDiff(want[o.Name], got[o.Name])
		if err != nil {
			t.Fatalf("output %s: %v", o.Name, err)
		}
		worst = max(worst, d)
	}
	return worst
}

func randomFloats(shape []int64, seed uint64) *protocol.Tensor {
	rng := rand.New(rand.NewPCG(seed, 3))
	v := make([]float32, protocol.NumElements(shape))
	for i := range v {
		v[i] = rng.Float32()*2 - 1
	}
	return protocol.NewTensor(shape, v)
}
