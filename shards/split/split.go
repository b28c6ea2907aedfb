package split

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// Options says how to cut a model. Exactly one of Blocks and At is set.
type Options struct {
	// Blocks is how many blocks to cut the model into; the cuts are chosen
	// where few bytes cross, near an even split of the weight.
	Blocks int
	// At names tensors to cut right after: each cut falls just after the
	// node producing the tensor, in the order the splitter runs the nodes.
	At []string
	// Name is the model's name in the manifest. Empty means the graph's
	// name, else "split".
	Name string
	// State lists per-session state pairs as "input=output" (a recurrent
	// state, a KV cache): a graph input the model reads and the graph
	// output it writes for the next step. A pair stays inside one block and
	// is recorded in its BlockSpec.State; it is not a model input or
	// output of the manifest.
	State []string
	// Slack is how far, as a fraction of a block's even share of the
	// weight, an automatic cut may move from an even split to find a
	// narrower place. Zero means 0.5.
	Slack float64

	// Dims renames the dimensions of graph inputs (state inputs included),
	// e.g. {"state": {{Size: 2}, {Param: "batch"}, {Size: 128}}}. A fixed
	// size must equal the model's. Dimensions the model leaves unnamed and
	// Dims does not name are called "<input>_<axis>".
	Dims map[string][]shards.Dim
	// DimSizes gives the sizes of symbolic dimensions in the sample inputs
	// that type the tensors at the cuts and verify the blocks (0 is allowed:
	// an empty KV cache). Unlisted dimensions are 1 at axis 0 (a batch) and
	// 64, 96, 128... elsewhere.
	DimSizes map[string]int64
	// Inputs are sample inputs used as given instead of random ones (a
	// sample rate, token IDs in range). The dimensions they bind are not
	// varied when the splitter probes which dimensions are symbolic.
	Inputs map[string]*protocol.Tensor
	// Seed seeds the random sample inputs.
	Seed int64

	// Verify runs the whole model and the chained blocks on the sample
	// inputs and fails when an output differs by more than its tolerance.
	Verify bool
	// Tolerance is the largest absolute difference Verify accepts in any
	// output. Zero (or less) means each output's own, from its element
	// type and the whole model's values (see OutputTolerance).
	Tolerance float64
	// Runtime runs the sample inputs. Nil means
	// shards.OpenRuntime(shards.RuntimeConfig{}).
	Runtime *shards.Runtime
}

// DefaultTolerance is the largest difference Verify accepts in a float32
// output when Options.Tolerance is zero, and the least it accepts in a
// float16 or bfloat16 one.
const DefaultTolerance = 1e-4

// Tolerances of the other element types, when Options.Tolerance is zero.
const (
	// Float64Tolerance is the largest difference accepted in a float64
	// output: cutting a graph does not round float64 tensors, so only the
	// order of operations may change.
	Float64Tolerance = 1e-8
	// HalfULPs is how many units in the last place, at the largest
	// magnitude of an output's values in the whole model, a float16 or
	// bfloat16 output may differ by. onnxruntime computes some half
	// precision nodes in float32 and keeps float32 between consecutive
	// ones; a cut rounds the tensor crossing it to its half precision
	// type, and the next nodes carry and may amplify that rounding.
	HalfULPs = 4
)

// OutputTolerance is the largest absolute difference Verify accepts, with
// Options.Tolerance zero, between the blocks' and the whole model's values
// of an output of element type dt whose largest magnitude in the whole
// model is maxAbs:
//
//   - float32: DefaultTolerance;
//   - float64: Float64Tolerance;
//   - float16, bfloat16: HalfULPs units in the last place at maxAbs, and
//     at least DefaultTolerance;
//   - integer and bool types: 0, the values must be equal.
func OutputTolerance(dt protocol.DType, maxAbs float64) float64 {
	switch dt {
	case protocol.Float32:
		return DefaultTolerance
	case protocol.Float64:
		return Float64Tolerance
	case protocol.Float16:
		return max(DefaultTolerance, HalfULPs*ulp(maxAbs, 10, -14))
	case protocol.BFloat16:
		return max(DefaultTolerance, HalfULPs*ulp(maxAbs, 7, -126))
	}
	return 0
}

// ulp is the spacing of binary floating point numbers with mantissa bits
// stored bits and least normal exponent minExp around x (for x below the
// normal range, the subnormal spacing).
func ulp(x float64, mantissa, minExp int) float64 {
	exp := minExp
	if x = math.Abs(x); x != 0 {
		_, e := math.Frexp(x) // x = frac * 2^e, frac in [0.5, 1)
		exp = max(e-1, minExp)
	}
	return math.Ldexp(1, exp-mantissa)
}

