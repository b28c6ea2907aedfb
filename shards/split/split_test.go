package split_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/internal/onnxtest"
	"github.com/infermesh/infermesh/shards/onnxpb"
	"github.com/infermesh/infermesh/shards/split"
)

// chain is x -> MatMul(c) -> Tanh -> MatMul(c) -> Add(bias) -> y, where c is
// one Constant node read on both sides of any cut after the first MatMul,
// and bias an initializer.
func chain() *graphBuilder {
	b := newGraph().in("x", "batch", 4).out("y")
	b.weight("bias", 4)
	b.constant("c", 4, 4)
	b.node("MatMul", []string{"x", "c"}, []string{"h1"})
	b.node("Tanh", []string{"h1"}, []string{"h2"})
	b.node("MatMul", []string{"h2", "c"}, []string{"h3"})
	b.node("Add", []string{"h3", "bias"}, []string{"y"})
	return b
}

func TestConstantOnBothSidesOfACut(t *testing.T) {
	m, rep := splitOK(t, chain().bytes(t), split.Options{At: []string{"h2"}, Verify: true})
	if got := cutNames(rep); !slices.Equal(got[0], []string{"h2"}) {
		t.Fatalf("cut carries %v, want only h2 (constants are copied, not passed)", got)
	}
	for i := range 2 {
		g := blockGraph(t, m, i)
		var consts []string
		for _, n := range g.GetNode() {
			if n.GetOpType() == "Constant" {
				consts = append(consts, n.GetOutput()...)
			}
		}
		if !slices.Equal(consts, []string{"c"}) {
			t.Errorf("block %d has Constants %v, want its own copy of c", i, consts)
		}
	}
	if g := blockGraph(t, m, 1); len(g.GetInitializer()) != 1 || g.GetInitializer()[0].GetName() != "bias" {
		t.Errorf("block 1 should hold the initializer bias")
	}
	if g := blockGraph(t, m, 0); len(g.GetInitializer()) != 0 {
		t.Errorf("block 0 holds initializers it does not read")
	}
	// The cut tensor keeps the symbolic batch dimension.
	h2 := rep.Cuts[0].Tensors[0]
	if h2.DType != protocol.Float32 || len(h2.Shape) != 2 || h2.Shape[0].Param != "batch" || h2.Shape[1].Size != 4 {
		t.Errorf("h2 is %v%v, want float32[batch 4]", h2.DType, h2.Shape)
	}
	if d := hopByHop(t, runtime(t), m, shards.Tensors{"x": randomFloats([]int64{3, 4}, 9)}); d > 1e-5 {
		t.Errorf("blocks differ from the whole by %g at batch 3", d)
	}
}

func TestBlocksAutomatic(t *testing.T) {
	for _, n := range []int{1, 2, 3, 4} {
		m, rep := splitOK(t, chain().bytes(t), split.Options{Blocks: n, Verify: true})
		if len(m.Manifest.Blocks) != n || len(rep.Cuts) != n-1 || !rep.Verified {
			t.Errorf("%d blocks: got %d blocks, %d cuts", n, len(m.Manifest.Blocks), len(rep.Cuts))
		}
	}
	_, _, err := split.Split(chain().bytes(t), t.TempDir(), split.Options{Blocks: 5, Runtime: runtime(t)})
	if !errors.Is(err, split.ErrNoCut) {
		t.Errorf("5 blocks of 4 nodes: %v, want ErrNoCut", err)
	}
}

// ifGraph computes h = x*x and c = mean(x) > 0, then an If whose branches
// read h and x from the outer scope: y = relu(c ? h+x : h-x).
func ifGraph() *graphBuilder {
	b := newGraph().in("x", 2, 3).out("y")
	b.g.Initializer = append(b.g.Initializer, &onnxpb.TensorProto{Name: proto.String("zero"), DataType: proto.Int32(int32(protocol.Float32)), FloatData: []float32{0}})
	b.node("ReduceMean", []string{"x"}, []string{"m"}, onnxtest.IntAttr("keepdims", 1))
	b.node("Greater", []string{"m", "zero"}, []string{"c"})
	b.node("Mul", []string{"x", "x"}, []string{"h"})
	branch := func(op, out string) *onnxpb.GraphProto {
		return &onnxpb.GraphProto{Name: proto.String(out),
			Node:   []*onnxpb.NodeProto{{OpType: proto.String(op), Input: []string{"h", "x"}, Output: []string{out}}},
			Output: []*onnxpb.ValueInfoProto{onnxtest.ValueInfo(out, protocol.Float32, 2, 3)}}
	}
	b.node("If", []string{"c"}, []string{"z"}, onnxtest.GraphAttr("then_branch", branch("Add", "t")), onnxtest.GraphAttr("else_branch", branch("Sub", "e")))
	b.node("Relu", []string{"z"}, []string{"y"})
	return b
}

