package shards

import "strings"

// Bytes a loaded block takes in memory per byte of its file, by how its
// weights are stored, as measured with onnxruntime 1.24 on CPU (the RSS a
// span of decoder blocks adds when loaded, hidden 1024; BENCHMARKS.md,
// "Quantized weights"), rounded up a little:
//   - float32: 1.82x (onnxruntime keeps each matrix and its pre-packed
//     copy);
//   - float16: 2.78x (the graph's Casts are folded into float32
//     constants at load, beside the float16 originals);
//   - q8: 2.07x, q4: 2.32x (MatMulNBits pre-packs its weights).
const (
	residentFloat32 = 1.9
	residentFloat16 = 2.9
	residentQ8      = 2.2
	residentQ4      = 2.4
)

// ResidentBytes estimates the memory blocks [start, end) take once loaded:
// their file sizes times what blocks stored as this model's are (its
// ModelInfo's dtype and quantization; float32 when it says nothing) take in
// memory per byte of file. Placement budgets with it, and nodes advertise
// it for what they serve.
func (m *Manifest) ResidentBytes(start, end int) int64 {
	start, end = max(start, 0), min(end, len(m.Blocks))
	var file int64
	for _, b := range m.Blocks[start:max(start, end)] {
		file += b.Size
	}
	return int64(float64(file) * m.residentFactor())
}

func (m *Manifest) residentFactor() float64 {
	if m.Info == nil {
		return residentFloat32
	}
	switch {
	case strings.HasPrefix(m.Info.Quantization, "q4"):
		return residentQ4
	case strings.HasPrefix(m.Info.Quantization, "q8"):
		return residentQ8
	case m.Info.DType == "float16" || m.Info.DType == "bfloat16":
		return residentFloat16
	}
	return residentFloat32
}