// Report says how a model was cut.
type Report struct {
	Name string
	// Nodes is the number of top-level nodes placed in blocks; Constants
	// the number of nodes computing constants (Constant nodes, and nodes
	// reading only constants), copied into each block that reads them;
	// Dropped the nodes no graph output depends on, left out.
	Nodes, Constants, Dropped int
	Cuts                      []Cut
	Blocks                    []BlockInfo
	// SampleDims are the sizes of the symbolic dimensions in the sample
	// inputs: Cut bytes are measured at these sizes.
	SampleDims map[string]int64
	// Verified is true when the chained blocks were compared with the
	// whole model; MaxAbsDiff is the largest difference seen.
	Verified   bool
	MaxAbsDiff float64
	// Notes are warnings worth a user's attention.
	Notes []string
}

// Cut is one cut between consecutive blocks.
type Cut struct {
	// After is the cut's position: the number of nodes, in the splitter's
	// order, before it.
	After int
	// Tensors are those crossing the cut: produced before it (or model
	// inputs) and read after it (or model outputs).
	Tensors []CutTensor
	// Bytes is the sum of the tensors' bytes.
	Bytes int64
}

// CutTensor is a tensor crossing a cut.
type CutTensor struct {
	shards.TensorSpec
	// Bytes is its size at the sample input sizes (Report.SampleDims).
	Bytes int64
}

// BlockInfo describes one block written.
type BlockInfo struct {
	CID string
	// Size is the block's ONNX file size in bytes.
	Size int64
	// Nodes is the number of top-level nodes the block runs; Constants the
	// constant nodes and initializers copied into it; ParamBytes the bytes
	// of the constants it holds, those in its nodes' subgraphs included.
	Nodes, Constants int
	ParamBytes       int64
}

// ErrMismatch is returned, wrapped with the details, when the chained
// blocks' outputs differ from the whole model's by more than the tolerance.
var ErrMismatch = errors.New("blocks differ from the whole model")

// ErrOptions is returned, wrapped with the reason, for options that
// contradict each other or the model.
var ErrOptions = errors.New("bad split options")

// splitter carries one Split call.
type splitter struct {
	opts  Options
	gr    *graph
	rt    *shards.Runtime
	name  string
	state map[string]string // state input -> output
	stOut map[string]string // state output -> input

	inSpecs map[string]shards.TensorSpec // graph inputs, dimensions named
	types   map[string]int32             // element type per tensor
	infos   map[string]*tensorInfo       // measured tensors
	specs   map[string]shards.TensorSpec // resolved spec per tensor
	sizesA  map[string]int64             // sample dimension sizes
	samples shards.Tensors               // sample inputs at sizesA, state included
	notes   []string
}

