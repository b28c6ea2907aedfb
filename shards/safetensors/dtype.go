package safetensors

import "math"

// elemSize gives the bytes per element of each dtype the format names.
var elemSize = map[string]int64{
	"F64": 8, "F32": 4, "F16": 2, "BF16": 2,
	"F8_E4M3": 1, "F8_E5M2": 1,
	"I64": 8, "I32": 4, "I16": 2, "I8": 1,
	"U64": 8, "U32": 4, "U16": 2, "U8": 1,
	"BOOL": 1,
}

// ElemSize reports the bytes per element of dtype, and whether dtype is known.
func ElemSize(dtype string) (int64, bool) {
	n, ok := elemSize[dtype]
	return n, ok
}

// BF16ToFloat32 converts a bfloat16 (the top half of a float32) exactly.
func BF16ToFloat32(b uint16) float32 {
	return math.Float32frombits(uint32(b) << 16)
}

// Float32ToBF16 rounds f to the nearest bfloat16, ties to even. NaN stays a
// (quiet) NaN of the same sign; values beyond bfloat16's range become ±Inf.
func Float32ToBF16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 { // NaN
		return uint16(u>>16) | 0x0040
	}
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// F16ToFloat32 converts an IEEE 754 half-precision value exactly.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f: // Inf or NaN
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp == 0 && man == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal: man × 2^-24, normalised for float32
		e := uint32(127 - 15 + 1)
		for man&0x400 == 0 {
			man <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (man&0x3ff)<<13)
	default:
		return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
	}
}

// Float32ToF16 rounds f to the nearest half-precision value, ties to even.
// overflow reports a finite f too large for float16 (it becomes ±Inf); an
// infinite f gives ±Inf without overflow, NaN a quiet NaN. Values below the
// smallest subnormal round to ±0.
func Float32ToF16(f float32) (h uint16, overflow bool) {
	u := math.Float32bits(f)
	sign := uint16(u>>16) & 0x8000
	exp := int32(u>>23) & 0xff
	man := u & 0x7fffff
	if exp == 0xff {
		if man != 0 {
			return sign | 0x7e00 | uint16(man>>13), false
		}
		return sign | 0x7c00, false
	}
	e := exp - 127 + 15 // biased float16 exponent
	if e >= 0x1f {
		return sign | 0x7c00, true
	}
	if e <= 0 {
		// Subnormal (or zero) in float16: the value is m × 2^(e-1-10-13)
		// with m the 24-bit significand; shift it to units of 2^-24.
		if e < -10 {
			return sign, false // below half the smallest subnormal
		}
		m := man | 0x800000
		shift := uint32(14 - e)
		half := uint32(1) << (shift - 1)
		rest := m & (1<<shift - 1)
		q := m >> shift
		if rest > half || (rest == half && q&1 == 1) {
			q++
		}
		return sign | uint16(q), false // q may carry into the smallest normal: still right
	}
	q := uint32(e)<<10 | man>>13
	rest := man & 0x1fff
	if rest > 0x1000 || (rest == 0x1000 && q&1 == 1) {
		q++ // may carry into the exponent, up to Inf
	}
	if q >= 0x7c00 {
		return sign | 0x7c00, true
	}
	return sign | uint16(q), false
}
