package shards

import (
	"math/rand/v2"
	"strings"

	"github.com/infermesh/infermesh/protocol"
)

// RandomInputs makes seeded inputs for a manifest: floats in [-1, 1), ints in
// [0, 8) (valid token IDs and positions), masks of ones. Symbolic first
// dimensions are batch, the others dimSize.
func RandomInputs(m *Manifest, seed uint64, batch, dimSize int64) Tensors {
	rng := rand.New(rand.NewPCG(seed, 0))
	dims := map[string]int64{}
	in := Tensors{}
	for _, spec := range m.Inputs {
		shape := make([]int64, len(spec.Shape))
		for i, d := range spec.Shape {
			switch {
			case d.Param == "":
				shape[i] = d.Size
			case dims[d.Param] != 0:
				shape[i] = dims[d.Param]
			case i == 0:
				shape[i], dims[d.Param] = batch, batch
			default:
				shape[i], dims[d.Param] = dimSize, dimSize
			}
		}
		n := int(protocol.NumElements(shape))
		switch spec.DType {
		case protocol.Float32:
			v := make([]float32, n)
			for i := range v {
				v[i] = rng.Float32()*2 - 1
			}
			in[spec.Name] = protocol.NewTensor(shape, v)
		case protocol.Int64:
			v := make([]int64, n)
			for i := range v {
				if strings.Contains(spec.Name, "mask") {
					v[i] = 1
				} else {
					v[i] = rng.Int64N(8)
				}
			}
			in[spec.Name] = protocol.NewTensor(shape, v)
		default:
			in[spec.Name] = &protocol.Tensor{DType: spec.DType, Shape: shape, Data: make([]byte, n*spec.DType.Size())}
		}
	}
	return in
}
