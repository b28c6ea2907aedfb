package split

import (
	"errors"
	"fmt"
	"strings"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// graph is the top level of an ONNX graph analysed for cutting: who
// produces and who reads each tensor, which nodes are constants, and the
// order in which the blocks take the compute nodes.
type graph struct {
	model *onnxpb.ModelProto
	g     *onnxpb.GraphProto

	nodes    []*onnxpb.NodeProto
	isConst  []bool     // computes a constant: copied into every block that reads it (see markConstants)
	uses     [][]string // per node: explicit inputs, then names its subgraphs read from the outer scope
	producer map[string]int

	inits    map[string]*onnxpb.TensorProto       // initializers by name
	sparse   map[string]*onnxpb.SparseTensorProto // sparse initializers by name
	inputs   []*onnxpb.ValueInfoProto             // graph inputs that are not initializers
	inputSet map[string]bool
	outputs  []string
	outSet   map[string]bool
	vinfo    map[string]*onnxpb.ValueInfoProto // value_info, inputs and outputs by name

	// order lists the compute nodes (Constants excluded) that some graph
	// output depends on, in a topological order: depth first from the
	// outputs, each node right after the last of its dependencies, so that
	// branches stay together whatever order the file lists its nodes in.
	order   []int
	pos     []int // node index -> position in order, or -1
	dropped int   // compute nodes no output depends on

	constSize map[int]int64 // memo of constRefBytes per constant node
}

// Errors of a model that cannot be split.
var (
	// ErrExternalData is returned for models that keep weights in external
	// files: internalize them first (for example with onnx.load and
	// onnx.save(..., save_as_external_data=False)).
	ErrExternalData = errors.New("model keeps tensors in external data files")
	// ErrCycle is returned, wrapped with the nodes on the cycle, for a graph
	// that is not acyclic.
	ErrCycle = errors.New("graph has a cycle")
	// ErrBadGraph is returned, wrapped with the reason, for a graph that
	// breaks ONNX's rules: a tensor produced twice, or read but never
	// produced.
	ErrBadGraph = errors.New("malformed ONNX graph")
)

func isConstantNode(n *onnxpb.NodeProto) bool {
	return n.GetOpType() == "Constant" && (n.GetDomain() == "" || n.GetDomain() == "ai.onnx") && len(n.GetInput()) == 0
}

// nodeName names a node in messages: its name, else its op and first output.
func nodeName(n *onnxpb.NodeProto) string {
	if n.GetName() != "" {
		return fmt.Sprintf("%s (%s)", n.GetName(), n.GetOpType())
	}
	out := ""
	if len(n.GetOutput()) > 0 {
		out = n.GetOutput()[0]
	}
	return fmt.Sprintf("%s -> %q", n.GetOpType(), out)
}

// subgraphs returns the graphs held in a node's attributes (If branches,
// Loop and Scan bodies).
func subgraphs(n *onnxpb.NodeProto) []*onnxpb.GraphProto {
	var gs []*onnxpb.GraphProto
	for _, a := range n.GetAttribute() {
		if a.GetG() != nil {
			gs = append(gs, a.GetG())
		}
		gs = append(gs, a.GetGraphs()...)
	}
	return gs
}

// outerNames appends to out, once each, the names that g (and the graphs
// nested in it) reads but does not define: references to the enclosing
// scope.
func outerNames(g *onnxpb.GraphProto, out []string, seen map[string]bool) []string {
	defined := map[string]bool{}
	for _, vi := range g.GetInput() {
		defined[vi.GetName()] = true
	}
	for _, t := range g.GetInitializer() {
		defined[t.GetName()] = true
	}
	for _, s := range g.GetSparseInitializer() {
		defined[s.GetValues().GetName()] = true
	}
	for _, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			defined[o] = true
		}
	}
	add := func(name string) {
		if name != "" && !defined[name] && !seen[name] {
			seen[name] = true
			out = append(out, name)
		}
	}
	for _, n := range g.GetNode() {
		for _, in := range n.GetInput() {
			add(in)
		}
		for _, sg := range subgraphs(n) {
			for _, name := range outerNames(sg, nil, map[string]bool{}) {
				add(name)
			}
		}
	}
	return out
}