// Split cuts a whole ONNX model into sequential blocks, writes them as a
// model directory in dir (manifest, blocks, and the original as
// dir/full.onnx) and returns the opened model with a report. Blocks keep the
// source's IR version and opset imports and hold their weights inside.
// Models keeping weights in external data files are refused
// (ErrExternalData).
//
// Typing the tensors at the cuts needs onnxruntime: the model runs once on
// sample inputs with every intermediate tensor as an extra output, and
// again with its symbolic dimensions changed, which tells fixed dimensions
// from symbolic ones.
//
// When Verify finds a difference over the tolerance, Split returns the
// model and report together with an error wrapping ErrMismatch.
func Split(onnxModel []byte, dir string, opts Options) (*shards.Model, *Report, error) {
	m, err := shards.ParseONNX(onnxModel)
	if err != nil {
		return nil, nil, err
	}
	if opts.Slack <= 0 {
		opts.Slack = 0.5
	}
	if (opts.Blocks > 0) == (len(opts.At) > 0) {
		return nil, nil, fmt.Errorf("%w: give either a number of blocks or tensors to cut at", ErrOptions)
	}
	gr, err := analyse(m)
	if err != nil {
		return nil, nil, err
	}
	s := &splitter{opts: opts, gr: gr, name: opts.Name}
	if s.name == "" {
		s.name = gr.g.GetName()
	}
	if s.name == "" {
		s.name = "split"
	}
	if err := s.parseState(); err != nil {
		return nil, nil, err
	}
	// State outputs first: the nodes between a state input and its output
	// then sit close together, leaving more places to cut.
	var first []string
	for _, p := range opts.State {
		_, out, _ := strings.Cut(p, "=")
		first = append(first, out)
	}
	if err := gr.sort(first); err != nil {
		return nil, nil, err
	}
	if len(gr.order) == 0 {
		return nil, nil, fmt.Errorf("%w: the graph has no node to run", ErrBadGraph)
	}
	if err := s.nameInputs(); err != nil {
		return nil, nil, err
	}
	// Check --at names before running anything.
	if len(opts.At) > 0 {
		if _, err := s.atPositions(nil); err != nil {
			return nil, nil, err
		}
	}
	s.rt = opts.Runtime
	if s.rt == nil {
		if s.rt, err = shards.OpenRuntime(shards.RuntimeConfig{}); err != nil {
			return nil, nil, err
		}
	}
	if err := s.measure(); err != nil {
		return nil, nil, err
	}
	pl := s.plan()
	var cuts []int
	if len(opts.At) > 0 {
		cuts, err = s.atPositions(pl)
	} else {
		cuts, err = pl.choose(opts.Blocks, opts.Slack)
	}
	if err != nil {
		return nil, nil, err
	}
	man, blocks, rep, err := s.build(pl, cuts)
	if err != nil {
		return nil, nil, err
	}
	if testHookBlocks != nil {
		testHookBlocks(blocks)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, err
	}
	model, err := shards.WriteModel(dir, man, blocks)
	if err != nil {
		return nil, nil, err
	}
	whole, err := s.wholeFile(onnxModel)
	if err != nil {
		return nil, nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, shards.WholeFile), whole, 0o644); err != nil {
		return nil, nil, err
	}
	for i := range rep.Blocks {
		rep.Blocks[i].CID = man.Blocks[i].CID
		rep.Blocks[i].Size = man.Blocks[i].Size
	}
	if opts.Verify {
		if err := s.verify(model, rep); err != nil {
			rep.Notes = append(rep.Notes, s.notes...)
			return model, rep, err
		}
	}
	rep.Notes = append(rep.Notes, s.notes...)
	return model, rep, nil
}

// testHookBlocks, set only by tests, may change the blocks before Split
// writes and verifies them: a test corrupts one to see Verify catch it.
var testHookBlocks func(blocks [][]byte)

// wholeFile is what Split writes as full.onnx: the source as it is, or,
// when it leaves graph outputs untyped (which onnxruntime accepts but a
// manifest cannot describe), the source with their measured types filled in.
func (s *splitter) wholeFile(src []byte) ([]byte, error) {
	var fill []string
	for _, vi := range s.gr.g.GetOutput() {
		if viType(vi) <= 0 || vi.GetType().GetTensorType().GetShape() == nil {
			fill = append(fill, vi.GetName())
		}
	}
	if len(fill) == 0 {
		return src, nil
	}
	m := proto.Clone(s.gr.model).(*onnxpb.ModelProto)
	for i, vi := range m.GetGraph().GetOutput() {
		if spec, ok := s.specs[vi.GetName()]; ok && slices.Contains(fill, vi.GetName()) {
			m.Graph.Output[i] = valueInfo(spec)
		}
	}
	s.notes = append(s.notes, fmt.Sprintf("%s is the source with the types of its outputs %s filled in", shards.WholeFile, strings.Join(fill, ", ")))
	return proto.MarshalOptions{Deterministic: true}.Marshal(m)
}

// parseState reads Options.State.
func (s *splitter) parseState() error {
	s.state, s.stOut = map[string]string{}, map[string]string{}
	for _, p := range s.opts.State {
		in, out, ok := strings.Cut(p, "=")
		if !ok || in == "" || out == "" {
			return fmt.Errorf("%w: state pair %q is not input=output", ErrOptions, p)
		}
		if !s.gr.inputSet[in] {
			return fmt.Errorf("%w: state input %q is not a graph input", ErrOptions, in)
		}
		if !s.gr.outSet[out] {
			return fmt.Errorf("%w: state output %q is not a graph output", ErrOptions, out)
		}
		if _, ok := s.gr.computeProducer(out); !ok {
			return fmt.Errorf("%w: state output %q is not computed by a node", ErrOptions, out)
		}
		if _, dup := s.state[in]; dup {
			return fmt.Errorf("%w: state input %q paired twice", ErrOptions, in)
		}
		if _, dup := s.stOut[out]; dup {
			return fmt.Errorf("%w: state output %q paired twice", ErrOptions, out)
		}
		s.state[in], s.stOut[out] = out, in
	}
	return nil
}

