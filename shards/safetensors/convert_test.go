package safetensors

import (
	"math"
	"testing"
)

// f16Value is an independent decoding of a half-precision value.
func f16Value(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>10) & 0x1f
	man := float64(h & 0x3ff)
	switch exp {
	case 0x1f:
		if man != 0 {
			return math.NaN()
		}
		return sign * math.Inf(1)
	case 0:
		return sign * math.Ldexp(man, -24)
	}
	return sign * math.Ldexp(1024+man, exp-25)
}

func TestF16Exhaustive(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := F16ToFloat32(h)
		want := f16Value(h)
		if math.IsNaN(want) {
			if !math.IsNaN(float64(f)) {
				t.Fatalf("F16ToFloat32(%#04x) = %v, want NaN", h, f)
			}
			back, of := Float32ToF16(f)
			if back&0x7c00 != 0x7c00 || back&0x3ff == 0 || of {
				t.Fatalf("Float32ToF16(NaN from %#04x) = %#04x, %v", h, back, of)
			}
			continue
		}
		if float64(f) != want || math.Signbit(float64(f)) != math.Signbit(want) {
			t.Fatalf("F16ToFloat32(%#04x) = %v, want %v", h, f, want)
		}
		if back, of := Float32ToF16(f); back != h || of {
			t.Fatalf("Float32ToF16(%v) = %#04x, %v; want %#04x", f, back, of, h)
		}
	}
}

// TestF16Rounding checks ties go to even and values just past a midpoint
// round away, between every pair of adjacent positive finite halves.
func TestF16Rounding(t *testing.T) {
	for h := uint16(0); h < 0x7bff; h++ {
		lo, hi := f16Value(h), f16Value(h+1)
		mid := float32((lo + hi) / 2) // exact in float32
		even := h
		if h&1 == 1 {
			even = h + 1
		}
		if got, _ := Float32ToF16(mid); got != even {
			t.Fatalf("midpoint of %#04x and %#04x: got %#04x, want %#04x", h, h+1, got, even)
		}
		if got, _ := Float32ToF16(-mid); got != even|0x8000 {
			t.Fatalf("negative midpoint of %#04x: got %#04x", h, got)
		}
		up := math.Nextafter32(mid, float32(math.Inf(1)))
		if got, _ := Float32ToF16(up); got != h+1 {
			t.Fatalf("just above the midpoint of %#04x: got %#04x", h, got)
		}
		down := math.Nextafter32(mid, 0)
		if got, _ := Float32ToF16(down); got != h {
			t.Fatalf("just below the midpoint of %#04x: got %#04x", h, got)
		}
	}
}

func TestF16Overflow(t *testing.T) {
	for _, c := range []struct {
		f        float32
		h        uint16
		overflow bool
	}{
		{65504, 0x7bff, false},
		{65519.996, 0x7bff, false},
		{65520, 0x7c00, true},
		{-1e6, 0xfc00, true},
		{float32(math.MaxFloat32), 0x7c00, true},
		{float32(math.Inf(1)), 0x7c00, false},
		{float32(math.Inf(-1)), 0xfc00, false},
		{1e-8, 0, false},                        // below half the smallest subnormal (2^-25 ≈ 2.98e-8)
		{float32(math.Ldexp(1, -25)), 0, false}, // exactly half: ties to even, 0
		{float32(math.Ldexp(1.5, -25)), 1, false},
		{float32(math.Ldexp(1, -14)), 0x0400, false}, // smallest normal
		{float32(math.SmallestNonzeroFloat32), 0, false},
		{float32(math.Copysign(0, -1)), 0x8000, false},
	} {
		h, of := Float32ToF16(c.f)
		if h != c.h || of != c.overflow {
			t.Errorf("Float32ToF16(%g) = %#04x, %v; want %#04x, %v", c.f, h, of, c.h, c.overflow)
		}
	}
}

func TestBF16(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		b := uint16(i)
		f := BF16ToFloat32(b)
		if math.Float32bits(f) != uint32(b)<<16 {
			t.Fatalf("BF16ToFloat32(%#04x) bits %#08x", b, math.Float32bits(f))
		}
		back := Float32ToBF16(f)
		if f != f { // NaN: stays a NaN of the same sign
			if back&0x7f80 != 0x7f80 || back&0x7f == 0 || back&0x8000 != b&0x8000 {
				t.Fatalf("Float32ToBF16(NaN %#04x) = %#04x", b, back)
			}
			continue
		}
		if back != b {
			t.Fatalf("Float32ToBF16(BF16ToFloat32(%#04x)) = %#04x", b, back)
		}
	}
	// Ties to even, and just past a tie, at every bfloat16 below Inf.
	for b := uint16(0); b < 0x7f7f; b++ {
		mid := math.Float32bits(BF16ToFloat32(b)) + 0x8000
		even := b + b&1
		if got := Float32ToBF16(math.Float32frombits(mid)); got != even {
			t.Fatalf("midpoint above %#04x: got %#04x, want %#04x", b, got, even)
		}
		if got := Float32ToBF16(math.Float32frombits(mid + 1)); got != b+1 {
			t.Fatalf("just above the midpoint above %#04x: got %#04x", b, got)
		}
		if got := Float32ToBF16(math.Float32frombits(mid - 1)); got != b {
			t.Fatalf("just below the midpoint above %#04x: got %#04x", b, got)
		}
	}
	if got := Float32ToBF16(float32(math.MaxFloat32)); got != 0x7f80 {
		t.Errorf("MaxFloat32 -> %#04x, want +Inf", got)
	}
}