// checkInternal refuses tensors stored outside the model file, in g and
// every subgraph.
func checkInternal(g *onnxpb.GraphProto) error {
	ext := func(t *onnxpb.TensorProto) bool {
		return t != nil && (t.GetDataLocation() == onnxpb.TensorProto_EXTERNAL || len(t.GetExternalData()) > 0)
	}
	for _, t := range g.GetInitializer() {
		if ext(t) {
			return fmt.Errorf("%w: initializer %q; save the model with its weights inside (onnx.save(model, path, save_as_external_data=False)) and split that", ErrExternalData, t.GetName())
		}
	}
	for _, s := range g.GetSparseInitializer() {
		if ext(s.GetValues()) || ext(s.GetIndices()) {
			return fmt.Errorf("%w: sparse initializer %q", ErrExternalData, s.GetValues().GetName())
		}
	}
	for _, n := range g.GetNode() {
		for _, a := range n.GetAttribute() {
			if ext(a.GetT()) {
				return fmt.Errorf("%w: attribute %q of node %s", ErrExternalData, a.GetName(), nodeName(n))
			}
			for _, t := range a.GetTensors() {
				if ext(t) {
					return fmt.Errorf("%w: attribute %q of node %s", ErrExternalData, a.GetName(), nodeName(n))
				}
			}
		}
		for _, sg := range subgraphs(n) {
			if err := checkInternal(sg); err != nil {
				return err
			}
		}
	}
	return nil
}

// analyse indexes a model's main graph. Its nodes are ordered by sort.
func analyse(m *onnxpb.ModelProto) (*graph, error) {
	g := m.GetGraph()
	if err := checkInternal(g); err != nil {
		return nil, err
	}
	gr := &graph{
		model: m, g: g, nodes: g.GetNode(),
		producer: map[string]int{}, inits: map[string]*onnxpb.TensorProto{}, sparse: map[string]*onnxpb.SparseTensorProto{},
		inputSet: map[string]bool{}, outSet: map[string]bool{}, vinfo: map[string]*onnxpb.ValueInfoProto{},
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadGraph, fmt.Sprintf(format, args...))
	}
	for _, t := range g.GetInitializer() {
		if t.GetName() == "" {
			return nil, bad("initializer without a name")
		}
		gr.inits[t.GetName()] = t
	}
	for _, s := range g.GetSparseInitializer() {
		gr.sparse[s.GetValues().GetName()] = s
	}
	for _, vi := range g.GetValueInfo() {
		gr.vinfo[vi.GetName()] = vi
	}
	for _, vi := range g.GetInput() {
		name := vi.GetName()
		gr.vinfo[name] = vi
		if gr.isInit(name) {
			continue
		}
		if name == "" || gr.inputSet[name] {
			return nil, bad("graph input %q is empty or listed twice", name)
		}
		gr.inputSet[name] = true
		gr.inputs = append(gr.inputs, vi)
	}
	for _, vi := range g.GetOutput() {
		name := vi.GetName()
		if name == "" || gr.outSet[name] {
			return nil, bad("graph output %q is empty or listed twice", name)
		}
		gr.vinfo[name] = vi
		gr.outSet[name] = true
		gr.outputs = append(gr.outputs, name)
	}
	gr.uses = make([][]string, len(gr.nodes))
	for i, n := range gr.nodes {
		for _, o := range n.GetOutput() {
			if o == "" {
				continue
			}
			if j, dup := gr.producer[o]; dup {
				return nil, bad("tensor %q is produced by two nodes: %s and %s", o, nodeName(gr.nodes[j]), nodeName(n))
			}
			if gr.inputSet[o] || gr.isInit(o) {
				return nil, bad("tensor %q is both a graph input or initializer and the output of node %s", o, nodeName(n))
			}
			gr.producer[o] = i
		}
		seen := map[string]bool{}
		var uses []string
		for _, in := range n.GetInput() {
			if in != "" && !seen[in] {
				seen[in] = true
				uses = append(uses, in)
			}
		}
		for _, sg := range subgraphs(n) {
			uses = outerNames(sg, uses, seen)
		}
		gr.uses[i] = uses
	}
	for i, uses := range gr.uses {
		for _, name := range uses {
			if !gr.known(name) {
				return nil, bad("node %s reads %q, which no node, graph input or initializer provides", nodeName(gr.nodes[i]), name)
			}
		}
	}
	for _, name := range gr.outputs {
		if !gr.known(name) {
			return nil, bad("graph output %q is produced by no node, graph input or initializer", name)
		}
	}
	gr.markConstants()
	return gr, nil
}