// nameInputs resolves the graph inputs' specs: declared dimensions, renamed
// by Options.Dims, unnamed ones called "<input>_<axis>".
func (s *splitter) nameInputs() error {
	s.inSpecs = map[string]shards.TensorSpec{}
	for name := range s.opts.Dims {
		if !s.gr.inputSet[name] {
			return fmt.Errorf("%w: Dims names %q, which is not a graph input", ErrOptions, name)
		}
	}
	for name := range s.opts.Inputs {
		if !s.gr.inputSet[name] {
			return fmt.Errorf("%w: sample input %q is not a graph input", ErrOptions, name)
		}
	}
	for _, vi := range s.gr.inputs {
		spec, err := shards.SpecFromValueInfo(vi)
		if err != nil {
			return fmt.Errorf("graph input: %w", err)
		}
		if vi.GetType().GetTensorType().GetShape() == nil {
			return fmt.Errorf("%w: graph input %q declares no shape", ErrBadGraph, spec.Name)
		}
		for i, d := range spec.Shape {
			if d.Param == "?" {
				spec.Shape[i].Param = fmt.Sprintf("%s_%d", spec.Name, i)
			}
		}
		if dims, ok := s.opts.Dims[spec.Name]; ok {
			if len(dims) != len(spec.Shape) {
				return fmt.Errorf("%w: Dims gives %q rank %d, the model %d", ErrOptions, spec.Name, len(dims), len(spec.Shape))
			}
			for i, d := range dims {
				if old := spec.Shape[i]; old.Param == "" && (d.Param != "" || d.Size != old.Size) {
					return fmt.Errorf("%w: Dims gives %q dimension %d as %v, the model fixes it at %d", ErrOptions, spec.Name, i, d, old.Size)
				}
				if d.Param == "" && d.Size <= 0 {
					return fmt.Errorf("%w: Dims gives %q dimension %d neither a size nor a name", ErrOptions, spec.Name, i)
				}
			}
			spec.Shape = append([]shards.Dim(nil), dims...)
		}
		s.inSpecs[spec.Name] = spec
	}
	return nil
}

// atPositions turns Options.At into cut positions. With a nil plan it only
// checks the names.
func (s *splitter) atPositions(pl *plan) ([]int, error) {
	gr := s.gr
	var cuts []int
	for _, name := range s.opts.At {
		p, ok := gr.producer[name]
		switch {
		case gr.inputSet[name]:
			return nil, fmt.Errorf("%w: %q is a model input; cut after a tensor a node computes", ErrNoCut, name)
		case gr.isInit(name):
			return nil, fmt.Errorf("%w: %q is an initializer (a weight, copied into each block that reads it)", ErrNoCut, name)
		case ok && gr.isConst[p]:
			return nil, fmt.Errorf("%w: %q is a constant (computed from weights only; copied into each block that reads it)", ErrNoCut, name)
		case ok && gr.pos[p] < 0:
			return nil, fmt.Errorf("%w: %q is computed by node %s, which no model output depends on", ErrNoCut, name, nodeName(gr.nodes[p]))
		case !ok:
			if owner, in := gr.findInSubgraph(name); in {
				return nil, fmt.Errorf("%w: %q lives inside a subgraph of node %s; cuts fall between top-level nodes", ErrNoCut, name, nodeName(gr.nodes[owner]))
			}
			return nil, fmt.Errorf("%w: the model has no tensor %q", ErrNoCut, name)
		}
		pos := gr.pos[p] + 1
		if pl != nil {
			if pos >= pl.n {
				return nil, fmt.Errorf("%w: after %q: it is computed by the last node, nothing would be left for another block", ErrNoCut, name)
			}
			if why := pl.forbid[pos]; why != "" {
				return nil, fmt.Errorf("%w: after %q: %s", ErrNoCut, name, why)
			}
		}
		cuts = append(cuts, pos)
	}
	if pl == nil {
		return nil, nil
	}
	return pl.check(cuts)
}

