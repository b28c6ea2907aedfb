package split

import (
	"github.com/infermesh/infermesh/shards/onnxpb"
)

// Element types are ONNX TensorProto.DataType codes; nonTensor marks a
// value that is a sequence, map or optional, which cannot cross a cut.
const (
	typeUnknown int32 = 0
	typeFloat   int32 = 1
	typeUint8   int32 = 2
	typeInt32   int32 = 6
	typeInt64   int32 = 7
	typeString  int32 = 8
	typeBool    int32 = 9
	nonTensor   int32 = -1
)

// viType returns the element type a ValueInfo declares (typeUnknown if it
// declares none, nonTensor for non-tensor types).
func viType(vi *onnxpb.ValueInfoProto) int32 {
	t := vi.GetType()
	if t == nil || t.GetValue() == nil {
		return typeUnknown
	}
	if tt := t.GetTensorType(); tt != nil {
		return tt.GetElemType()
	}
	return nonTensor
}

func attr(n *onnxpb.NodeProto, name string) *onnxpb.AttributeProto {
	for _, a := range n.GetAttribute() {
		if a.GetName() == name {
			return a
		}
	}
	return nil
}

// constType is the element type of a Constant node's value.
func constType(n *onnxpb.NodeProto) int32 {
	for _, a := range n.GetAttribute() {
		switch a.GetName() {
		case "value":
			return a.GetT().GetDataType()
		case "sparse_value":
			return a.GetSparseTensor().GetValues().GetDataType()
		case "value_float", "value_floats":
			return typeFloat
		case "value_int", "value_ints":
			return typeInt64
		case "value_string", "value_strings":
			return typeString
		}
	}
	return typeUnknown
}

// staticTypes predicts the element type of every top-level tensor from
// declarations and per-operator rules. It only has to be a good first guess:
// onnxruntime checks it when the typing model loads, and names the tensors
// where it is wrong (see fixType).
func (gr *graph) staticTypes() map[string]int32 {
	ty := map[string]int32{}
	for name, t := range gr.inits {
		ty[name] = t.GetDataType()
	}
	for name, s := range gr.sparse {
		ty[name] = s.GetValues().GetDataType()
	}
	for _, n := range gr.nodes {
		if isConstantNode(n) && len(n.GetOutput()) > 0 {
			ty[n.GetOutput()[0]] = constType(n)
		}
	}
	for name, vi := range gr.vinfo {
		if t := viType(vi); t != typeUnknown {
			ty[name] = t
		}
	}
	// Each node after the producers of its inputs, whatever the file's
	// order; done guards against cycles.
	done := make([]bool, len(gr.nodes))
	var infer func(i int)
	infer = func(i int) {
		if done[i] {
			return
		}
		done[i] = true
		n := gr.nodes[i]
		for _, name := range gr.uses[i] {
			if p, ok := gr.producer[name]; ok {
				infer(p)
			}
		}
		in := func(k int) int32 {
			if k < len(n.GetInput()) {
				return ty[n.GetInput()[k]]
			}
			return typeUnknown
		}
		for k, out := range n.GetOutput() {
			if out == "" {
				continue
			}
			if _, declared := ty[out]; declared {
				continue
			}
			ty[out] = outputType(n, k, in)
		}
	}
	for i := range gr.nodes {
		infer(i)
	}
	return ty
}

// outputType applies ONNX's type rules for output k of node n; in(j) is the
// type of input j.
func outputType(n *onnxpb.NodeProto, k int, in func(int) int32) int32 {
	first := typeUnknown
	for j := range n.GetInput() {
		if t := in(j); t != typeUnknown && t != nonTensor {
			first = t
			break
		}
	}
	dtypeAttr := func(name string, def int32) int32 {
		if a := attr(n, name); a != nil {
			return int32(a.GetI())
		}
		return def
	}
	subOut := func(g *onnxpb.GraphProto, j int) int32 {
		if j < len(g.GetOutput()) {
			return viType(g.GetOutput()[j])
		}
		return typeUnknown
	}
	if n.GetDomain() != "" && n.GetDomain() != "ai.onnx" {
		return first
	}
	switch n.GetOpType() {
	case "Cast":
		return dtypeAttr("to", typeUnknown)
	case "CastLike":
		return in(1)
	case "Shape", "Size", "NonZero", "ArgMax", "ArgMin", "NonMaxSuppression":
		return typeInt64
	case "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
		"IsNaN", "IsInf", "RegexFullMatch":
		return typeBool
	case "ConstantOfShape":
		if a := attr(n, "value"); a != nil && a.GetT() != nil {
			return a.GetT().GetDataType()
		}
		return typeFloat
	case "EyeLike", "RandomNormalLike", "RandomUniformLike", "Bernoulli":
		return dtypeAttr("dtype", first)
	case "RandomNormal", "RandomUniform":
		return dtypeAttr("dtype", typeFloat)
	case "Multinomial":
		return dtypeAttr("dtype", typeInt32)
	case "TopK", "MaxPool", "Unique":
		if k > 0 {
			return typeInt64
		}
	case "Dropout":
		if k > 0 {
			return typeBool
		}
	case "QuantizeLinear":
		if t := in(2); t != typeUnknown {
			return t
		}
		return dtypeAttr("output_dtype", typeUint8)
	case "DequantizeLinear":
		return in(1)
	case "DynamicQuantizeLinear":
		if k == 1 {
			return typeFloat
		}
		return typeUint8
	case "MatMulInteger", "ConvInteger":
		return typeInt32
	case "QLinearMatMul", "QLinearConv":
		return in(7)
	case "Where":
		return in(1)
	case "OneHot":
		return in(2)
	case "LayerNormalization":
		if k > 0 {
			return dtypeAttr("stash_type", typeFloat)
		}
	case "StringNormalizer", "StringConcat":
		return typeString
	case "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence",
		"Optional", "OptionalGetElement":
		return nonTensor
	case "If":
		if a := attr(n, "then_branch"); a != nil {
			return subOut(a.GetG(), k)
		}
	case "Loop":
		if a := attr(n, "body"); a != nil {
			return subOut(a.GetG(), k+1) // the body's first output is the condition
		}
	case "Scan":
		if a := attr(n, "body"); a != nil {
			return subOut(a.GetG(), k)
		}
	}
	return first
}
