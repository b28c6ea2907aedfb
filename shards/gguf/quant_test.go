package gguf

import (
	"math"
	"math/rand/v2"
	"testing"
)

// relErr is ‖x − y‖ / ‖x‖.
func relErr(x, y []float32) float64 {
	var num, den float64
	for i := range x {
		d := float64(x[i]) - float64(y[i])
		num += d * d
		den += float64(x[i]) * float64(x[i])
	}
	return math.Sqrt(num / den)
}

// TestQuantizeRoundTrip writes random weights through the Writer's
// quantizers, reads them back and checks the relative error.
func TestQuantizeRoundTrip(t *testing.T) {
	tol := map[Type]float64{
		TypeF32: 0, TypeF16: 1e-3, TypeBF16: 5e-3,
		TypeQ8_0: 0.01, TypeQ4_0: 0.10, TypeQ4_K: 0.10, TypeQ5_K: 0.05, TypeQ6_K: 0.03,
	}
	rng := rand.New(rand.NewPCG(5, 6))
	const cols, rows = 512, 6
	x := make([]float32, cols*rows)
	for i := range x {
		x[i] = float32(rng.NormFloat64() * 0.02)
	}
	// Rows of other shapes: all zero, constant, positive only, an outlier.
	for i := range cols {
		x[i] = 0
		x[cols+i] = 0.5
		x[2*cols+i] = float32(rng.Float64())
	}
	x[3*cols+7] = 1
	var specs []tensorSpec
	for _, typ := range SupportedTypes {
		specs = append(specs, tensorSpec{name: typ.String(), typ: typ, dims: []int64{cols, rows}, rows: x})
	}
	f, _ := writeTestFile(t, nil, specs)
	for _, typ := range SupportedTypes {
		ti, _ := f.Tensor(typ.String())
		got, err := f.ReadTensor(ti)
		if err != nil {
			t.Fatal(err)
		}
		for i := range cols {
			if got[i] != 0 {
				t.Fatalf("%s: zero row element %d came back as %v", typ, i, got[i])
			}
		}
		// Row 3's outlier costs its block resolution: check only that the
		// outlier itself survives.
		if g := got[3*cols+7]; math.Abs(float64(g)-1) > 0.01 {
			t.Errorf("%s: outlier 1 came back as %v", typ, g)
		}
		for r := 1; r < rows; r++ {
			if r == 3 {
				continue
			}
			e := relErr(x[r*cols:(r+1)*cols], got[r*cols:(r+1)*cols])
			if e > tol[typ] {
				t.Errorf("%s row %d: relative error %.4f, want ≤ %.4f", typ, r, e, tol[typ])
			}
		}
		t.Logf("%s: relative error %.5f", typ, relErr(x[4*cols:], got[4*cols:]))
	}
}

// TestQuantizeQ8_0Q4_0Reference checks the two simple quantizers against
// quantize_row_q8_0_ref and quantize_row_q4_0_ref written out naively.
func TestQuantizeQ8_0Q4_0Reference(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	x := make([]float32, 32)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	q8, err := Quantize(TypeQ8_0, x)
	if err != nil {
		t.Fatal(err)
	}
	var amax float32
	for _, v := range x {
		amax = float32(math.Max(float64(amax), math.Abs(float64(v))))
	}
	d := amax / 127
	id := 1 / d
	if h := uint16(q8[0]) | uint16(q8[1])<<8; h != Float32ToF16(d) {
		t.Fatalf("Q8_0 d %#04x, want %#04x", h, Float32ToF16(d))
	}
	for j, v := range x {
		if want := int8(math.Round(float64(v * id))); int8(q8[2+j]) != want {
			t.Fatalf("Q8_0 q[%d] = %d, want %d", j, int8(q8[2+j]), want)
		}
	}
	q4, err := Quantize(TypeQ4_0, x)
	if err != nil {
		t.Fatal(err)
	}
	var mx float32
	amax = 0
	for _, v := range x {
		if float32(math.Abs(float64(v))) > amax {
			amax, mx = float32(math.Abs(float64(v))), v
		}
	}
	d = mx / -8
	id = 1 / d
	for j := range 16 {
		lo := min(15, int(int8(x[j]*id+8.5)))
		hi := min(15, int(int8(x[j+16]*id+8.5)))
		if q4[2+j] != byte(lo|hi<<4) {
			t.Fatalf("Q4_0 byte %d = %#02x, want %#02x", j, q4[2+j], lo|hi<<4)
		}
	}
}

func TestQuantizeErrors(t *testing.T) {
	if _, err := Quantize(TypeQ4_K, make([]float32, 100)); err == nil {
		t.Error("Q4_K of 100 values: no error")
	}
	if _, err := Quantize(TypeQ2_K, make([]float32, 256)); err == nil {
		t.Error("Q2_K: no error")
	}
	x := make([]float32, 32)
	x[3] = float32(math.Inf(1))
	if _, err := Quantize(TypeQ8_0, x); err == nil {
		t.Error("Q8_0 of +Inf: no error")
	}
}

func BenchmarkQuantize(b *testing.B) {
	rng := rand.New(rand.NewPCG(9, 10))
	x := make([]float32, 4096*16)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	for _, typ := range SupportedTypes {
		b.Run(typ.String(), func(b *testing.B) {
			b.SetBytes(int64(len(x)) * 4)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Quantize(typ, x); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