// plan gathers the tensors' lives, the nodes' weights and the forbidden
// positions.
func (s *splitter) plan() *plan {
	gr := s.gr
	n := len(gr.order)
	last := map[string]int{}
	for k, i := range gr.order {
		for _, name := range gr.uses[i] {
			last[name] = k
		}
	}
	var lives []life
	add := func(name string, from int) {
		to, used := last[name]
		if gr.outSet[name] && s.stOut[name] == "" {
			to, used = n, true
		}
		if !used || s.state[name] != "" {
			return
		}
		var b int64
		if info := s.infos[name]; info != nil {
			b = info.bytes
		}
		lives = append(lives, life{name: name, from: from, to: to, bytes: b})
	}
	for _, vi := range gr.inputs {
		add(vi.GetName(), -1)
	}
	for k, i := range gr.order {
		for _, o := range gr.nodes[i].GetOutput() {
			if o != "" {
				add(o, k)
			}
		}
	}
	// Weight: the parameters a node reads, plus an even share per node so
	// that weightless stretches still count.
	weight := make([]float64, n)
	var total float64
	for k, i := range gr.order {
		weight[k] = float64(gr.paramBytes(i))
		total += weight[k]
	}
	per := max(total/float64(n), 1)
	for k := range weight {
		weight[k] += per
	}
	pl := newPlan(weight, lives)
	for _, l := range lives {
		if info := s.infos[l.name]; info == nil || !info.dtype.Valid() {
			what := "is not a tensor infermesh can carry"
			if t := s.types[l.name]; t == nonTensor {
				what = "is a sequence, map or optional"
			} else if info != nil {
				what = fmt.Sprintf("has element type %v, which infermesh cannot carry", info.dtype)
			}
			pl.forbidRange(l.from, l.to, fmt.Sprintf("%q %s and would cross the cut", l.name, what))
		}
	}
	// A state pair stays in one block, with every reader of its output.
	for in, out := range s.state {
		lo, hi := n, -1
		mark := func(k int) { lo, hi = min(lo, k), max(hi, k) }
		for k, i := range gr.order {
			for _, name := range gr.uses[i] {
				if name == in || name == out {
					mark(k)
				}
			}
		}
		p, _ := gr.computeProducer(out)
		mark(gr.pos[p])
		pl.forbidRange(lo, hi, fmt.Sprintf("state pair %s=%s must stay in one block", in, out))
	}
	return pl
}

// WriteText prints the report for a person: the cuts with the tensors
// crossing them, and the blocks.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d nodes (+%d constants) in %d blocks", r.Name, r.Nodes, r.Constants, len(r.Blocks))
	if r.Dropped > 0 {
		fmt.Fprintf(&b, ", %d unused nodes dropped", r.Dropped)
	}
	b.WriteString("\n")
	if len(r.SampleDims) > 0 {
		keys := make([]string, 0, len(r.SampleDims))
		for k := range r.SampleDims {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var dims []string
		for _, k := range keys {
			dims = append(dims, fmt.Sprintf("%s=%d", k, r.SampleDims[k]))
		}
		fmt.Fprintf(&b, "sample dims: %s\n", strings.Join(dims, " "))
	}
	for i, blk := range r.Blocks {
		fmt.Fprintf(&b, "block %d: %s  %d bytes  %d nodes  %d constants (%d bytes)\n", i, blk.CID, blk.Size, blk.Nodes, blk.Constants, blk.ParamBytes)
		if i < len(r.Cuts) {
			c := r.Cuts[i]
			fmt.Fprintf(&b, "  cut after node %d: %d tensors, %d bytes\n", c.After, len(c.Tensors), c.Bytes)
			for _, t := range c.Tensors {
				fmt.Fprintf(&b, "    %s %v%v  %d bytes\n", t.Name, t.DType, t.Shape, t.Bytes)
			}
		}
	}
	if r.Verified {
		fmt.Fprintf(&b, "verified: max abs diff %.3g\n", r.MaxAbsDiff)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// valueInfo converts a spec into an ONNX ValueInfo; "?" dimensions are left
// unnamed.
func valueInfo(t shards.TensorSpec) *onnxpb.ValueInfoProto {
	shape := &onnxpb.TensorShapeProto{Dim: []*onnxpb.TensorShapeProto_Dimension{}}
	for _, d := range t.Shape {
		dim := &onnxpb.TensorShapeProto_Dimension{}
		switch {
		case d.Param == "?":
		case d.Param != "":
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimParam{DimParam: d.Param}
		default:
			dim.Value = &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: d.Size}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	elem := int32(t.DType)
	name := t.Name
	return &onnxpb.ValueInfoProto{Name: &name, Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{
		TensorType: &onnxpb.TypeProto_Tensor{ElemType: &elem, Shape: shape}}}}
}