// randomOps are never taken for constants, whatever they read.
var randomOps = map[string]bool{
	"RandomNormal": true, "RandomUniform": true, "RandomNormalLike": true, "RandomUniformLike": true,
	"Multinomial": true, "Bernoulli": true, "Dropout": true,
}

// markConstants sets isConst for Constant nodes and for the deterministic
// standard-domain nodes without subgraphs that read only initializers and
// other constants (a Cast or Reshape of a weight, a dequantized weight).
// Such nodes are copied into each block that reads them, like
// initializers: they never cross a cut, and no block is left reading only
// constants, which the runtime could not feed.
func (gr *graph) markConstants() {
	const (
		unknown = iota
		visiting
		yes
		no
	)
	state := make([]uint8, len(gr.nodes))
	var constant func(i int) bool
	constant = func(i int) bool {
		switch state[i] {
		case yes:
			return true
		case visiting, no:
			return false
		}
		state[i] = visiting
		n := gr.nodes[i]
		ok := isConstantNode(n)
		if !ok && len(gr.uses[i]) > 0 && (n.GetDomain() == "" || n.GetDomain() == "ai.onnx") &&
			!randomOps[n.GetOpType()] && len(subgraphs(n)) == 0 {
			ok = true
			for _, name := range gr.uses[i] {
				if gr.isInit(name) {
					continue
				}
				if p, made := gr.producer[name]; !made || !constant(p) {
					ok = false
					break
				}
			}
		}
		state[i] = no
		if ok {
			state[i] = yes
		}
		return ok
	}
	gr.isConst = make([]bool, len(gr.nodes))
	for i := range gr.nodes {
		gr.isConst[i] = constant(i)
	}
}

func (gr *graph) isInit(name string) bool {
	_, ok := gr.inits[name]
	if !ok {
		_, ok = gr.sparse[name]
	}
	return ok
}

func (gr *graph) known(name string) bool {
	_, ok := gr.producer[name]
	return ok || gr.inputSet[name] || gr.isInit(name)
}

// computeProducer returns the compute node (not a Constant) producing name.
func (gr *graph) computeProducer(name string) (int, bool) {
	p, ok := gr.producer[name]
	if !ok || gr.isConst[p] {
		return 0, false
	}
	return p, true
}

// sort fills order and pos: a depth-first walk from the tensors named in
// first, then from the graph outputs, that emits each node after its
// dependencies. It reports a cycle anywhere in the graph, reachable from the
// outputs or not.
func (gr *graph) sort(first []string) error {
	const (
		white = iota
		grey
		black
	)
	color := make([]uint8, len(gr.nodes))
	var stack []int
	var visit func(i int, emit bool) error
	visit = func(i int, emit bool) error {
		switch color[i] {
		case black:
			return nil
		case grey:
			var names []string
			for k := len(stack) - 1; k >= 0; k-- {
				names = append(names, nodeName(gr.nodes[stack[k]]))
				if stack[k] == i {
					break
				}
			}
			return fmt.Errorf("%w: %s", ErrCycle, strings.Join(names, " <- "))
		}
		color[i] = grey
		stack = append(stack, i)
		for _, name := range gr.uses[i] {
			if p, ok := gr.computeProducer(name); ok {
				if err := visit(p, emit); err != nil {
					return err
				}
			}
		}
		stack = stack[:len(stack)-1]
		color[i] = black
		if emit && !gr.isConst[i] {
			gr.order = append(gr.order, i)
		}
		return nil
	}
	for _, name := range append(append([]string(nil), first...), gr.outputs...) {
		if p, ok := gr.computeProducer(name); ok {
			if err := visit(p, true); err != nil {
				return err
			}
		}
	}
	// Nodes no output depends on are dropped, but a cycle among them is
	// still reported.
	for i := range gr.nodes {
		if color[i] == white && !gr.isConst[i] {
			gr.dropped++
			if err := visit(i, false); err != nil {
				return err
			}
		}
	}
	gr.pos = make([]int, len(gr.nodes))
	for i := range gr.pos {
		gr.pos[i] = -1
	}
	for k, i := range gr.order {
		gr.pos[i] = k
	}
	return nil
}

