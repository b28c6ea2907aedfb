package split

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// ProducerName is written into every block's ModelProto.
const ProducerName = "infermesh split"

// build makes the blocks between the cuts, the manifest and the report.
func (s *splitter) build(pl *plan, cuts []int) (*shards.Manifest, [][]byte, *Report, error) {
	gr := s.gr
	n := len(gr.order)
	bounds := append(append([]int{0}, cuts...), n)
	// last[name]: the last position reading name.
	last := map[string]int{}
	for k, i := range gr.order {
		for _, name := range gr.uses[i] {
			last[name] = k
		}
	}
	man := &shards.Manifest{Format: shards.ManifestFormat, Name: s.name, Kind: "split"}
	for _, vi := range gr.inputs {
		if s.state[vi.GetName()] == "" {
			man.Inputs = append(man.Inputs, s.specs[vi.GetName()])
		}
	}
	for _, name := range gr.outputs {
		if s.stOut[name] != "" {
			continue
		}
		spec, ok := s.specs[name]
		if !ok {
			return nil, nil, nil, fmt.Errorf("graph output %q: onnxruntime returned no tensor for it", name)
		}
		man.Outputs = append(man.Outputs, spec)
	}
	rep := &Report{Name: s.name, Nodes: n, Dropped: gr.dropped, SampleDims: s.sizesA}
	for i := range gr.nodes {
		if gr.isConst[i] {
			rep.Constants++
		}
	}
	var blocks [][]byte
	for b := 0; b+1 < len(bounds); b++ {
		lo, hi := bounds[b], bounds[b+1]
		data, spec, info, err := s.block(b, lo, hi, b == len(bounds)-2, last)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("block %d: %w", b, err)
		}
		blocks = append(blocks, data)
		man.Blocks = append(man.Blocks, spec)
		rep.Blocks = append(rep.Blocks, info)
	}
	for _, p := range cuts {
		c := Cut{After: p}
		for _, i := range pl.crossing(p) {
			l := pl.lives[i]
			c.Tensors = append(c.Tensors, CutTensor{TensorSpec: s.specs[l.name], Bytes: l.bytes})
			c.Bytes += l.bytes
		}
		rep.Cuts = append(rep.Cuts, c)
	}
	return man, blocks, rep, nil
}

