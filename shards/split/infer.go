package split

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"regexp"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// tensorInfo is what the sample runs tell of a tensor.
type tensorInfo struct {
	dtype  protocol.DType
	shapes [][]int64 // per run: at the sample sizes first, then each probe
	bytes  int64     // at the sample sizes
}

// The typing model returns each tensor t as two outputs: its shape
// (t+shapeSuffix, from a Shape node) and its values flattened
// (t+flatSuffix, from a Reshape to [-1]; float16 ones through a Cast to
// float32). Only their shapes and types are read: a tensor's own output
// would not do, as onnxruntime_go cannot return a scalar, nor a float16
// tensor, that onnxruntime allocates. The flat copy makes onnxruntime
// check the element type guessed for t (float16 guesses excepted).
const (
	shapeSuffix = "::infermesh_shape"
	flatSuffix  = "::infermesh_flat"
	minusOne    = "::infermesh_minus_one"
)

// shapeOut reads tensor name's shape from the typing model's outputs.
func shapeOut(out shards.Tensors, name string) ([]int64, bool) {
	t, ok := out[name+shapeSuffix]
	if !ok {
		return nil, false
	}
	dims, err := protocol.View[int64](t)
	if err != nil {
		return nil, false
	}
	return append([]int64{}, dims...), true
}

// maxTypeFixes bounds how many wrong type guesses onnxruntime may correct.
const maxTypeFixes = 64

// sampleSizes chooses the sizes of every symbolic input dimension: run A's
// and, varied, run B's. Dimensions first seen at axis 0 are batch-like
// (1, then 2); others 64, 96, 128... then 32 more. Sizes bound by sample
// inputs given in Options are never varied.
func (s *splitter) sampleSizes() (a, b map[string]int64, batchLike map[string]bool, err error) {
	a, b, batchLike = map[string]int64{}, map[string]int64{}, map[string]bool{}
	fixed := map[string]bool{}
	for _, vi := range s.gr.inputs {
		spec := s.inSpecs[vi.GetName()]
		t, ok := s.opts.Inputs[spec.Name]
		if !ok {
			continue
		}
		if t.DType != spec.DType || len(t.Shape) != len(spec.Shape) {
			return nil, nil, nil, fmt.Errorf("%w: sample input %q is %v, the model wants %v%v", ErrOptions, spec.Name, t, spec.DType, spec.Shape)
		}
		for i, d := range spec.Shape {
			switch {
			case d.Param == "" && d.Size != t.Shape[i]:
				return nil, nil, nil, fmt.Errorf("%w: sample input %q is %v, the model wants %v", ErrOptions, spec.Name, t, spec.Shape)
			case d.Param != "":
				if prev, ok := a[d.Param]; ok && prev != t.Shape[i] {
					return nil, nil, nil, fmt.Errorf("%w: sample inputs give dimension %q sizes %d and %d", ErrOptions, d.Param, prev, t.Shape[i])
				}
				a[d.Param], b[d.Param], fixed[d.Param] = t.Shape[i], t.Shape[i], true
			}
		}
	}
	next := int64(64)
	for _, vi := range s.gr.inputs {
		for axis, d := range s.inSpecs[vi.GetName()].Shape {
			if d.Param == "" || fixed[d.Param] {
				continue
			}
			if _, seen := a[d.Param]; seen {
				continue
			}
			batchLike[d.Param] = axis == 0
			size, given := s.opts.DimSizes[d.Param]
			switch {
			case given && size < 0:
				return nil, nil, nil, fmt.Errorf("%w: DimSizes[%q] = %d", ErrOptions, d.Param, size)
			case given:
			case axis == 0:
				size = 1
			default:
				size, next = next, next+32
			}
			a[d.Param] = size
			if axis == 0 {
				b[d.Param] = size + 1
			} else {
				b[d.Param] = size + 32
			}
		}
	}
	return a, b, batchLike, nil
}

