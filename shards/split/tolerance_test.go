package split_test

import (
	"encoding/binary"
	"errors"
	"math"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/internal/onnxtest"
	"github.com/infermesh/infermesh/shards/onnxpb"
	"github.com/infermesh/infermesh/shards/split"
)

func TestOutputTolerance(t *testing.T) {
	for _, tc := range []struct {
		dt     protocol.DType
		maxAbs float64
		want   float64
	}{
		{protocol.Float32, 0, split.DefaultTolerance},
		{protocol.Float32, 1000, split.DefaultTolerance},
		{protocol.Float64, 1000, split.Float64Tolerance},
		{protocol.Float16, 0, split.DefaultTolerance},
		{protocol.Float16, 0.001, split.DefaultTolerance}, // 4 ulps there are 3.8e-6
		{protocol.Float16, 1, 4 * 0x1p-10},
		{protocol.Float16, 1.99, 4 * 0x1p-10},
		{protocol.Float16, 40, 4 * 0x1p-5},
		{protocol.Float16, 65504, 4 * 32},
		{protocol.BFloat16, 1, 4 * 0x1p-7},
		{protocol.BFloat16, 3e38, 4 * 0x1p120},
		{protocol.Int64, 1e9, 0},
		{protocol.Int32, 5, 0},
		{protocol.Bool, 1, 0},
	} {
		if got := split.OutputTolerance(tc.dt, tc.maxAbs); got != tc.want {
			t.Errorf("OutputTolerance(%v, %g) = %g, want %g", tc.dt, tc.maxAbs, got, tc.want)
		}
	}
}

// halfChain computes in float16 from a float16 input to a float16 output:
// y = tanh(x·W1)·W2·W3·16, the weights float32 initializers cast to
// float16, the outputs' magnitudes in the tens. onnxruntime's CPU provider
// runs float16 nodes it has no float16 kernel for in float32 and keeps
// float32 between consecutive ones in the whole model, while a cut rounds
// the tensor crossing it to float16: the blocks' output differs from the
// whole's in its last bits, far over the float32 tolerance of 1e-4.
func halfChain() *graphBuilder {
	b := newGraph()
	b.g.Input = append(b.g.Input, onnxtest.ValueInfo("x", protocol.Float16, "batch", 16))
	b.out("y")
	to16 := onnxtest.IntAttr("to", int64(protocol.Float16))
	for _, w := range []string{"w1", "w2", "w3"} {
		b.weight(w, 16, 16)
		b.node("Cast", []string{w}, []string{w + "h"}, to16)
	}
	b.g.Initializer = append(b.g.Initializer, &onnxpb.TensorProto{Name: proto.String("scale"),
		DataType: proto.Int32(int32(protocol.Float16)), RawData: []byte{0x00, 0x4c}}) // 16.0 in float16
	b.node("MatMul", []string{"x", "w1h"}, []string{"h1"})
	b.node("Tanh", []string{"h1"}, []string{"h2"})
	b.node("MatMul", []string{"h2", "w2h"}, []string{"h3"})
	b.node("MatMul", []string{"h3", "w3h"}, []string{"h4"})
	b.node("Mul", []string{"h4", "scale"}, []string{"y"})
	return b
}

func TestHalfOutputsVerify(t *testing.T) {
	rt := runtime(t)
	sizes := map[string]int64{"batch": 64}
	for _, at := range [][]string{{"h1"}, {"h2"}, {"h3"}, {"h1", "h2", "h3"}} {
		_, rep, err := split.Split(halfChain().bytes(t), t.TempDir(), split.Options{At: at, Verify: true, Runtime: rt, DimSizes: sizes})
		if err != nil {
			t.Fatalf("cut at %v: %v", at, err)
		}
		if !rep.Verified {
			t.Errorf("cut at %v: not verified", at)
		}
		// The split must change the rounding, or this test checks nothing.
		if rep.MaxAbsDiff <= split.DefaultTolerance || rep.MaxAbsDiff > split.OutputTolerance(protocol.Float16, 64) {
			t.Errorf("cut at %v: blocks differ by %g; want over %g (the float32 tolerance) and within a few float16 ulps",
				at, rep.MaxAbsDiff, split.DefaultTolerance)
		}
	}
	// An explicit tolerance still applies to every output.
	_, _, err := split.Split(halfChain().bytes(t), t.TempDir(), split.Options{At: []string{"h2"}, Verify: true, Runtime: rt, DimSizes: sizes, Tolerance: 1e-4})
	if !errors.Is(err, split.ErrMismatch) {
		t.Errorf("tolerance 1e-4 on a float16 output: got %v, want ErrMismatch", err)
	}
}

// TestHalfOutputsCorruptBlockFails scales a weight of the last block by 2%,
// which moves the output by some tens of float16 ulps: verification must
// still fail.
func TestHalfOutputsCorruptBlockFails(t *testing.T) {
	defer split.SetBlocksHook(func(blocks [][]byte) {
		last := len(blocks) - 1
		m, err := shards.ParseONNX(blocks[last])
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, init := range m.GetGraph().GetInitializer() {
			if init.GetName() != "w3" {
				continue
			}
			raw := init.GetRawData()
			for i := 0; i < len(raw); i += 4 {
				f := math.Float32frombits(binary.LittleEndian.Uint32(raw[i:]))
				binary.LittleEndian.PutUint32(raw[i:], math.Float32bits(f*1.02))
			}
			found = true
		}
		if !found {
			t.Fatal("the last block has no initializer w3")
		}
		if blocks[last], err = proto.Marshal(m); err != nil {
			t.Fatal(err)
		}
	})()
	_, rep, err := split.Split(halfChain().bytes(t), t.TempDir(), split.Options{At: []string{"h2"}, Verify: true, Runtime: runtime(t), DimSizes: map[string]int64{"batch": 64}})
	if !errors.Is(err, split.ErrMismatch) {
		t.Fatalf("a corrupt block passed verification: %v", err)
	}
	if !strings.Contains(err.Error(), "float16") {
		t.Errorf("error %q does not name the output's type", err)
	}
	t.Logf("%v (max difference %g)", err, rep.MaxAbsDiff)
}