func TestSubgraphReadsOuterNames(t *testing.T) {
	m, rep := splitOK(t, ifGraph().bytes(t), split.Options{At: []string{"h"}, Verify: true})
	// If's only explicit input is c; h and x cross because its branches read them.
	if got := cutNames(rep); !slices.Equal(got[0], []string{"c", "h", "x"}) {
		t.Fatalf("cut carries %v, want [c h x]", got)
	}
	var ins []string
	for _, in := range m.Manifest.Blocks[1].Inputs {
		ins = append(ins, in.Name)
	}
	slices.Sort(ins)
	if !slices.Equal(ins, []string{"c", "h", "x"}) {
		t.Errorf("block 1 inputs %v, want [c h x]", ins)
	}
	for _, c := range rep.Cuts[0].Tensors {
		if c.Name == "c" && (c.DType != protocol.Bool || len(c.Shape) != 2) {
			t.Errorf("c is %v%v, want bool[1 1]", c.DType, c.Shape)
		}
	}
}

func TestShuffledGraph(t *testing.T) {
	data := chain().bytes(t)
	_, want := splitOK(t, data, split.Options{Blocks: 3, Verify: true})
	for seed := range uint64(5) {
		_, got := splitOK(t, shuffle(t, data, seed), split.Options{Blocks: 3, Verify: true})
		if !slices.EqualFunc(cutNames(got), cutNames(want), slices.Equal) {
			t.Errorf("seed %d: cuts %v, unshuffled %v", seed, cutNames(got), cutNames(want))
		}
	}
}

// recurrent reads state s and writes sN, then computes y from it.
func recurrent() *graphBuilder {
	b := newGraph().in("x", 1, 4).in("s", 1, 4).out("y", "sN")
	b.weight("w", 4, 4)
	b.node("Mul", []string{"x", "x"}, []string{"a"})
	b.node("Add", []string{"a", "s"}, []string{"b"})
	b.node("Tanh", []string{"b"}, []string{"c"})
	b.node("MatMul", []string{"c", "w"}, []string{"d"})
	b.node("Relu", []string{"d"}, []string{"y"})
	b.node("Identity", []string{"c"}, []string{"sN"})
	return b
}

func TestStatePairStaysInOneBlock(t *testing.T) {
	m, rep := splitOK(t, recurrent().bytes(t), split.Options{Blocks: 3, State: []string{"s=sN"}, Verify: true})
	man := m.Manifest
	if len(man.Inputs) != 1 || man.Inputs[0].Name != "x" || len(man.Outputs) != 1 || man.Outputs[0].Name != "y" {
		t.Errorf("model inputs %v outputs %v: state must be neither", man.Inputs, man.Outputs)
	}
	holders := 0
	for i, b := range man.Blocks {
		if len(b.State) > 0 {
			holders++
			if b.State[0] != (shards.StatePair{Input: "s", Output: "sN"}) {
				t.Errorf("block %d state %v", i, b.State)
			}
		}
	}
	if holders != 1 {
		t.Errorf("%d blocks hold the state pair, want 1", holders)
	}
	for _, c := range cutNames(rep) {
		if slices.Contains(c, "s") || slices.Contains(c, "sN") {
			t.Errorf("state crosses a cut: %v", c)
		}
	}
	// Cutting inside the pair is refused.
	_, _, err := split.Split(recurrent().bytes(t), t.TempDir(), split.Options{At: []string{"b"}, State: []string{"s=sN"}, Runtime: runtime(t)})
	if !errors.Is(err, split.ErrNoCut) || !strings.Contains(err.Error(), "s=sN") {
		t.Errorf("cut inside a state pair: %v", err)
	}
}

func TestCycle(t *testing.T) {
	b := newGraph().in("x", 2).out("y")
	b.node("Relu", []string{"b"}, []string{"a"})
	b.node("Add", []string{"a", "x"}, []string{"b"})
	b.node("Neg", []string{"b"}, []string{"y"})
	_, _, err := split.Split(b.bytes(t), t.TempDir(), split.Options{Blocks: 2})
	if !errors.Is(err, split.ErrCycle) || !strings.Contains(err.Error(), "Relu") {
		t.Fatalf("got %v, want ErrCycle naming the nodes", err)
	}
}