// sampleInputs makes the sample inputs, state included, at the given sizes:
// the ones Options gives, others random (floats in [-1,1), integers in
// [0,4), booleans) from the seed.
func (s *splitter) sampleInputs(sizes map[string]int64, seed uint64) (shards.Tensors, error) {
	rng := rand.New(rand.NewPCG(uint64(s.opts.Seed), seed))
	out := shards.Tensors{}
	for _, vi := range s.gr.inputs {
		spec := s.inSpecs[vi.GetName()]
		if t, ok := s.opts.Inputs[spec.Name]; ok {
			out[spec.Name] = t
			continue
		}
		shape := make([]int64, len(spec.Shape))
		for i, d := range spec.Shape {
			shape[i] = d.Size
			if d.Param != "" {
				shape[i] = sizes[d.Param]
			}
		}
		t, err := randomTensor(rng, spec.DType, shape)
		if err != nil {
			return nil, fmt.Errorf("sample input %q: %w", spec.Name, err)
		}
		out[spec.Name] = t
	}
	return out, nil
}

func randomTensor(rng *rand.Rand, dt protocol.DType, shape []int64) (*protocol.Tensor, error) {
	n := protocol.NumElements(shape)
	if n*int64(max(dt.Size(), 1)) > protocol.MaxTensorBytes {
		return nil, fmt.Errorf("shape %v too large", shape)
	}
	t := &protocol.Tensor{DType: dt, Shape: shape}
	switch dt {
	case protocol.Float32:
		v := make([]float32, n)
		for i := range v {
			v[i] = rng.Float32()*2 - 1
		}
		return protocol.NewTensor(shape, v), nil
	case protocol.Float64:
		v := make([]float64, n)
		for i := range v {
			v[i] = rng.Float64()*2 - 1
		}
		return protocol.NewTensor(shape, v), nil
	case protocol.Float16, protocol.BFloat16:
		t.Data = make([]byte, 2*n)
		for i := range n {
			h := float32ToHalf(rng.Float32()*2-1, dt)
			t.Data[2*i], t.Data[2*i+1] = byte(h), byte(h>>8)
		}
		return t, nil
	case protocol.Bool:
		t.Data = make([]byte, n)
		for i := range t.Data {
			t.Data[i] = byte(rng.IntN(2))
		}
		return t, nil
	}
	if !dt.Valid() {
		return nil, fmt.Errorf("unsupported element type %v", dt)
	}
	// Integers: small non-negative values, little-endian.
	size := dt.Size()
	t.Data = make([]byte, int(n)*size)
	for i := range int(n) {
		t.Data[i*size] = byte(rng.IntN(4))
	}
	return t, nil
}

// float32ToHalf rounds toward zero to float16 or bfloat16 bits; enough for
// sample values in [-1, 1).
func float32ToHalf(f float32, dt protocol.DType) uint16 {
	bits := math.Float32bits(f)
	if dt == protocol.BFloat16 {
		return uint16(bits >> 16)
	}
	sign := uint16(bits>>16) & 0x8000
	exp := int32(bits>>23&0xff) - 127 + 15
	if exp <= 0 {
		return sign
	}
	if exp >= 0x1f {
		return sign | 0x7c00
	}
	return sign | uint16(exp)<<10 | uint16(bits>>13&0x3ff)
}

// maxProbes bounds the runs with changed dimensions when changing them all
// at once fails.
const maxProbes = 16

