package shards

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"

	ort "github.com/yalue/onnxruntime_go"

	"github.com/infermesh/infermesh/protocol"
)

// Tensors maps tensor names to tensors: the inputs and outputs of a pass.
type Tensors = map[string]*protocol.Tensor

// Runner runs a span of blocks: single passes, and sessions that keep
// per-session state (KV caches) between steps. Implementations are safe for
// concurrent use; each Session is used by one caller at a time.
type Runner interface {
	// Run does one stateless pass: state inputs start empty and state
	// outputs are dropped. It returns the span's outputs.
	Run(inputs Tensors) (Tensors, error)
	// NewSession starts a session whose state lives until Close.
	NewSession() Session
	// Inputs are the tensors a caller must send in (state excluded).
	Inputs() []TensorSpec
}

// Session is one generation (or stream) through a span: each Step feeds the
// previous step's state outputs back as state inputs.
type Session interface {
	Step(inputs Tensors) (Tensors, error)
	// Steps is the number of steps run so far.
	Steps() int
	Close() error
}

// Span is blocks [Start, End) of a model loaded into onnxruntime sessions.
type Span struct {
	manifest   *Manifest
	start, end int
	blocks     []*loadedBlock
	inputs     []TensorSpec // what a caller sends in (state excluded)
	outputs    []TensorSpec // what the span hands on
	state      []stateSlot  // every state pair of the span, in block order
	specByName map[string]TensorSpec
}

var _ Runner = (*Span)(nil)

type loadedBlock struct {
	spec    BlockSpec
	first   int // the manifest index of its (first) block
	session *ort.DynamicAdvancedSession
	// Outputs that must be pre-allocated: onnxruntime_go copies float16
	// outputs that onnxruntime allocates short, and cannot wrap scalar
	// (rank-0) ones at all.
	preallocated []int
}

type stateSlot struct {
	pair StatePair
	spec TensorSpec // of the state input
}

// LoadSpan loads blocks [start, end) of a model directory, verifying each
// block against its CID.
func (rt *Runtime) LoadSpan(m *Model, start, end int) (*Span, error) {
	if start < 0 || end > len(m.Manifest.Blocks) || start >= end {
		return nil, fmt.Errorf("span [%d,%d) out of range: model %s has %d blocks", start, end, m.ID, len(m.Manifest.Blocks))
	}
	data := make([][]byte, 0, end-start)
	for i := start; i < end; i++ {
		b, err := m.Block(i)
		if err != nil {
			return nil, err
		}
		data = append(data, b)
	}
	return rt.loadBlocks(m.Manifest, start, end, data, true)
}

// LoadWhole loads the unsplit model DIR/full.onnx as a one-block span with
// the same inputs and outputs as the blocked model (see Manifest.Whole).
func (rt *Runtime) LoadWhole(m *Model) (*Span, error) {
	data, err := os.ReadFile(filepath.Join(m.Dir, WholeFile))
	if err != nil {
		return nil, err
	}
	return rt.loadBlocks(m.Manifest.Whole(BlockCID(data), int64(len(data))), 0, 1, [][]byte{data}, true) // the CID is the hash just taken
}

// LoadONNX loads a standalone ONNX model as a one-block span whose inputs
// and outputs are its graph's.
func (rt *Runtime) LoadONNX(data []byte) (*Span, error) {
	in, out, err := DescribeONNX(data)
	if err != nil {
		return nil, err
	}
	m := &Manifest{Format: ManifestFormat, Name: "onnx", Inputs: in, Outputs: out,
		Blocks: []BlockSpec{{CID: BlockCID(data).String(), Size: int64(len(data)), Inputs: in, Outputs: out}}}
	return rt.LoadBlocks(m, 0, 1, [][]byte{data})
}

// LoadBlocks loads blocks [start, end) of manifest m from their bytes
// (data[i] is block start+i). Each block is checked against its CID and its
// ONNX graph against the manifest's declared inputs and outputs.
func (rt *Runtime) LoadBlocks(m *Manifest, start, end int, data [][]byte) (*Span, error) {
	return rt.loadBlocks(m, start, end, data, false)
}

