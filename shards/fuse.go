package shards

import (
	"fmt"
	"sort"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/shards/onnxpb"
)

// fuse merges the ONNX graphs of consecutive blocks into one model, so that a
// span runs as one onnxruntime session: one Run per step instead of one per
// block, and one thread pool instead of one per block. Blocks stay the unit
// that is addressed, verified and transferred; fusing is only how a node
// executes the span it serves.
//
// The merge works on the protobuf wire: a graph's repeated fields
// concatenate, so the blocks' nodes, weights and value infos are copied as
// bytes, never decoded. inputs and outputs are the fused graph's interface
// (the span's inputs and outputs plus its state). fuse returns ok=false, and
// the caller keeps one session per block, when two blocks define the same
// tensor or node name (blocks cut from one graph never do, blocks of
// unrelated origin might) or use local functions or sparse weights.
func fuse(blocks []*scannedModel, inputs, outputs []TensorSpec) (_ []byte, ok bool, err error) {
	var ir int64
	opsets := map[string]int64{}
	defined := map[string]bool{} // tensors produced inside: weights, node outputs
	nodeNames := map[string]bool{}
	declared := map[string]*onnxpb.ValueInfoProto{}
	var body [][]byte
	size := 0
	for _, b := range blocks {
		if b.hasExtras {
			return nil, false, nil
		}
		ir = max(ir, b.irVersion)
		for _, raw := range b.opsets {
			var o onnxpb.OperatorSetIdProto
			if err := proto.Unmarshal(raw, &o); err != nil {
				return nil, false, fmt.Errorf("%w: opset import: %v", ErrNotONNX, err)
			}
			opsets[o.GetDomain()] = max(opsets[o.GetDomain()], o.GetVersion())
		}
		for name := range b.initializer {
			if defined[name] {
				return nil, false, nil
			}
			defined[name] = true
		}
		for _, name := range b.nodeOutputs {
			if name != "" && defined[name] {
				return nil, false, nil
			}
			defined[name] = true
		}
		for _, name := range b.nodeNames {
			if name != "" && nodeNames[name] {
				return nil, false, nil
			}
			nodeNames[name] = true
		}
		for _, vi := range append(append([]*onnxpb.ValueInfoProto(nil), b.inputs...), b.outputs...) {
			if _, ok := declared[vi.GetName()]; !ok {
				declared[vi.GetName()] = vi
			}
		}
		body = append(body, b.body...)
		for _, f := range b.body {
			size += len(f)
		}
	}

	graph := make([]byte, 0, size+4096)
	graph = protowire.AppendTag(graph, 2, protowire.BytesType) // GraphProto.name
	graph = protowire.AppendString(graph, "span")
	for _, f := range body {
		graph = append(graph, f...)
	}
	appendInfo := func(field protowire.Number, t TensorSpec, wantDefined bool) error {
		vi, ok := declared[t.Name]
		if !ok || defined[t.Name] != wantDefined {
			return fmt.Errorf("fused span: %q is not an %s of its blocks", t.Name, map[bool]string{false: "input", true: "output"}[wantDefined])
		}
		b, err := proto.Marshal(vi)
		if err != nil {
			return err
		}
		graph = protowire.AppendTag(graph, field, protowire.BytesType)
		graph = protowire.AppendBytes(graph, b)
		return nil
	}
	for _, t := range inputs {
		if err := appendInfo(graphInput, t, false); err != nil {
			return nil, false, err
		}
	}
	for _, t := range outputs {
		if err := appendInfo(graphOutput, t, true); err != nil {
			return nil, false, err
		}
	}

	model := make([]byte, 0, len(graph)+256)
	model = protowire.AppendTag(model, modelIRVersion, protowire.VarintType)
	model = protowire.AppendVarint(model, uint64(ir))
	domains := make([]string, 0, len(opsets))
	for d := range opsets {
		domains = append(domains, d)
	}
	sort.Strings(domains) // deterministic bytes; "" (the default domain) first
	for _, d := range domains {
		b, err := proto.Marshal(&onnxpb.OperatorSetIdProto{Domain: proto.String(d), Version: proto.Int64(opsets[d])})
		if err != nil {
			return nil, false, err
		}
		model = protowire.AppendTag(model, modelOpsetImport, protowire.BytesType)
		model = protowire.AppendBytes(model, b)
	}
	model = protowire.AppendTag(model, modelGraph, protowire.BytesType)
	model = protowire.AppendBytes(model, graph)
	return model, true, nil
}