// measure runs the model on sample inputs with every intermediate tensor as
// an extra output, then again with symbolic dimensions changed (probes),
// and resolves each tensor's spec. The first probe changes every dimension;
// if the model refuses that (dimensions tied to each other, such as
// total = past + seq), each batch-like dimension, each other dimension and
// each pair of them is changed alone.
func (s *splitter) measure() error {
	gr := s.gr
	s.types = gr.staticTypes()
	sizesA, sizesB, batchLike, err := s.sampleSizes()
	if err != nil {
		return err
	}
	s.sizesA = sizesA
	if s.samples, err = s.sampleInputs(sizesA, 1); err != nil {
		return err
	}
	// The tensors to measure: every output of a node in order.
	var want []string
	for _, name := range gr.outputs {
		if !gr.inputSet[name] {
			want = append(want, name)
		}
	}
	for _, i := range gr.order {
		for _, o := range gr.nodes[i].GetOutput() {
			if o != "" && !gr.outSet[o] {
				want = append(want, o)
			}
		}
	}
	span, err := s.loadTyping(want)
	if err != nil {
		return err
	}
	defer span.Close()
	outA, err := span.Run(s.samples)
	if err != nil {
		return fmt.Errorf("running the model on sample inputs %s (set Options.DimSizes or Options.Inputs to sizes it accepts): %w", describe(s.samples), err)
	}
	runs := []probe{{sizes: sizesA, out: outA}}
	var varied, batch, other []string
	for name := range sizesA {
		if sizesB[name] != sizesA[name] {
			varied = append(varied, name)
			if batchLike[name] {
				batch = append(batch, name)
			} else {
				other = append(other, name)
			}
		}
	}
	sort.Strings(varied)
	sort.Strings(batch)
	sort.Strings(other)
	try := func(names []string) bool {
		sizes := maps.Clone(sizesA)
		for _, name := range names {
			sizes[name] = sizesB[name]
		}
		in, err := s.sampleInputs(sizes, uint64(len(runs)+1))
		if err != nil {
			return false
		}
		out, err := span.Run(in)
		if err != nil {
			return false
		}
		runs = append(runs, probe{sizes: sizes, out: out})
		return true
	}
	if len(varied) > 0 && !try(varied) {
		var groups [][]string
		if len(batch) > 0 {
			groups = append(groups, batch)
		}
		for _, name := range other {
			groups = append(groups, []string{name})
		}
		for i := range other {
			for j := i + 1; j < len(other); j++ {
				groups = append(groups, []string{other[i], other[j]})
			}
		}
		for _, g := range groups[:min(len(groups), maxProbes)] {
			try(g)
		}
		changed := map[string]bool{}
		for _, r := range runs[1:] {
			for name, size := range r.sizes {
				changed[name] = changed[name] || size != sizesA[name]
			}
		}
		var never []string
		for _, name := range varied {
			if !changed[name] {
				never = append(never, name)
			}
		}
		if len(never) > 0 {
			s.notes = append(s.notes, fmt.Sprintf("the model failed to run with %s changed: dimensions of cut tensors that follow them are fixed at the sample sizes", strings.Join(never, ", ")))
		}
	}
	s.infos = map[string]*tensorInfo{}
	for _, name := range want {
		shapeA, ok := shapeOut(outA, name)
		if !ok {
			continue // not a tensor onnxruntime could return
		}
		info := &tensorInfo{dtype: protocol.DType(s.types[name])}
		info.bytes = protocol.NumElements(shapeA) * int64(info.dtype.Size())
		for _, r := range runs {
			shape, _ := shapeOut(r.out, name)
			info.shapes = append(info.shapes, shape)
		}
		s.infos[name] = info
	}
	for _, vi := range gr.inputs {
		t := s.samples[vi.GetName()]
		s.infos[vi.GetName()] = &tensorInfo{dtype: t.DType, shapes: [][]int64{t.Shape}, bytes: int64(len(t.Data))}
	}
	s.resolveSpecs(runs)
	return nil
}

// probe is one run of the typing model: the dimension sizes of its inputs
// and its outputs.
type probe struct {
	sizes map[string]int64
	out   shards.Tensors
}

func describe(ts shards.Tensors) string {
	s := "{"
	first := true
	for name, t := range ts {
		if !first {
			s += " "
		}
		first = false
		s += fmt.Sprintf("%s:%v", name, t)
	}
	return s + "}"
}

// typeMismatch matches onnxruntime's complaint about a graph output declared
// with the wrong type, capturing the tensor and the type it has.
var typeMismatch = regexp.MustCompile(`of output arg \((.+?)\) of node \(.*?\) does not match expected type \(([a-z]+)\(([a-z0-9]+)`)

