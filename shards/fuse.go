package shards

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/shards/onnxpb"
)

// fuse merges the ONNX graphs of consecutive blocks into one model, so that a
// span runs as one onnxruntime session: one Run per step instead of one per
// block, and one thread pool instead of one per block. Blocks stay the unit
// that is addressed, verified and transferred; fusing is only how a node
// executes the span it serves.
//
// inputs and outputs are the fused graph's interface (the span's inputs and
// outputs plus its state). fuse returns ok=false, and the caller keeps one
// session per block, when two blocks define the same name: blocks cut from
// one graph never do, but blocks of unrelated origin might.
// The parsed blocks are modified (node names made unique) and must not be
// used afterwards.
func fuse(blocks []*onnxpb.ModelProto, inputs, outputs []TensorSpec) (_ []byte, ok bool, err error) {
	merged := &onnxpb.GraphProto{Name: proto.String("span")}
	model := &onnxpb.ModelProto{Graph: merged}
	opsets := map[string]int64{}
	defined := map[string]bool{} // tensors produced inside: initializers, node outputs
	declared := map[string]*onnxpb.ValueInfoProto{}
	nodeNames := map[string]bool{}
	for i, m := range blocks {
		g := m.GetGraph()
		model.IrVersion = proto.Int64(max(model.GetIrVersion(), m.GetIrVersion()))
		for _, o := range m.GetOpsetImport() {
			opsets[o.GetDomain()] = max(opsets[o.GetDomain()], o.GetVersion())
		}
		if len(m.GetFunctions()) > 0 || len(g.GetSparseInitializer()) > 0 {
			return nil, false, nil // rare; not worth merging their name spaces
		}
		for _, t := range g.GetInitializer() {
			if defined[t.GetName()] {
				return nil, false, nil
			}
			defined[t.GetName()] = true
		}
		for _, n := range g.GetNode() {
			for _, out := range n.GetOutput() {
				if out != "" && defined[out] {
					return nil, false, nil
				}
				defined[out] = true
			}
			if name := n.GetName(); name != "" {
				if nodeNames[name] {
					n.Name = proto.String(fmt.Sprintf("b%d/%s", i, name))
				}
				nodeNames[n.GetName()] = true
			}
		}
		for _, vi := range append(append(g.GetInput(), g.GetOutput()...), g.GetValueInfo()...) {
			if _, ok := declared[vi.GetName()]; !ok {
				declared[vi.GetName()] = vi
			}
		}
		merged.Node = append(merged.Node, g.GetNode()...)
		merged.Initializer = append(merged.Initializer, g.GetInitializer()...)
		merged.ValueInfo = append(merged.ValueInfo, g.GetValueInfo()...)
	}
	for _, t := range inputs {
		vi, ok := declared[t.Name]
		if !ok || defined[t.Name] {
			return nil, false, fmt.Errorf("fused span input %q is not an input of its blocks", t.Name)
		}
		merged.Input = append(merged.Input, vi)
	}
	for _, t := range outputs {
		vi, ok := declared[t.Name]
		if !ok || !defined[t.Name] {
			return nil, false, fmt.Errorf("fused span output %q is produced by none of its blocks", t.Name)
		}
		merged.Output = append(merged.Output, vi)
	}
	for domain, v := range opsets {
		model.OpsetImport = append(model.OpsetImport, &onnxpb.OperatorSetIdProto{Domain: proto.String(domain), Version: proto.Int64(v)})
	}
	// Deterministic order: the default domain first, then by name.
	sortOpsets(model.OpsetImport)
	out, err := proto.Marshal(model)
	if err != nil {
		return nil, false, err
	}
	return out, true, nil
}

func sortOpsets(o []*onnxpb.OperatorSetIdProto) {
	for i := 1; i < len(o); i++ {
		for j := i; j > 0 && o[j].GetDomain() < o[j-1].GetDomain(); j-- {
			o[j], o[j-1] = o[j-1], o[j]
		}
	}
}
