package gguf

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Block layouts of the supported quantized types (ggml-common.h), byte
// offsets within one block:
//
//	Q8_0 (32 elements, 34 bytes):  d f16 [0,2)  qs int8[32] [2,34)
//	Q4_0 (32 elements, 18 bytes):  d f16 [0,2)  qs [2,18): byte j holds element j
//	                               in its low nibble and j+16 in its high one
//	Q4_K (256 elements, 144 bytes): d f16 [0,2)  dmin f16 [2,4)  scales [4,16)
//	                               (8 six-bit scale/min pairs, packed)  qs [16,144)
//	Q5_K (256 elements, 176 bytes): d [0,2)  dmin [2,4)  scales [4,16)  qh [16,48)
//	                               (fifth bits)  qs [48,176) (low nibbles)
//	Q6_K (256 elements, 210 bytes): ql [0,128) (low 4 bits)  qh [128,192) (high 2
//	                               bits)  scales int8[16] [192,208)  d f16 [208,210)
//
// The dequantizers perform the same float32 operations, in the same order,
// as llama.cpp's dequantize_row_* reference functions, so results match
// bit for bit. Every product that C computes before an addition is rounded
// explicitly with float32(...), which keeps Go from fusing it into an FMA.

// F16ToFloat32 converts an IEEE 754 half-precision value to float32
// exactly (zeros, subnormals, infinities; a NaN keeps its payload and comes
// out quiet, as the F16C instruction ggml uses makes it).
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	man := uint32(h) & 0x3ff
	switch {
	case exp == 0 && man == 0:
		return math.Float32frombits(sign)
	case exp == 0:
		// Subnormal: man × 2^-24, exact in float32.
		f := float32(man) * (1.0 / (1 << 24))
		if sign != 0 {
			f = -f
		}
		return f
	case exp == 0x1f && man == 0:
		return math.Float32frombits(sign | 0x7f800000)
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7fc00000 | man<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
}

// Float32ToF16 rounds f to the nearest half-precision value, ties to even,
// as ggml's GGML_FP32_TO_FP16 does: values beyond the half range become
// infinities, NaN becomes a quiet NaN.
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	man := b & 0x7fffff
	if exp == 0xff {
		if man != 0 {
			return sign | 0x7e00 | uint16(man>>13)
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Subnormal half (or zero): shift the full significand.
		if e < -10 {
			return sign
		}
		m := man | 0x800000
		shift := uint32(14 - e)
		h := m >> shift
		rem := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(e)<<10 | man>>13
	rem := man & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into the exponent, up to infinity: correct
	}
	return sign | uint16(h)
}

// BF16ToFloat32 converts a bfloat16 to float32 exactly (it is the top half
// of a float32).
func BF16ToFloat32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// Float32ToBF16 rounds f to bfloat16 as ggml's GGML_FP32_TO_BF16 does:
// nearest, ties to even; a NaN is truncated and forced quiet.
func Float32ToBF16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 64
	}
	return uint16((u + (0x7fff + (u>>16)&1)) >> 16)
}

func f16at(b []byte, i int) float32 { return F16ToFloat32(binary.LittleEndian.Uint16(b[i:])) }

// Dequantize decodes src, whole blocks of type t, into dst, which must
// hold exactly the elements those blocks encode.
func Dequantize(t Type, src []byte, dst []float32) error {
	if !t.Supported() {
		return errUnsupported(t)
	}
	bs, bb := t.BlockSize(), t.BlockBytes()
	if len(src)%bb != 0 {
		return fmt.Errorf("gguf: %d bytes is not a whole number of %s blocks (%d bytes each)", len(src), t, bb)
	}
	if len(dst) != len(src)/bb*bs {
		return fmt.Errorf("gguf: %d bytes of %s hold %d elements, dst has room for %d", len(src), t, len(src)/bb*bs, len(dst))
	}
	dequantize(t, src, dst)
	return nil
}