var ortTypes = map[string]protocol.DType{
	"float": protocol.Float32, "double": protocol.Float64, "float16": protocol.Float16, "bfloat16": protocol.BFloat16,
	"int8": protocol.Int8, "int16": protocol.Int16, "int32": protocol.Int32, "int64": protocol.Int64,
	"uint8": protocol.Uint8, "uint16": protocol.Uint16, "uint32": protocol.Uint32, "uint64": protocol.Uint64,
	"bool": protocol.Bool, "string": protocol.DType(typeString),
}

// loadTyping loads the model with the wanted tensors as outputs, declared
// with the element types guessed statically. When onnxruntime names a wrong
// guess, the guess is corrected and the model loaded again.
func (s *splitter) loadTyping(want []string) (*shards.Span, error) {
	for range maxTypeFixes {
		data, err := s.typingModel(want)
		if err != nil {
			return nil, err
		}
		span, err := s.rt.LoadONNX(data)
		if err == nil {
			return span, nil
		}
		if errors.Is(err, shards.ErrNoRuntime) {
			return nil, err
		}
		m := typeMismatch.FindStringSubmatch(err.Error())
		if m == nil {
			return nil, fmt.Errorf("onnxruntime cannot load the model: %w", err)
		}
		name := strings.TrimSuffix(m[1], flatSuffix)
		if _, known := s.types[name]; !known {
			return nil, fmt.Errorf("onnxruntime cannot load the model: %w", err)
		}
		switch dt, ok := ortTypes[m[3]]; {
		case m[2] != "tensor":
			s.types[name] = nonTensor
		case ok && s.types[name] != int32(dt):
			s.types[name] = int32(dt)
		default:
			return nil, fmt.Errorf("onnxruntime cannot load the model: %w", err)
		}
	}
	return nil, fmt.Errorf("onnxruntime rejected %d guesses of tensor types; giving up", maxTypeFixes)
}

// typingModel is the source model whose outputs are, for each wanted
// tensor, its shape and its values flattened (see shapeSuffix), typed but
// 1-D. Tensors that cannot be returned (strings, sequences) are
// left out.
func (s *splitter) typingModel(want []string) ([]byte, error) {
	m := proto.Clone(s.gr.model).(*onnxpb.ModelProto)
	g := m.GetGraph()
	g.Output = nil
	g.Initializer = append(g.Initializer, &onnxpb.TensorProto{Name: proto.String(minusOne), Dims: []int64{1},
		DataType: proto.Int32(typeInt64), Int64Data: []int64{-1}})
	if m.GetIrVersion() < 4 { // initializers must be listed among the inputs
		g.Input = append(g.Input, valueInfo(shards.TensorSpec{Name: minusOne, DType: protocol.Int64, Shape: []shards.Dim{{Size: 1}}}))
	}
	node := func(op, in, out string, attrs ...*onnxpb.AttributeProto) {
		ins := []string{in}
		if op == "Reshape" {
			ins = append(ins, minusOne)
		}
		g.Node = append(g.Node, &onnxpb.NodeProto{OpType: proto.String(op), Name: proto.String(out), Input: ins, Output: []string{out}, Attribute: attrs})
	}
	// Both outputs of a tensor are 1-D of unknown length.
	output := func(name string, elem int32) {
		shape := &onnxpb.TensorShapeProto{Dim: []*onnxpb.TensorShapeProto_Dimension{{}}}
		g.Output = append(g.Output, &onnxpb.ValueInfoProto{Name: proto.String(name),
			Type: &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{ElemType: &elem, Shape: shape}}}})
	}
	for _, name := range want {
		t := s.types[name]
		if t == nonTensor || t == typeString {
			continue
		}
		node("Shape", name, name+shapeSuffix)
		output(name+shapeSuffix, typeInt64)
		flat := name + flatSuffix
		switch {
		case t == int32(protocol.Float16) || t == int32(protocol.BFloat16):
			node("Reshape", name, flat+"_half")
			node("Cast", flat+"_half", flat, &onnxpb.AttributeProto{Name: proto.String("to"), Type: onnxpb.AttributeProto_INT.Enum(), I: proto.Int64(int64(typeFloat))})
			t = typeFloat
		case t == typeUnknown || !protocol.DType(t).Valid():
			node("Reshape", name, flat)
			t = typeFloat // a guess onnxruntime corrects
		default:
			node("Reshape", name, flat)
		}
		output(flat, t)
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(m)
}

