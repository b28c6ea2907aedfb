package shards

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/internal/onnxtest"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// The wire scanner must agree with a full decode on what a graph declares.
func TestScanAgreesWithDecode(t *testing.T) {
	g := &onnxpb.GraphProto{
		Name: proto.String("g"),
		Initializer: []*onnxpb.TensorProto{{Name: proto.String("w"), Dims: []int64{1},
			DataType: proto.Int32(1), RawData: []byte{0, 0, 128, 63}}},
		Input: []*onnxpb.ValueInfoProto{onnxtest.ValueInfo("x", protocol.Float32, "batch", 4), onnxtest.ValueInfo("w", protocol.Float32, 1)},
		Node: []*onnxpb.NodeProto{{OpType: proto.String("Mul"), Name: proto.String("mul"),
			Input: []string{"x", "w"}, Output: []string{"y"}}},
		Output: []*onnxpb.ValueInfoProto{onnxtest.ValueInfo("y", protocol.Float32, "batch", 4)},
	}
	data, err := proto.Marshal(&onnxpb.ModelProto{IrVersion: proto.Int64(3), Graph: g,
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Version: proto.Int64(13)}}})
	if err != nil {
		t.Fatal(err)
	}
	s, err := scanONNX(data)
	if err != nil {
		t.Fatal(err)
	}
	in, out, err := s.describe()
	if err != nil {
		t.Fatal(err)
	}
	// IR 3 lists weights among the inputs; they are not inputs to feed.
	if len(in) != 1 || in[0].Name != "x" || len(out) != 1 || out[0].Name != "y" {
		t.Fatalf("inputs %v outputs %v", in, out)
	}
	if !s.initializer["w"] || len(s.nodeOutputs) != 1 || s.nodeOutputs[0] != "y" || s.nodeNames[0] != "mul" {
		t.Fatalf("scan: %+v", s)
	}
	var back onnxpb.GraphProto
	if err := proto.Unmarshal(bytes.Join(s.body, nil), &back); err != nil || len(back.Node) != 1 || len(back.Initializer) != 1 {
		t.Fatalf("body does not decode to the nodes and weights: %v", err)
	}
}

func FuzzScanONNX(f *testing.F) {
	data, _ := proto.Marshal(&onnxpb.ModelProto{IrVersion: proto.Int64(8), Graph: &onnxpb.GraphProto{
		Input: []*onnxpb.ValueInfoProto{onnxtest.ValueInfo("x", protocol.Float32, "b", 2)}, Output: []*onnxpb.ValueInfoProto{onnxtest.ValueInfo("x", protocol.Float32, "b", 2)}}})
	f.Add(data)
	f.Add([]byte("not onnx"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := scanONNX(b)
		if err != nil {
			return
		}
		s.describe()
		fuse([]*scannedModel{s, s}, nil, nil)
	})
}
