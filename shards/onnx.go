package shards

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// ErrNotONNX is returned, wrapped, for bytes that do not parse as an ONNX
// model with a graph.
var ErrNotONNX = errors.New("not an ONNX model")

// ParseONNX parses an ONNX model and checks that it has a graph.
func ParseONNX(data []byte) (*onnxpb.ModelProto, error) {
	var m onnxpb.ModelProto
	if err := proto.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotONNX, err)
	}
	if m.GetGraph() == nil || m.GetIrVersion() == 0 {
		return nil, fmt.Errorf("%w: no graph or IR version", ErrNotONNX)
	}
	return &m, nil
}

// DescribeONNX returns the graph inputs (initializers excluded) and outputs
// of an ONNX model as TensorSpecs.
func DescribeONNX(data []byte) (inputs, outputs []TensorSpec, err error) {
	m, err := scanONNX(data)
	if err != nil {
		return nil, nil, err
	}
	return m.describe()
}

// DescribeGraph is DescribeONNX on a parsed graph.
func DescribeGraph(g *onnxpb.GraphProto) (inputs, outputs []TensorSpec, err error) {
	inits := map[string]bool{}
	for _, t := range g.GetInitializer() {
		inits[t.GetName()] = true
	}
	for _, vi := range g.GetInput() {
		if inits[vi.GetName()] {
			continue
		}
		t, err := SpecFromValueInfo(vi)
		if err != nil {
			return nil, nil, err
		}
		inputs = append(inputs, t)
	}
	for _, vi := range g.GetOutput() {
		t, err := SpecFromValueInfo(vi)
		if err != nil {
			return nil, nil, err
		}
		outputs = append(outputs, t)
	}
	return inputs, outputs, nil
}

// SpecFromValueInfo converts an ONNX ValueInfo of tensor type. Dimensions
// without a value or name become symbolic "?".
func SpecFromValueInfo(vi *onnxpb.ValueInfoProto) (TensorSpec, error) {
	tt := vi.GetType().GetTensorType()
	if tt == nil {
		return TensorSpec{}, fmt.Errorf("%q is not a tensor (sequences and maps are not supported)", vi.GetName())
	}
	spec := TensorSpec{Name: vi.GetName(), DType: protocol.DType(tt.GetElemType())}
	if !spec.DType.Valid() {
		return TensorSpec{}, fmt.Errorf("%q has unsupported element type %v", vi.GetName(), spec.DType)
	}
	for _, d := range tt.GetShape().GetDim() {
		switch {
		case d.GetDimParam() != "":
			spec.Shape = append(spec.Shape, Dim{Param: d.GetDimParam()})
		case d.GetDimValue() > 0:
			spec.Shape = append(spec.Shape, Dim{Size: d.GetDimValue()})
		default:
			spec.Shape = append(spec.Shape, Dim{Param: "?"})
		}
	}
	return spec, nil
}