// loadBlocks is LoadBlocks; verified says the bytes were already checked
// against their CIDs (by the store they came from), so hashing them again
// is skipped.
func (rt *Runtime) loadBlocks(m *Manifest, start, end int, data [][]byte, verified bool) (_ *Span, err error) {
	if start < 0 || end > len(m.Blocks) || start >= end || len(data) != end-start {
		return nil, fmt.Errorf("span [%d,%d) of %d blocks with %d block files", start, end, len(m.Blocks), len(data))
	}
	s := &Span{manifest: m, start: start, end: end, inputs: m.SpanInputs(start), outputs: m.SpanOutputs(end), specByName: map[string]TensorSpec{}}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	parsed := make([]*scannedModel, 0, end-start)
	for i := start; i < end; i++ {
		p, err := checkBlock(m.Blocks[i], data[i-start], verified)
		if err != nil {
			return nil, fmt.Errorf("block %d (%s): %w", i, m.Blocks[i].CID, err)
		}
		parsed = append(parsed, p)
		for _, t := range m.Blocks[i].Inputs {
			s.specByName[t.Name] = t
		}
		for _, p := range m.Blocks[i].State {
			s.state = append(s.state, stateSlot{pair: p, spec: s.specByName[p.Input]})
		}
	}
	// Each group of contiguous blocks that fuses runs as one session, the
	// rest one session per block.
	type unit struct {
		first int // the group's first block
		spec  BlockSpec
		data  []byte
	}
	var units []unit
	for _, g := range fuseGroups(m.Blocks[start:end], rt.cfg.SessionPerBlock) {
		a, b := start+g[0], start+g[1]
		if b-a > 1 {
			spec := s.groupSpec(a, b)
			fused, ok, err := fuse(parsed[a-start:b-start], spec.Inputs, spec.Outputs)
			if err != nil {
				return nil, err
			}
			if ok {
				units = append(units, unit{a, spec, fused})
				continue
			}
			rt.log.Debug("blocks cannot be fused (clashing names, functions or sparse weights); one session per block", "blocks", fmt.Sprintf("%d-%d", a, b-1))
		}
		for i := a; i < b; i++ {
			units = append(units, unit{i, m.Blocks[i], data[i-start]})
		}
	}
	// Sessions run one after another: their thread pools would spin
	// against each other, so only a lone session may spin.
	opts, err := rt.sessionOptions(len(units) == 1)
	if err != nil {
		return nil, err
	}
	defer opts.Destroy()
	for _, u := range units {
		b, err := newLoadedBlock(u.spec, u.data, opts)
		if err != nil {
			return nil, fmt.Errorf("block %d (%s): %w", u.first, m.Blocks[u.first].CID, err)
		}
		b.first = u.first
		s.blocks = append(s.blocks, b)
	}
	return s, nil
}

// maxFusedBytes bounds the blocks fused into one graph: an ONNX file is a
// protobuf, which cannot exceed 2 GiB, and onnxruntime refuses bigger ones.
var maxFusedBytes int64 = 1536 << 20

// fuseGroups cuts blocks into runs of contiguous blocks to fuse, as
// [first, end) index pairs: as long as their files add up to at most
// maxFusedBytes (a bigger block stands alone). perBlock makes every block
// its own group.
func fuseGroups(blocks []BlockSpec, perBlock bool) [][2]int {
	var groups [][2]int
	var size int64
	for i, b := range blocks {
		if n := len(groups); n > 0 && !perBlock && size+b.Size <= maxFusedBytes {
			groups[n-1][1] = i + 1
			size += b.Size
			continue
		}
		groups = append(groups, [2]int{i, i + 1})
		size = b.Size
	}
	return groups
}

// groupSpec is the interface of blocks [a, b) of the span merged into one
// graph: what they read that comes from before a (span inputs first, in
// their order), what they produce that blocks after b read or the span
// returns (span outputs first; an input passed through is not a graph
// output), and their state.
func (s *Span) groupSpec(a, b int) BlockSpec {
	produced := map[string]TensorSpec{}
	var order []string // produced, in block order
	read := map[string]bool{}
	var readOrder []TensorSpec // read from before a, in block order
	stateIn := map[string]bool{}
	for _, blk := range s.manifest.Blocks[a:b] {
		for _, p := range blk.State {
			stateIn[p.Input] = true
		}
		for _, t := range blk.Inputs {
			if _, ok := produced[t.Name]; !ok && !stateIn[t.Name] && !read[t.Name] {
				read[t.Name] = true
				readOrder = append(readOrder, t)
			}
		}
		for _, t := range blk.Outputs {
			if _, ok := produced[t.Name]; !ok {
				order = append(order, t.Name)
			}
			produced[t.Name] = t
		}
	}
	later := map[string]bool{}
	for _, blk := range s.manifest.Blocks[b:s.end] {
		for _, t := range blk.Inputs {
			later[t.Name] = true
		}
	}
	var spec BlockSpec
	first := map[string]bool{}
	for _, t := range s.inputs {
		if read[t.Name] {
			spec.Inputs = append(spec.Inputs, t)
			first[t.Name] = true
		}
	}
	for _, t := range readOrder {
		if !first[t.Name] {
			spec.Inputs = append(spec.Inputs, t)
		}
	}
	clear(first)
	for _, t := range s.outputs {
		if _, ok := produced[t.Name]; ok {
			spec.Outputs = append(spec.Outputs, produced[t.Name])
			first[t.Name] = true
		}
	}
	stateOut := map[string]bool{}
	for _, st := range s.state {
		stateOut[st.pair.Output] = true
	}
	for _, name := range order {
		if later[name] && !first[name] && !stateOut[name] {
			spec.Outputs = append(spec.Outputs, produced[name])
		}
	}
	for _, st := range s.state {
		if stateIn[st.pair.Input] {
			spec.Inputs = append(spec.Inputs, st.spec)
			spec.Outputs = append(spec.Outputs, produced[st.pair.Output])
			spec.State = append(spec.State, st.pair)
		}
	}
	return spec
}