// dequantize decodes src into dst; the lengths are already checked.
func dequantize(t Type, src []byte, dst []float32) {
	le := binary.LittleEndian
	switch t {
	case TypeF32:
		for i := range dst {
			dst[i] = math.Float32frombits(le.Uint32(src[4*i:]))
		}
	case TypeF16:
		for i := range dst {
			dst[i] = F16ToFloat32(le.Uint16(src[2*i:]))
		}
	case TypeBF16:
		for i := range dst {
			dst[i] = BF16ToFloat32(le.Uint16(src[2*i:]))
		}
	case TypeQ8_0:
		for b := 0; len(src) > 0; b++ {
			dequantQ8_0(src[:34], dst[32*b:32*b+32])
			src = src[34:]
		}
	case TypeQ4_0:
		for b := 0; len(src) > 0; b++ {
			dequantQ4_0(src[:18], dst[32*b:32*b+32])
			src = src[18:]
		}
	case TypeQ4_K:
		for b := 0; len(src) > 0; b++ {
			dequantQ4_K(src[:144], dst[256*b:256*b+256])
			src = src[144:]
		}
	case TypeQ5_K:
		for b := 0; len(src) > 0; b++ {
			dequantQ5_K(src[:176], dst[256*b:256*b+256])
			src = src[176:]
		}
	case TypeQ6_K:
		for b := 0; len(src) > 0; b++ {
			dequantQ6_K(src[:210], dst[256*b:256*b+256])
			src = src[210:]
		}
	}
}

func dequantQ8_0(blk []byte, y []float32) {
	d := f16at(blk, 0)
	for j := range 32 {
		y[j] = float32(int8(blk[2+j])) * d
	}
}

func dequantQ4_0(blk []byte, y []float32) {
	d := f16at(blk, 0)
	qs := blk[2:18]
	for j := range 16 {
		y[j] = float32(int(qs[j]&0x0f)-8) * d
		y[j+16] = float32(int(qs[j]>>4)-8) * d
	}
}

// scaleMinK4 unpacks the j-th (0..7) six-bit scale and min of a Q4_K/Q5_K
// block: pairs 0-3 are the low six bits of bytes j and j+4; pairs 4-7 take
// their low four bits from byte j+4's nibbles and their top two bits from
// the spare top bits of bytes j-4 (scale) and j (min).
func scaleMinK4(j int, q []byte) (sc, m uint8) {
	if j < 4 {
		return q[j] & 63, q[j+4] & 63
	}
	return q[j+4]&0xf | (q[j-4]>>6)<<4, q[j+4]>>4 | (q[j]>>6)<<4
}

func dequantQ4_K(blk []byte, y []float32) {
	d, dmin := f16at(blk, 0), f16at(blk, 2)
	scales, q := blk[4:16], blk[16:144]
	for g := range 4 { // 64 elements per group: two sub-blocks of 32
		sc, m := scaleMinK4(2*g, scales)
		d1, m1 := d*float32(sc), dmin*float32(m)
		sc, m = scaleMinK4(2*g+1, scales)
		d2, m2 := d*float32(sc), dmin*float32(m)
		qg, yg := q[32*g:32*g+32], y[64*g:64*g+64]
		for l := range 32 {
			yg[l] = float32(d1*float32(qg[l]&0xf)) - m1
		}
		for l := range 32 {
			yg[32+l] = float32(d2*float32(qg[l]>>4)) - m2
		}
	}
}

func dequantQ5_K(blk []byte, y []float32) {
	d, dmin := f16at(blk, 0), f16at(blk, 2)
	scales, qh, ql := blk[4:16], blk[16:48], blk[48:176]
	for g := range 4 {
		sc, m := scaleMinK4(2*g, scales)
		d1, m1 := d*float32(sc), dmin*float32(m)
		sc, m = scaleMinK4(2*g+1, scales)
		d2, m2 := d*float32(sc), dmin*float32(m)
		u1, u2 := byte(1)<<(2*g), byte(2)<<(2*g)
		qg, yg := ql[32*g:32*g+32], y[64*g:64*g+64]
		for l := range 32 {
			v := int(qg[l] & 0xf)
			if qh[l]&u1 != 0 {
				v += 16
			}
			yg[l] = float32(d1*float32(v)) - m1
		}
		for l := range 32 {
			v := int(qg[l] >> 4)
			if qh[l]&u2 != 0 {
				v += 16
			}
			yg[32+l] = float32(d2*float32(v)) - m2
		}
	}
}

