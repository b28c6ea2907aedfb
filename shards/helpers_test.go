package shards_test

import (
	"encoding/binary"
	"math"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/internal/onnxtest"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// tinyGraph builds a one-graph ONNX model by hand: the unit tests of this
// package need a few ops, not the model builder.
type tinyGraph struct{ g onnxpb.GraphProto }

func (t *tinyGraph) in(name string, dims ...any) *tinyGraph {
	t.g.Input = append(t.g.Input, onnxtest.ValueInfo(name, protocol.Float32, dims...))
	return t
}

func (t *tinyGraph) out(name string, dims ...any) *tinyGraph {
	t.g.Output = append(t.g.Output, onnxtest.ValueInfo(name, protocol.Float32, dims...))
	return t
}

func (t *tinyGraph) node(op string, ins, outs []string, attrs ...*onnxpb.AttributeProto) *tinyGraph {
	t.g.Node = append(t.g.Node, &onnxpb.NodeProto{OpType: proto.String(op), Input: ins, Output: outs, Attribute: attrs})
	return t
}

func (t *tinyGraph) constant(name string, dims []int64, vals ...float32) *tinyGraph {
	raw := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	t.g.Initializer = append(t.g.Initializer, &onnxpb.TensorProto{Name: proto.String(name), Dims: dims,
		DataType: proto.Int32(int32(onnxpb.TensorProto_FLOAT)), RawData: raw})
	return t
}

func (t *tinyGraph) bytes(tb testing.TB) []byte {
	tb.Helper()
	t.g.Name = proto.String("tiny")
	return onnxtest.Marshal(tb, onnxtest.Model(&t.g, 17))
}

// tinyModel writes a two-block model: block 0 adds a bias to x, block 1
// keeps a running state (s_out = Concat(s_in, y) along the first axis),
// doubles y into z and reports the state's shape as rows. It is small enough to check by hand.
func tinyModel(tb testing.TB, dir string) *shards.Model {
	tb.Helper()
	b0 := (&tinyGraph{}).in("x", "batch", 2).out("y", "batch", 2).
		constant("bias", []int64{2}, 1, -1).node("Add", []string{"x", "bias"}, []string{"y"}).bytes(tb)
	b1 := (&tinyGraph{}).in("y", "batch", 2).in("s_in", "past", 2).out("z", "batch", 2).out("s_out", "total", 2).
		constant("two", []int64{1}, 2).node("Mul", []string{"y", "two"}, []string{"z"}).
		node("Concat", []string{"s_in", "y"}, []string{"s_out"}, onnxtest.IntAttr("axis", 0)).
		node("Shape", []string{"s_out"}, []string{"rows"}).bytes(tb)
	b1 = withIntOutput(tb, b1, "rows", 2)
	specs := func(data []byte) ([]shards.TensorSpec, []shards.TensorSpec) {
		in, out, err := shards.DescribeONNX(data)
		if err != nil {
			tb.Fatal(err)
		}
		return in, out
	}
	in0, out0 := specs(b0)
	in1, out1 := specs(b1)
	m := &shards.Manifest{Name: "tiny", Kind: "test", Inputs: in0, Outputs: []shards.TensorSpec{out1[0], out1[2]}, Blocks: []shards.BlockSpec{
		{Inputs: in0, Outputs: out0},
		{Inputs: in1, Outputs: out1, State: []shards.StatePair{{Input: "s_in", Output: "s_out"}}},
	}}
	model, err := shards.WriteModel(dir, m, [][]byte{b0, b1})
	if err != nil {
		tb.Fatal(err)
	}
	return model
}

func openRuntime(tb testing.TB) *shards.Runtime {
	tb.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		tb.Fatal(err)
	}
	return rt
}

// withIntOutput declares an extra int64 graph output of the given rank.
func withIntOutput(tb testing.TB, model []byte, name string, rank int) []byte {
	tb.Helper()
	var m onnxpb.ModelProto
	if err := proto.Unmarshal(model, &m); err != nil {
		tb.Fatal(err)
	}
	dims := make([]any, rank)
	for i := range dims {
		dims[i] = "?"
	}
	m.Graph.Output = append(m.Graph.Output, onnxtest.ValueInfo(name, protocol.Int64, dims...))
	b, err := proto.Marshal(&m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// clashModel is two blocks that both name their weight "k" (y = x + k,
// z = y * k): legal apart, clashing if merged into one graph.
func clashModel(tb testing.TB, dir string) *shards.Model {
	tb.Helper()
	b0 := (&tinyGraph{}).in("x", "batch", 2).out("y", "batch", 2).
		constant("k", []int64{2}, 1, -1).node("Add", []string{"x", "k"}, []string{"y"}).bytes(tb)
	b1 := (&tinyGraph{}).in("y", "batch", 2).out("z", "batch", 2).
		constant("k", []int64{2}, 3, 5).node("Mul", []string{"y", "k"}, []string{"z"}).bytes(tb)
	in0, out0, _ := shards.DescribeONNX(b0)
	in1, out1, _ := shards.DescribeONNX(b1)
	m := &shards.Manifest{Name: "clash", Inputs: in0, Outputs: out1,
		Blocks: []shards.BlockSpec{{Inputs: in0, Outputs: out0}, {Inputs: in1, Outputs: out1}}}
	model, err := shards.WriteModel(dir, m, [][]byte{b0, b1})
	if err != nil {
		tb.Fatal(err)
	}
	return model
}