// checkBlock verifies a block's bytes against its CID, and its ONNX graph's
// inputs and outputs against those the manifest declares. It returns the
// parsed model.
func checkBlock(spec BlockSpec, data []byte, verified bool) (*scannedModel, error) {
	c, err := ParseCID(spec.CID)
	if err != nil {
		return nil, err
	}
	if !verified && !verify(c, data) {
		return nil, fmt.Errorf("%w (%d bytes)", ErrCorrupt, len(data))
	}
	m, err := scanONNX(data)
	if err != nil {
		return nil, err
	}
	in, out, err := m.describe()
	if err != nil {
		return nil, err
	}
	if err := sameNames("input", spec.Inputs, in); err != nil {
		return nil, err
	}
	if err := sameNames("output", spec.Outputs, out); err != nil {
		return nil, err
	}
	if len(in) == 0 {
		// onnxruntime_go cannot run a session without inputs, and a block
		// that computes constants has no reason to be a block.
		return nil, errors.New("block has no inputs")
	}
	return m, nil
}

func newLoadedBlock(spec BlockSpec, data []byte, opts *ort.SessionOptions) (*loadedBlock, error) {
	b := &loadedBlock{spec: spec}
	for i, t := range spec.Outputs {
		if t.DType == protocol.Float16 || t.DType == protocol.BFloat16 || len(t.Shape) == 0 {
			b.preallocated = append(b.preallocated, i)
		}
	}
	var err error
	b.session, err = ort.NewDynamicAdvancedSessionWithONNXData(data, names(spec.Inputs), names(spec.Outputs), opts)
	if err != nil {
		return nil, fmt.Errorf("onnxruntime refused the block: %w", err)
	}
	return b, nil
}

// sameNames checks that the manifest declares exactly the graph's tensors.
func sameNames(kind string, declared, graph []TensorSpec) error {
	have := map[string]protocol.DType{}
	for _, t := range graph {
		have[t.Name] = t.DType
	}
	for _, t := range declared {
		dt, ok := have[t.Name]
		if !ok {
			return fmt.Errorf("manifest declares %s %q, which the ONNX graph lacks", kind, t.Name)
		}
		if dt != t.DType {
			return fmt.Errorf("manifest declares %s %q as %v, the ONNX graph as %v", kind, t.Name, t.DType, dt)
		}
	}
	if len(declared) != len(graph) {
		return fmt.Errorf("manifest declares %d %ss, the ONNX graph has %d", len(declared), kind, len(graph))
	}
	return nil
}

func names(ts []TensorSpec) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Name
	}
	return out
}

// Start and End are the span's block range [Start, End).
func (s *Span) Start() int { return s.start }

// End is one past the span's last block.
func (s *Span) End() int { return s.end }

// Sessions is the number of onnxruntime sessions the span runs: 1 when its
// blocks were fused into one graph, more when they could not be (clashing
// names) or would make a graph over maxFusedBytes.
func (s *Span) Sessions() int { return len(s.blocks) }

// Inputs are the tensors a caller sends in.
func (s *Span) Inputs() []TensorSpec { return s.inputs }

// Outputs are the tensors the span returns.
func (s *Span) Outputs() []TensorSpec { return s.outputs }

// Run implements Runner.
func (s *Span) Run(inputs Tensors) (Tensors, error) {
	sess := s.NewSession()
	defer sess.Close()
	return sess.Step(inputs)
}

// NewSession implements Runner.
func (s *Span) NewSession() Session { return &spanSession{span: s} }

// Close releases the span's onnxruntime sessions. Sessions of the span must
// not be used afterwards.
func (s *Span) Close() error {
	var errs []error
	for _, b := range s.blocks {
		if b.session != nil {
			errs = append(errs, b.session.Destroy())
		}
	}
	s.blocks = nil
	return errors.Join(errs...)
}