func dequantQ6_K(blk []byte, y []float32) {
	ql, qh, sc := blk[0:128], blk[128:192], blk[192:208]
	d := f16at(blk, 208)
	for h := range 2 { // two halves of 128 elements
		l8, h8, s8, yh := ql[64*h:], qh[32*h:], sc[8*h:], y[128*h:]
		for l := range 32 {
			is := l / 16
			q1 := int(l8[l]&0xf|(h8[l]>>0&3)<<4) - 32
			q2 := int(l8[l+32]&0xf|(h8[l]>>2&3)<<4) - 32
			q3 := int(l8[l]>>4|(h8[l]>>4&3)<<4) - 32
			q4 := int(l8[l+32]>>4|(h8[l]>>6&3)<<4) - 32
			yh[l] = float32(d*float32(int8(s8[is]))) * float32(q1)
			yh[l+32] = float32(d*float32(int8(s8[is+2]))) * float32(q2)
			yh[l+64] = float32(d*float32(int8(s8[is+4]))) * float32(q3)
			yh[l+96] = float32(d*float32(int8(s8[is+6]))) * float32(q4)
		}
	}
}

// readChunk is the most bytes ReadRows reads at once.
const readChunk = 1 << 20

// checkRows validates a row range of t against f.
func (f *File) checkRows(t *TensorInfo, row0, n int) error {
	if t == nil || f.byName[t.Name] != t {
		return fmt.Errorf("gguf: tensor is not one of this file's")
	}
	if row0 < 0 || n < 0 || int64(row0) > t.Rows() || int64(n) > t.Rows()-int64(row0) {
		return fmt.Errorf("gguf: tensor %s: rows [%d, %d+%d) out of range (it has %d)", t.Name, row0, row0, n, t.Rows())
	}
	return nil
}

// ReadRawRows reads rows [row0, row0+n) of t, as stored, into dst, which
// must hold at least n*t.RowBytes() bytes. It works for every known type,
// so that quantized blocks can be repacked losslessly.
func (f *File) ReadRawRows(t *TensorInfo, row0, n int, dst []byte) error {
	if err := f.checkRows(t, row0, n); err != nil {
		return err
	}
	rb := t.RowBytes()
	size := int64(n) * rb
	if int64(len(dst)) < size {
		return fmt.Errorf("gguf: tensor %s: dst holds %d bytes, %d rows need %d", t.Name, len(dst), n, size)
	}
	off := f.DataOffset + t.Offset + int64(row0)*rb
	if _, err := f.r.ReadAt(dst[:size], off); err != nil {
		return fmt.Errorf("gguf: tensor %s: %w", t.Name, err)
	}
	return nil
}

// ReadRows dequantizes rows [row0, row0+n) of t into dst, which must hold
// at least n*t.RowLen() values. A row is Dims[0] elements. It reads at
// most about a megabyte at a time, so n may cover a tensor of any size.
func (f *File) ReadRows(t *TensorInfo, row0, n int, dst []float32) error {
	if err := f.checkRows(t, row0, n); err != nil {
		return err
	}
	if !t.Type.Supported() {
		return fmt.Errorf("tensor %s: %w", t.Name, errUnsupported(t.Type))
	}
	rl, rb := t.RowLen(), t.RowBytes()
	if int64(len(dst)) < int64(n)*rl {
		return fmt.Errorf("gguf: tensor %s: dst holds %d values, %d rows need %d", t.Name, len(dst), n, int64(n)*rl)
	}
	step := max(1, readChunk/rb)
	buf := make([]byte, min(int64(n), step)*rb)
	for done := 0; done < n; {
		k := int(min(int64(n-done), step))
		raw := buf[:int64(k)*rb]
		if err := f.ReadRawRows(t, row0+done, k, raw); err != nil {
			return err
		}
		dequantize(t.Type, raw, dst[int64(done)*rl:int64(done+k)*rl])
		done += k
	}
	return nil
}

// ReadTensor dequantizes the whole of t into a new slice.
func (f *File) ReadTensor(t *TensorInfo) ([]float32, error) {
	if err := f.checkRows(t, 0, 0); err != nil {
		return nil, err
	}
	if !t.Type.Supported() {
		return nil, fmt.Errorf("tensor %s: %w", t.Name, errUnsupported(t.Type))
	}
	out := make([]float32, t.Elements())
	return out, f.ReadRows(t, 0, int(t.Rows()), out)
}