// block builds the ONNX file of the nodes at positions [lo, hi).
func (s *splitter) block(index, lo, hi int, lastBlock bool, last map[string]int) ([]byte, shards.BlockSpec, BlockInfo, error) {
	gr := s.gr
	var spec shards.BlockSpec
	var info BlockInfo
	src := gr.g
	g := &onnxpb.GraphProto{Name: proto.String(fmt.Sprintf("%s/block%d", s.name, index))}

	produced := map[string]bool{}
	for _, i := range gr.order[lo:hi] {
		for _, o := range gr.nodes[i].GetOutput() {
			produced[o] = true
		}
	}
	// What the block's nodes read, in order of first use.
	var need []string
	seen := map[string]bool{}
	for _, i := range gr.order[lo:hi] {
		for _, name := range gr.uses[i] {
			if !seen[name] {
				seen[name] = true
				need = append(need, name)
			}
		}
	}
	// The last block also returns graph outputs that are constants.
	var constOuts []string
	if lastBlock {
		for _, name := range gr.outputs {
			if gr.isConstName(name) {
				constOuts = append(constOuts, name)
				if !seen[name] {
					seen[name] = true
					need = append(need, name)
				}
			}
		}
	}
	listedInputs := map[string]*onnxpb.ValueInfoProto{}
	for _, vi := range src.GetInput() {
		listedInputs[vi.GetName()] = vi
	}
	// Constants the block reads, with the constants computed ones read,
	// producers first.
	var constNodes []int
	copied := map[string]bool{}
	emitted := map[int]bool{}
	var copyConst func(name string)
	copyConst = func(name string) {
		if copied[name] {
			return
		}
		copied[name] = true
		if t, ok := gr.inits[name]; ok {
			g.Initializer = append(g.Initializer, t)
		} else if sp, ok := gr.sparse[name]; ok {
			g.SparseInitializer = append(g.SparseInitializer, sp)
		} else if p := gr.producer[name]; !emitted[p] {
			emitted[p] = true
			for _, u := range gr.uses[p] {
				copyConst(u)
			}
			constNodes = append(constNodes, p)
			if isConstantNode(gr.nodes[p]) {
				info.ParamBytes += constBytes(gr.nodes[p])
			}
			info.Constants++
			return
		} else {
			return
		}
		info.Constants++
		info.ParamBytes += gr.constRefBytes(name)
		// An IR < 4 graph lists its initializers among its inputs.
		if vi, ok := listedInputs[name]; ok {
			g.Input = append(g.Input, vi)
		}
	}
	for _, name := range need {
		switch {
		case produced[name]:
		case gr.isConstName(name):
			copyConst(name)
		default:
			t, ok := s.specs[name]
			if !ok {
				return nil, spec, info, fmt.Errorf("no type known for %q", name)
			}
			spec.Inputs = append(spec.Inputs, t)
		}
	}
	for _, i := range constNodes {
		g.Node = append(g.Node, gr.nodes[i])
	}
	for _, i := range gr.order[lo:hi] {
		g.Node = append(g.Node, gr.nodes[i])
		for _, sg := range subgraphs(gr.nodes[i]) {
			info.ParamBytes += graphParamBytes(sg)
		}
	}
	info.Nodes = hi - lo
	// Outputs: what later blocks read, and graph outputs.
	for _, i := range gr.order[lo:hi] {
		for _, o := range gr.nodes[i].GetOutput() {
			if o == "" {
				continue
			}
			if k, ok := last[o]; (ok && k >= hi) || gr.outSet[o] {
				t, ok := s.specs[o]
				if !ok {
					return nil, spec, info, fmt.Errorf("no type known for %q", o)
				}
				spec.Outputs = append(spec.Outputs, t)
			}
		}
	}
	for _, name := range constOuts {
		spec.Outputs = append(spec.Outputs, s.specs[name])
	}
	if len(spec.Inputs) == 0 {
		// Only nodes reading nothing but random generators get here.
		return nil, spec, info, fmt.Errorf("%w: the block would read no input, which onnxruntime_go cannot run; cut elsewhere", ErrNoCut)
	}
	// A state output needs its input in the same block, read or not.
	for _, t := range spec.Outputs {
		if in := s.stOut[t.Name]; in != "" && !seen[in] {
			spec.Inputs = append(spec.Inputs, s.specs[in])
		}
	}
	for _, t := range spec.Inputs {
		g.Input = append(g.Input, valueInfo(t))
		if out := s.state[t.Name]; out != "" {
			spec.State = append(spec.State, shards.StatePair{Input: t.Name, Output: out})
		}
	}
	for _, t := range spec.Outputs {
		g.Output = append(g.Output, valueInfo(t))
	}
	// Keep the source's type hints for the block's inner tensors.
	inner := map[string]bool{}
	for name := range produced {
		inner[name] = true
	}
	for _, t := range spec.Outputs {
		delete(inner, t.Name)
	}
	for _, vi := range src.GetValueInfo() {
		if inner[vi.GetName()] {
			g.ValueInfo = append(g.ValueInfo, vi)
		}
	}
	src0 := gr.model
	m := &onnxpb.ModelProto{
		IrVersion:     src0.IrVersion,
		OpsetImport:   src0.GetOpsetImport(),
		ProducerName:  proto.String(ProducerName),
		Domain:        src0.Domain,
		ModelVersion:  src0.ModelVersion,
		Graph:         g,
		MetadataProps: src0.GetMetadataProps(),
		Functions:     src0.GetFunctions(),
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, spec, info, err
	}
	return data, spec, info, nil
}