func TestBadInput(t *testing.T) {
	good := chain().bytes(t)
	ext := chain()
	ext.g.Initializer[0].DataLocation = onnxpb.TensorProto_EXTERNAL.Enum()
	dup := chain()
	dup.node("Neg", []string{"x"}, []string{"h1"})
	dangling := chain()
	dangling.node("Neg", []string{"nowhere"}, []string{"q"})
	rt := runtime(t)
	for _, tc := range []struct {
		name string
		data []byte
		opts split.Options
		want error
		msg  string
	}{
		{"empty", nil, split.Options{Blocks: 2}, shards.ErrNotONNX, ""},
		{"not onnx", []byte("this is not an ONNX model"), split.Options{Blocks: 2}, shards.ErrNotONNX, ""},
		{"truncated", good[:len(good)-7], split.Options{Blocks: 2}, shards.ErrNotONNX, ""},
		{"external data", ext.bytes(t), split.Options{Blocks: 2}, split.ErrExternalData, "bias"},
		{"produced twice", dup.bytes(t), split.Options{Blocks: 2}, split.ErrBadGraph, "h1"},
		{"reads nothing", dangling.bytes(t), split.Options{Blocks: 2}, split.ErrBadGraph, "nowhere"},
		{"no blocks nor at", good, split.Options{}, split.ErrOptions, ""},
		{"blocks and at", good, split.Options{Blocks: 2, At: []string{"h2"}}, split.ErrOptions, ""},
		{"unknown at", good, split.Options{At: []string{"h9"}}, split.ErrNoCut, `"h9"`},
		{"at an input", good, split.Options{At: []string{"x"}}, split.ErrNoCut, "model input"},
		{"at an initializer", good, split.Options{At: []string{"bias"}}, split.ErrNoCut, "initializer"},
		{"at a constant", good, split.Options{At: []string{"c"}}, split.ErrNoCut, "constant"},
		{"at the last node", good, split.Options{At: []string{"y"}}, split.ErrNoCut, "last node"},
		{"at a subgraph name", ifGraph().bytes(t), split.Options{At: []string{"t"}}, split.ErrNoCut, "subgraph"},
		{"bad state", good, split.Options{Blocks: 2, State: []string{"x"}}, split.ErrOptions, ""},
		{"state not an input", good, split.Options{Blocks: 2, State: []string{"h1=y"}}, split.ErrOptions, "h1"},
		{"dims of a non-input", good, split.Options{Blocks: 2, Dims: map[string][]shards.Dim{"y": {{Param: "b"}}}}, split.ErrOptions, "y"},
		{"dims against a fixed size", good, split.Options{Blocks: 2, Dims: map[string][]shards.Dim{"x": {{Param: "b"}, {Size: 5}}}}, split.ErrOptions, "fixes"},
		{"sample input of the wrong type", good, split.Options{Blocks: 2, Inputs: shards.Tensors{"x": protocol.NewTensor([]int64{1, 4}, []int64{1, 2, 3, 4})}}, split.ErrOptions, "x"},
		{"too many blocks", good, split.Options{Blocks: 9}, split.ErrNoCut, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.Runtime = rt
			m, rep, err := split.Split(tc.data, t.TempDir(), tc.opts)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
			if m != nil || rep != nil {
				t.Errorf("a failed split returned a model or report")
			}
		})
	}
}

func TestTypeGuessCorrected(t *testing.T) {
	// HannWindow reads an int64 size and returns floats: the per-operator
	// guess (the first input's type) is wrong and onnxruntime corrects it.
	b := newGraph().in("x", 4).out("y")
	b.node("Relu", []string{"x"}, []string{"r"})
	b.node("Size", []string{"r"}, []string{"n"})
	b.node("HannWindow", []string{"n"}, []string{"w"})
	b.node("Mul", []string{"r", "w"}, []string{"y"})
	_, rep := splitOK(t, b.bytes(t), split.Options{At: []string{"w"}, Verify: true})
	var names []string
	for _, c := range rep.Cuts[0].Tensors {
		names = append(names, c.Name)
		if c.Name == "w" && (c.DType != protocol.Float32 || fmt.Sprint(c.Shape) != "[4]") {
			t.Errorf("w is %v%v, want float32[4]", c.DType, c.Shape)
		}
	}
	if !slices.Contains(names, "w") {
		t.Errorf("cut carries %v, not w", names)
	}
}

func TestComputedConstantsAreCopied(t *testing.T) {
	// w2 = Transpose(Cast(c)) reads only a constant: it is copied into the
	// blocks that read it, never cut, and never makes a block of its own.
	b := newGraph().in("x", "batch", 4).out("y")
	b.constant("c", 4, 4)
	b.node("Cast", []string{"c"}, []string{"c64"}, onnxtest.IntAttr("to", int64(protocol.Float64)))
	b.node("Cast", []string{"c64"}, []string{"c32"}, onnxtest.IntAttr("to", int64(protocol.Float32)))
	b.node("Transpose", []string{"c32"}, []string{"w2"})
	b.node("MatMul", []string{"x", "w2"}, []string{"h"})
	b.node("Tanh", []string{"h"}, []string{"g"})
	b.node("MatMul", []string{"g", "w2"}, []string{"y"})
	for _, n := range []int{2, 3} {
		m, rep := splitOK(t, b.bytes(t), split.Options{Blocks: n, Verify: true})
		if rep.Nodes != 3 || rep.Constants != 4 {
			t.Errorf("%d nodes, %d constants; want 3 and 4", rep.Nodes, rep.Constants)
		}
		for _, c := range cutNames(rep) {
			if slices.Contains(c, "w2") || slices.Contains(c, "c32") {
				t.Errorf("a constant crosses a cut: %v", c)
			}
		}
		// The last block reads w2: it holds the whole chain that makes it.
		g := blockGraph(t, m, n-1)
		var ops []string
		for _, node := range g.GetNode() {
			ops = append(ops, node.GetOpType())
		}
		if !slices.Equal(ops[:4], []string{"Constant", "Cast", "Cast", "Transpose"}) {
			t.Errorf("last block runs %v, want the constant chain first", ops)
		}
	}
	// Shuffled, the chain still comes out in dependency order.
	splitOK(t, shuffle(t, b.bytes(t), 3), split.Options{Blocks: 2, Verify: true})
}
