package build

import "math"

// Building blocks shared by the model definitions. Each adds nodes and
// weights to g under the current scope and returns its output tensor's name.

// layerNorm normalises x over its last axis (LayerNormalization, opset 17)
// with a learned scale near 1 and bias near 0.
func (g *graph) layerNorm(name, x string, dim int) string {
	scale := g.weight(name+".scale", []int64{int64(dim)}, around(1, 0.1))
	bias := g.weight(name+".bias", []int64{int64(dim)}, centered(0.1))
	return g.Op("LayerNormalization", in(x, scale, bias), attrInt("axis", -1), attrFloat("epsilon", 1e-5))
}

// linear is x·W + b with W of shape [in, out] drawn with variance gain²/in, so
// that unit-variance inputs give outputs of variance gain² — activations
// keep their scale however many layers are stacked.
func (g *graph) linear(name, x string, inDim, outDim int, gain float64) string {
	w := g.weight(name+".weight", []int64{int64(inDim), int64(outDim)}, centered(gain/math.Sqrt(float64(inDim))))
	b := g.weight(name+".bias", []int64{int64(outDim)}, centered(0.02))
	return g.Op("Add", in(g.Op("MatMul", in(x, w)), b))
}

// gelu is GELU's tanh approximation built from primitive ops (Gelu itself
// is opset 20): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
func (g *graph) gelu(x string) string {
	cube := g.Op("Mul", in(g.Op("Mul", in(x, x)), x))
	inner := g.Op("Add", in(x, g.Op("Mul", in(cube, g.ScalarFloat("0.044715", 0.044715)))))
	t := g.Op("Tanh", in(g.Op("Mul", in(inner, g.ScalarFloat("sqrt(2/pi)", float32(math.Sqrt(2/math.Pi)))))))
	half := g.Op("Mul", in(x, g.ScalarFloat("0.5", 0.5)))
	return g.Op("Mul", in(half, g.Op("Add", in(t, g.ScalarFloat("1", 1)))))
}