// tensorBytes is the size of a constant tensor's data.
func tensorBytes(t *onnxpb.TensorProto) int64 {
	if t == nil {
		return 0
	}
	if size := protocol.DType(t.GetDataType()).Size(); size > 0 {
		return protocol.NumElements(t.GetDims()) * int64(size)
	}
	n := int64(len(t.GetRawData()))
	for _, s := range t.GetStringData() {
		n += int64(len(s))
	}
	return n
}

// constBytes is the size of the value a Constant node holds.
func constBytes(n *onnxpb.NodeProto) int64 {
	var b int64
	for _, a := range n.GetAttribute() {
		switch {
		case a.GetT() != nil:
			b += tensorBytes(a.GetT())
		case a.GetSparseTensor() != nil:
			b += tensorBytes(a.GetSparseTensor().GetValues()) + tensorBytes(a.GetSparseTensor().GetIndices())
		default:
			b += int64(4*len(a.GetFloats()) + 8*len(a.GetInts()))
		}
	}
	return b
}

// graphParamBytes sums the constants held inside a graph (initializers and
// Constant nodes, subgraphs included).
func graphParamBytes(g *onnxpb.GraphProto) int64 {
	var b int64
	for _, t := range g.GetInitializer() {
		b += tensorBytes(t)
	}
	for _, n := range g.GetNode() {
		if isConstantNode(n) {
			b += constBytes(n)
		}
		for _, sg := range subgraphs(n) {
			b += graphParamBytes(sg)
		}
	}
	return b
}

// constRefBytes is the size of the constant called name: an initializer,
// a Constant's value, or for a computed constant the constants it reads.
// It is 0 if name is not a constant.
func (gr *graph) constRefBytes(name string) int64 {
	if t, ok := gr.inits[name]; ok {
		return tensorBytes(t)
	}
	if s, ok := gr.sparse[name]; ok {
		return tensorBytes(s.GetValues()) + tensorBytes(s.GetIndices())
	}
	p, ok := gr.producer[name]
	if !ok || !gr.isConst[p] {
		return 0
	}
	if gr.constSize == nil {
		gr.constSize = map[int]int64{}
	}
	if b, ok := gr.constSize[p]; ok {
		return b
	}
	gr.constSize[p] = 0 // guards against revisiting
	b := constBytes(gr.nodes[p])
	if !isConstantNode(gr.nodes[p]) {
		b = 0
		for _, u := range gr.uses[p] {
			b += gr.constRefBytes(u)
		}
	}
	gr.constSize[p] = b
	return b
}

// paramBytes is the size of the weights node i reads: the constants it
// names and those held in its subgraphs.
func (gr *graph) paramBytes(i int) int64 {
	var b int64
	for _, name := range gr.uses[i] {
		b += gr.constRefBytes(name)
	}
	for _, sg := range subgraphs(gr.nodes[i]) {
		b += graphParamBytes(sg)
	}
	return b
}

// isConstName reports whether name is an initializer or a constant node's
// output: a value copied into each block that reads it rather than passed
// on.
func (gr *graph) isConstName(name string) bool {
	if gr.isInit(name) {
		return true
	}
	p, ok := gr.producer[name]
	return ok && gr.isConst[p]
}

// findInSubgraph reports the top-level node whose subgraphs define name.
func (gr *graph) findInSubgraph(name string) (int, bool) {
	var defines func(g *onnxpb.GraphProto) bool
	defines = func(g *onnxpb.GraphProto) bool {
		for _, n := range g.GetNode() {
			for _, o := range n.GetOutput() {
				if o == name {
					return true
				}
			}
			for _, sg := range subgraphs(n) {
				if defines(sg) {
					return true
				}
			}
		}
		return false
	}
	for i, n := range gr.nodes {
		for _, sg := range subgraphs(n) {
			if defines(sg) {
				return i, true
			}
		}
	}
	return 0, false
}
