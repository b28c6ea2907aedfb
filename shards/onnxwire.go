package shards

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/shards/onnxpb"
)

// Field numbers of onnx-ml.proto that the wire-level scanner reads.
const (
	modelIRVersion   = 1
	modelOpsetImport = 8
	modelGraph       = 7
	modelFunctions   = 25

	graphNode              = 1
	graphInitializer       = 5
	graphInput             = 11
	graphOutput            = 12
	graphValueInfo         = 13
	graphSparseInitializer = 15

	nodeOutput = 2
	nodeName   = 3

	tensorName    = 8
	valueInfoName = 1
)

// scannedModel is an ONNX model read at the protobuf wire level: the graph's
// interface parsed, its nodes and weights kept as raw field bytes. Loading a
// block needs no more than that, and it spares decoding (then re-encoding,
// when fusing) megabytes of weights.
type scannedModel struct {
	irVersion   int64
	opsets      [][]byte // raw OperatorSetIdProto messages
	hasExtras   bool     // local functions or sparse initializers
	body        [][]byte // graph fields node, initializer, value_info, as on the wire (slices of the model's bytes, not copies)
	inputs      []*onnxpb.ValueInfoProto
	outputs     []*onnxpb.ValueInfoProto
	initializer map[string]bool
	nodeOutputs []string
	nodeNames   []string
}

var errTruncated = errors.New("truncated protobuf")

// scanONNX reads an ONNX model's structure without decoding its weights.
func scanONNX(data []byte) (*scannedModel, error) {
	s := &scannedModel{initializer: map[string]bool{}}
	var graph []byte
	err := walk(data, func(num protowire.Number, typ protowire.Type, v []byte, raw []byte) error {
		switch {
		case num == modelIRVersion && typ == protowire.VarintType:
			x, _ := protowire.ConsumeVarint(v)
			s.irVersion = int64(x)
		case num == modelOpsetImport && typ == protowire.BytesType:
			s.opsets = append(s.opsets, v)
		case num == modelGraph && typ == protowire.BytesType:
			graph = v
		case num == modelFunctions:
			s.hasExtras = true
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotONNX, err)
	}
	if graph == nil || s.irVersion == 0 {
		return nil, fmt.Errorf("%w: no graph or IR version", ErrNotONNX)
	}
	err = walk(graph, func(num protowire.Number, typ protowire.Type, v []byte, raw []byte) error {
		if typ != protowire.BytesType {
			return nil
		}
		switch num {
		case graphNode:
			s.body = append(s.body, raw)
			return walk(v, func(n protowire.Number, t protowire.Type, v []byte, _ []byte) error {
				if t == protowire.BytesType && n == nodeOutput {
					s.nodeOutputs = append(s.nodeOutputs, string(v))
				} else if t == protowire.BytesType && n == nodeName {
					s.nodeNames = append(s.nodeNames, string(v))
				}
				return nil
			})
		case graphInitializer:
			s.body = append(s.body, raw)
			return walk(v, func(n protowire.Number, t protowire.Type, v []byte, _ []byte) error {
				if t == protowire.BytesType && n == tensorName {
					s.initializer[string(v)] = true
				}
				return nil
			})
		case graphValueInfo:
			s.body = append(s.body, raw)
		case graphSparseInitializer:
			s.hasExtras = true
		case graphInput, graphOutput:
			var vi onnxpb.ValueInfoProto
			if err := proto.Unmarshal(v, &vi); err != nil {
				return err
			}
			if num == graphInput {
				s.inputs = append(s.inputs, &vi)
			} else {
				s.outputs = append(s.outputs, &vi)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: graph: %v", ErrNotONNX, err)
	}
	return s, nil
}

// describe returns the graph's inputs (initializers excluded) and outputs.
func (s *scannedModel) describe() (inputs, outputs []TensorSpec, err error) {
	g := &onnxpb.GraphProto{Output: s.outputs}
	for _, vi := range s.inputs {
		if !s.initializer[vi.GetName()] {
			g.Input = append(g.Input, vi)
		}
	}
	return DescribeGraph(g)
}

// walk calls fn for each field of a protobuf message: its number, wire type,
// value (the payload of a length-delimited field, else the raw value) and
// its raw bytes including the tag.
func walk(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte, raw []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errTruncated
		}
		m := protowire.ConsumeFieldValue(num, typ, b[n:])
		if m < 0 {
			return errTruncated
		}
		raw, v := b[:n+m], b[n:n+m]
		if typ == protowire.BytesType {
			v, _ = protowire.ConsumeBytes(v)
		}
		if err := fn(num, typ, v, raw); err != nil {
			return err
		}
		b = b[n+m:]
	}
	return nil
}
