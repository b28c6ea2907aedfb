package split

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// seedModel is x -> Relu -> Neg -> y with an If whose branch reads x.
func seedModel(tb testing.TB) []byte {
	vi := func(name string) *onnxpb.ValueInfoProto {
		elem := int32(protocol.Float32)
		return &onnxpb.ValueInfoProto{Name: proto.String(name), Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
			TensorType: &onnxpb.TypeProto_Tensor{ElemType: &elem, Shape: &onnxpb.TensorShapeProto{Dim: []*onnxpb.TensorShapeProto_Dimension{{}}}}}}}
	}
	branch := &onnxpb.GraphProto{Node: []*onnxpb.NodeProto{{OpType: proto.String("Neg"), Input: []string{"x"}, Output: []string{"t"}}}, Output: []*onnxpb.ValueInfoProto{vi("t")}}
	g := &onnxpb.GraphProto{
		Input:  []*onnxpb.ValueInfoProto{vi("x")},
		Output: []*onnxpb.ValueInfoProto{vi("y")},
		Node: []*onnxpb.NodeProto{
			{OpType: proto.String("Relu"), Input: []string{"x"}, Output: []string{"a"}},
			{OpType: proto.String("Constant"), Output: []string{"k"}, Attribute: []*onnxpb.AttributeProto{{Name: proto.String("value_float"), F: proto.Float32(1)}}},
			{OpType: proto.String("Greater"), Input: []string{"a", "k"}, Output: []string{"c"}},
			{OpType: proto.String("If"), Input: []string{"c"}, Output: []string{"b"}, Attribute: []*onnxpb.AttributeProto{{Name: proto.String("then_branch"), G: branch}, {Name: proto.String("else_branch"), G: branch}}},
			{OpType: proto.String("Add"), Input: []string{"a", "b"}, Output: []string{"y"}},
		},
	}
	data, err := proto.Marshal(&onnxpb.ModelProto{IrVersion: proto.Int64(8), Graph: g})
	if err != nil {
		tb.Fatal(err)
	}
	return data
}

// planBytes runs everything Split does before onnxruntime, with every tensor
// taken as a 4-byte float, and checks the cuts it chooses.
func planBytes(t *testing.T, data []byte) {
	m, err := shards.ParseONNX(data)
	if err != nil {
		return
	}
	gr, err := analyse(m)
	if err != nil {
		return
	}
	if err := gr.sort(nil); err != nil {
		return
	}
	s := &splitter{gr: gr, state: map[string]string{}, stOut: map[string]string{}, infos: map[string]*tensorInfo{}}
	for _, i := range gr.order {
		for _, o := range gr.nodes[i].GetOutput() {
			s.infos[o] = &tensorInfo{dtype: protocol.Float32, bytes: 4}
		}
	}
	for _, vi := range gr.inputs {
		s.infos[vi.GetName()] = &tensorInfo{dtype: protocol.Float32, bytes: 4}
	}
	_ = gr.staticTypes()
	pl := s.plan()
	for blocks := 1; blocks <= 4; blocks++ {
		cuts, err := pl.choose(blocks, 0.5)
		if err != nil {
			continue
		}
		if len(cuts) != blocks-1 {
			t.Fatalf("%d blocks: %d cuts", blocks, len(cuts))
		}
		for i, p := range cuts {
			if p <= 0 || p >= pl.n || pl.forbid[p] != "" || (i > 0 && p <= cuts[i-1]) {
				t.Fatalf("%d blocks: bad cuts %v of %d nodes", blocks, cuts, pl.n)
			}
		}
	}
}

func TestPlanSeed(t *testing.T) { planBytes(t, seedModel(t)) }

// FuzzPlan feeds arbitrary bytes to the parsing, ordering and planning that
// precede onnxruntime: none may panic or hang, and chosen cuts must be
// valid.
func FuzzPlan(f *testing.F) {
	f.Add(seedModel(f))
	f.Add([]byte("not a model"))
	f.Add([]byte{0x08, 0x08, 0x3a, 0x02, 0x0a, 0x00})
	f.Fuzz(planBytes)
}