// resolveSpecs sets each measured tensor's spec. A dimension the model
// declares keeps its size or name. Otherwise it is fixed when every run
// agrees on its size, and symbolic when not: named after the input dimension
// whose sizes across the runs are the same, else "<tensor>_<axis>", a name
// later tensors whose sizes vary the same way share.
func (s *splitter) resolveSpecs(runs []probe) {
	s.specs = map[string]shards.TensorSpec{}
	signature := func(sizes []int64) string { return fmt.Sprint(sizes) }
	names := map[string]string{}
	for _, vi := range s.gr.inputs {
		spec := s.inSpecs[vi.GetName()]
		s.specs[spec.Name] = spec
		for _, d := range spec.Shape {
			if d.Param == "" {
				continue
			}
			var sizes []int64
			for _, r := range runs {
				sizes = append(sizes, r.sizes[d.Param])
			}
			if sig := signature(sizes); names[sig] == "" {
				names[sig] = d.Param
			}
		}
	}
	var order []string
	order = append(order, s.gr.outputs...)
	for _, i := range s.gr.order {
		order = append(order, s.gr.nodes[i].GetOutput()...)
	}
	for _, name := range order {
		info := s.infos[name]
		if info == nil || s.gr.inputSet[name] {
			continue
		}
		if _, done := s.specs[name]; done {
			continue
		}
		shapeA := info.shapes[0]
		var declared []*onnxpb.TensorShapeProto_Dimension
		if vi := s.gr.vinfo[name]; vi != nil && vi.GetType().GetTensorType().GetShape() != nil {
			declared = vi.GetType().GetTensorType().GetShape().GetDim()
			if len(declared) != len(shapeA) {
				s.notes = append(s.notes, fmt.Sprintf("%q is declared with rank %d but has shape %v", name, len(declared), shapeA))
				declared = nil
			}
		}
		if vi := s.gr.vinfo[name]; vi != nil {
			if t := viType(vi); t > 0 && protocol.DType(t) != info.dtype {
				s.notes = append(s.notes, fmt.Sprintf("%q is declared %v but computes as %v", name, protocol.DType(t), info.dtype))
			}
		}
		spec := shards.TensorSpec{Name: name, DType: info.dtype, Shape: make([]shards.Dim, len(shapeA))}
		for i, a := range shapeA {
			if declared != nil && declared[i].GetDimValue() > 0 {
				spec.Shape[i] = shards.Dim{Size: declared[i].GetDimValue()}
				continue
			}
			if declared != nil && declared[i].GetDimParam() != "" {
				spec.Shape[i] = shards.Dim{Param: declared[i].GetDimParam()}
				continue
			}
			sizes, same, rankChanged := []int64{}, true, false
			for _, shape := range info.shapes {
				if len(shape) != len(shapeA) {
					rankChanged = true
					break
				}
				sizes = append(sizes, shape[i])
				same = same && shape[i] == a
			}
			switch {
			case rankChanged:
				spec.Shape[i] = shards.Dim{Param: "?"}
			case same:
				spec.Shape[i] = shards.Dim{Size: a}
			default:
				sig := signature(sizes)
				if names[sig] == "" {
					names[sig] = fmt.Sprintf("%s_%d", name, i)
				}
				spec.Shape[i] = shards.Dim{Param: names[sig]}
			}
		}
		s.specs[name] = spec
	}
}