type spanSession struct {
	span  *Span
	mu    sync.Mutex
	state map[string]ort.Value // state input name -> value to feed next step
	steps int
}

func (ss *spanSession) Steps() int {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.steps
}

func (ss *spanSession) Close() error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	destroyAll(ss.state)
	ss.state = nil
	return nil
}

func destroyAll(vals map[string]ort.Value) {
	for _, v := range vals {
		destroy(v)
	}
}

// destroy releases a value. onnxruntime_go can leave a typed nil pointer in
// an output slot when converting that output failed, so nil is checked
// through the interface.
func destroy(v ort.Value) {
	if v == nil {
		return
	}
	if rv := reflect.ValueOf(v); rv.Kind() == reflect.Pointer && rv.IsNil() {
		return
	}
	v.Destroy()
}

// Step implements Session: it runs every block of the span in order. Tensors
// stay onnxruntime values between blocks; only the span's inputs and outputs
// cross into protocol.Tensors.
func (ss *spanSession) Step(inputs Tensors) (Tensors, error) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	s := ss.span
	if s.blocks == nil {
		return nil, errors.New("span is closed")
	}
	// Check and bind the caller's inputs.
	dims := map[string]int64{}
	for _, spec := range s.inputs {
		t, ok := inputs[spec.Name]
		if !ok {
			return nil, fmt.Errorf("missing input %q", spec.Name)
		}
		if err := bindDims(spec, t, dims); err != nil {
			return nil, err
		}
	}
	live := map[string]ort.Value{} // every value this step created
	defer func() { destroyAll(live) }()
	for _, spec := range s.inputs {
		v, err := toValue(inputs[spec.Name])
		if err != nil {
			return nil, fmt.Errorf("input %q: %w", spec.Name, err)
		}
		live[spec.Name] = v
	}
	// State from the last step, or zeros on the first. The session keeps
	// owning its state until the step succeeds: a failed step leaves the
	// session as it was, so the step can be retried.
	for _, st := range s.state {
		if v, ok := ss.state[st.pair.Input]; ok {
			live[st.pair.Input] = v
			defer delete(live, st.pair.Input) // not this step's to destroy
			continue
		}
		v, err := toValue(zeros(st.spec, dims))
		if err != nil {
			return nil, fmt.Errorf("initial state %q: %w", st.pair.Input, err)
		}
		live[st.pair.Input] = v
	}
	for _, b := range s.blocks {
		if err := b.run(live, dims); err != nil {
			return nil, fmt.Errorf("block %d: %w", b.first, err)
		}
	}
	// Keep state outputs for the next step; hand back the span's outputs.
	next := map[string]ort.Value{}
	for _, st := range s.state {
		next[st.pair.Input] = live[st.pair.Output]
		delete(live, st.pair.Output)
	}
	out := Tensors{}
	for _, spec := range s.outputs {
		v, ok := live[spec.Name]
		if !ok {
			destroyAll(next)
			return nil, fmt.Errorf("output %q was not produced", spec.Name)
		}
		t, err := fromValue(v)
		if err != nil {
			destroyAll(next)
			return nil, fmt.Errorf("output %q: %w", spec.Name, err)
		}
		out[spec.Name] = t
	}
	destroyAll(ss.state)
	ss.state = next
	ss.steps++
	return out, nil
}

// run executes one block: inputs are looked up in live by name and outputs
// added to it.
func (b *loadedBlock) run(live map[string]ort.Value, dims map[string]int64) error {
	in := make([]ort.Value, len(b.spec.Inputs))
	for i, t := range b.spec.Inputs {
		v, ok := live[t.Name]
		if !ok {
			return fmt.Errorf("input %q is not available", t.Name)
		}
		in[i] = v
	}
	out := make([]ort.Value, len(b.spec.Outputs))
	for _, i := range b.preallocated {
		spec := b.spec.Outputs[i]
		for _, d := range spec.Shape {
			if _, ok := dims[d.Param]; d.Param != "" && !ok {
				return fmt.Errorf("%v output %q has unbound dimension %q: onnxruntime_go cannot return such outputs unless their shape is known", spec.DType, spec.Name, d.Param)
			}
		}
		v, err := toValue(zeros(spec, dims))
		if err != nil {
			return err
		}
		out[i] = v
	}
	if err := b.session.Run(in, out); err != nil {
		for _, v := range out {
			destroy(v)
		}
		return err
	}
	for i, t := range b.spec.Outputs {
		if old, ok := live[t.Name]; ok {
			destroy(old)
		}
		live[t.Name] = out[i]
	}
	return nil
}
