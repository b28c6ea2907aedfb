package gguf

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"
)

// The reference dequantizers below are written straight from llama.cpp's
// dequantize_row_* (ggml-quants.c) and ggml's half/bfloat conversions, one
// element at a time and deliberately naive, sharing nothing with the
// package. Each C float expression is reproduced with the same float32
// operations in the same order; float32(...) around a product rounds it
// before the subtraction, as C does without contraction.

// refHalf decodes an IEEE half with float64 arithmetic (exact for every
// half); a NaN comes out quiet with its payload, as F16C converts it.
func refHalf(h uint16) float32 {
	sign := 1.0
	if h>>15 == 1 {
		sign = -1
	}
	e := int(h>>10) & 31
	m := int(h & 1023)
	switch {
	case e == 31 && m == 0:
		return float32(math.Inf(int(sign)))
	case e == 31:
		return math.Float32frombits(uint32(h>>15)<<31 | 0x7fc00000 | uint32(m)<<13)
	case e == 0:
		return float32(sign * math.Ldexp(float64(m), -24))
	}
	return float32(sign * math.Ldexp(float64(1024+m), e-25))
}

// refBF16 decodes a bfloat16 field by field.
func refBF16(h uint16) float32 {
	sign := 1.0
	if h>>15 == 1 {
		sign = -1
	}
	e := int(h>>7) & 255
	m := int(h & 127)
	switch {
	case e == 255 && m == 0:
		return float32(math.Inf(int(sign)))
	case e == 255:
		return math.Float32frombits(uint32(h) << 16) // ggml shifts, keeping the payload as is
	case e == 0:
		return float32(sign * math.Ldexp(float64(m), -133))
	}
	return float32(sign * math.Ldexp(float64(128+m), e-134))
}

func refHalfAt(b []byte, off int) float32 {
	return refHalf(uint16(b[off]) | uint16(b[off+1])<<8)
}

// refScaleMin is get_scale_min_k4.
func refScaleMin(j int, q []byte) (int, int) {
	if j < 4 {
		return int(q[j] & 63), int(q[j+4] & 63)
	}
	d := int(q[j+4]&0xF) | int(q[j-4]>>6)<<4
	m := int(q[j+4]>>4) | int(q[j]>>6)<<4
	return d, m
}

// refElement returns element i of one block of type t.
func refElement(t Type, blk []byte, i int) float32 {
	switch t {
	case TypeQ8_0:
		d := refHalfAt(blk, 0)
		return float32(int8(blk[2+i])) * d
	case TypeQ4_0:
		d := refHalfAt(blk, 0)
		var q int
		if i < 16 {
			q = int(blk[2+i]&0x0F) - 8
		} else {
			q = int(blk[2+i-16]>>4) - 8
		}
		return float32(q) * d
	case TypeQ4_K, TypeQ5_K:
		d := refHalfAt(blk, 0)
		dmin := refHalfAt(blk, 2)
		scales := blk[4:16]
		group, r := i/64, i%64 // 64 elements share a qs run of 32 bytes
		sub := 2*group + r/32
		l := r % 32
		sc, m := refScaleMin(sub, scales)
		d1 := d * float32(sc)
		m1 := dmin * float32(m)
		var q int
		if t == TypeQ4_K {
			qs := blk[16:]
			if r < 32 {
				q = int(qs[32*group+l] & 0xF)
			} else {
				q = int(qs[32*group+l] >> 4)
			}
		} else {
			qh, qs := blk[16:48], blk[48:]
			if r < 32 {
				q = int(qs[32*group+l] & 0xF)
			} else {
				q = int(qs[32*group+l] >> 4)
			}
			bit := uint(2*group + r/32) // u1 = 1<<2g for the low half, u2 = 2<<2g for the high
			if qh[l]&(1<<bit) != 0 {
				q += 16
			}
		}
		return float32(d1*float32(q)) - m1
	case TypeQ6_K:
		ql, qh, sc := blk[0:128], blk[128:192], blk[192:208]
		d := refHalfAt(blk, 208)
		half, r := i/128, i%128
		quarter, l := r/32, r%32 // y[l + 32*quarter] within the half
		lo := ql[64*half+l+32*(quarter%2)]
		var low int
		if quarter < 2 {
			low = int(lo & 0xF)
		} else {
			low = int(lo >> 4)
		}
		high := int(qh[32*half+l]>>(2*quarter)) & 3
		q := int(int8(low|high<<4)) - 32
		s := int8(sc[8*half+l/16+2*quarter])
		return float32(d*float32(s)) * float32(q)
	}
	panic("no reference for " + t.String())
}

func TestDequantizeMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, typ := range []Type{TypeQ8_0, TypeQ4_0, TypeQ4_K, TypeQ5_K, TypeQ6_K} {
		t.Run(typ.String(), func(t *testing.T) {
			const rows, blocksPerRow = 8, 4
			bs, bb := typ.BlockSize(), typ.BlockBytes()
			raw := randomBlocks(rng, typ, rows*blocksPerRow)
			f, _ := writeTestFile(t, nil, []tensorSpec{{name: "w", typ: typ, dims: []int64{int64(bs * blocksPerRow), rows}, raw: raw}})
			ti, _ := f.Tensor("w")
			got := make([]float32, rows*bs*blocksPerRow)
			if err := f.ReadRows(ti, 0, rows, got); err != nil {
				t.Fatal(err)
			}
			for b := range rows * blocksPerRow {
				blk := raw[b*bb : (b+1)*bb]
				for i := range bs {
					want := refElement(typ, blk, i)
					if g := got[b*bs+i]; math.Float32bits(g) != math.Float32bits(want) {
						t.Fatalf("block %d element %d: got %v (%#x), want %v (%#x)", b, i, g, math.Float32bits(g), want, math.Float32bits(want))
					}
				}
			}
			// A sub-range of rows, and the raw bytes, agree too.
			part := make([]float32, 3*bs*blocksPerRow)
			if err := f.ReadRows(ti, 2, 3, part); err != nil {
				t.Fatal(err)
			}
			for i, v := range part {
				if math.Float32bits(v) != math.Float32bits(got[2*bs*blocksPerRow+i]) {
					t.Fatalf("rows 2..5 element %d differs from the full read", i)
				}
			}
			rawPart := make([]byte, 3*ti.RowBytes())
			if err := f.ReadRawRows(ti, 2, 3, rawPart); err != nil {
				t.Fatal(err)
			}
			if string(rawPart) != string(raw[2*ti.RowBytes():5*ti.RowBytes()]) {
				t.Fatal("ReadRawRows differs from the bytes written")
			}
			viaDequantize := make([]float32, len(got))
			if err := Dequantize(typ, raw, viaDequantize); err != nil {
				t.Fatal(err)
			}
			for i := range got {
				if math.Float32bits(got[i]) != math.Float32bits(viaDequantize[i]) {
					t.Fatalf("Dequantize element %d differs from ReadRows", i)
				}
			}
		})
	}
}

// TestHalfAndBFloatExact reads every F16 and BF16 bit pattern back from a
// file and compares with the reference decoders, bit for bit.
func TestHalfAndBFloatExact(t *testing.T) {
	raw := make([]byte, 2*65536)
	for i := range 65536 {
		binary.LittleEndian.PutUint16(raw[2*i:], uint16(i))
	}
	f, _ := writeTestFile(t, nil, []tensorSpec{
		{name: "h", typ: TypeF16, dims: []int64{256, 256}, raw: raw},
		{name: "b", typ: TypeBF16, dims: []int64{256, 256}, raw: raw},
	})
	for _, tc := range []struct {
		name string
		ref  func(uint16) float32
	}{{"h", refHalf}, {"b", refBF16}} {
		ti, _ := f.Tensor(tc.name)
		got, err := f.ReadTensor(ti)
		if err != nil {
			t.Fatal(err)
		}
		for i, g := range got {
			if want := tc.ref(uint16(i)); math.Float32bits(g) != math.Float32bits(want) {
				t.Fatalf("%s %#04x: got %#x, want %#x", ti.Type, i, math.Float32bits(g), math.Float32bits(want))
			}
		}
	}
	// Spot checks against known values.
	for h, want := range map[uint16]float32{
		0x0001: float32(math.Ldexp(1, -24)), // smallest subnormal
		0x03ff: float32(math.Ldexp(1023, -24)),
		0x0400: float32(math.Ldexp(1, -14)), // smallest normal
		0x3c00: 1, 0xc000: -2, 0x7bff: 65504,
		0x7c00: float32(math.Inf(1)), 0xfc00: float32(math.Inf(-1)),
	} {
		if g := F16ToFloat32(h); g != want {
			t.Errorf("F16ToFloat32(%#04x) = %v, want %v", h, g, want)
		}
	}
	if g := F16ToFloat32(0x8000); math.Float32bits(g) != 1<<31 {
		t.Errorf("F16ToFloat32(0x8000) = %v, want -0", g)
	}
	if g := F16ToFloat32(0x7d00); !math.IsNaN(float64(g)) {
		t.Errorf("F16ToFloat32(0x7d00) = %v, want NaN", g)
	}
}

func TestFloat32ToHalfRounding(t *testing.T) {
	// Every finite half survives a round trip.
	for i := range 65536 {
		h := uint16(i)
		if h&0x7c00 == 0x7c00 && h&0x3ff != 0 {
			continue // NaN
		}
		if g := Float32ToF16(F16ToFloat32(h)); g != h {
			t.Fatalf("round trip of %#04x gave %#04x", h, g)
		}
	}
	// Midpoints between neighbours round to even; just above rounds up.
	for i := range 0x7bff {
		lo, hi := F16ToFloat32(uint16(i)), F16ToFloat32(uint16(i+1))
		mid := float32((float64(lo) + float64(hi)) / 2)
		want := uint16(i)
		if i&1 == 1 {
			want = uint16(i + 1)
		}
		if g := Float32ToF16(mid); g != want {
			t.Fatalf("midpoint of %#04x and %#04x gave %#04x, want %#04x", i, i+1, g, want)
		}
		if above := math.Nextafter32(mid, hi); above != hi {
			if g := Float32ToF16(above); g != uint16(i+1) {
				t.Fatalf("just above the midpoint of %#04x: got %#04x", i, g)
			}
		}
	}
	for _, tc := range []struct {
		f    float32
		want uint16
	}{{65519, 0x7bff}, {65520, 0x7c00}, {1e10, 0x7c00}, {-1e10, 0xfc00}, {float32(math.Ldexp(1, -26)), 0}, {float32(math.NaN()), 0x7e00}} {
		if g := Float32ToF16(tc.f); g != tc.want {
			t.Errorf("Float32ToF16(%v) = %#04x, want %#04x", tc.f, g, tc.want)
		}
	}
	for _, tc := range []struct {
		f    float32
		want uint16
	}{{1, 0x3f80}, {math.Float32frombits(0x3f808000), 0x3f80}, {math.Float32frombits(0x3f818000), 0x3f82}, {math.Float32frombits(0x3f808001), 0x3f81}} {
		if g := Float32ToBF16(tc.f); g != tc.want {
			t.Errorf("Float32ToBF16(%#x) = %#04x, want %#04x", math.Float32bits(tc.f), g, tc.want)
		}
	}
}

func TestReadRowsErrors(t *testing.T) {
	iq := make([]byte, TypeIQ2_XXS.BlockBytes()*2)
	f, _ := writeTestFile(t, nil, []tensorSpec{
		{name: "blk.0.ffn_up.weight", typ: TypeIQ2_XXS, dims: []int64{256, 2}, raw: iq},
		{name: "ok", typ: TypeF32, dims: []int64{4, 2}, rows: make([]float32, 8)},
	})
	ti, _ := f.Tensor("blk.0.ffn_up.weight")
	err := f.ReadRows(ti, 0, 1, make([]float32, 256))
	want := "tensor blk.0.ffn_up.weight: type IQ2_XXS is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %q", err, want)
	}
	// Raw reads work for any known type.
	if err := f.ReadRawRows(ti, 1, 1, make([]byte, ti.RowBytes())); err != nil {
		t.Fatal(err)
	}
	ok, _ := f.Tensor("ok")
	for _, tc := range []struct{ row0, n, dst int }{{-1, 1, 4}, {0, 3, 12}, {2, 1, 4}, {0, 2, 7}} {
		if err := f.ReadRows(ok, tc.row0, tc.n, make([]float32, tc.dst)); err == nil {
			t.Errorf("ReadRows(%d, %d) into %d values: no error", tc.row0, tc.n, tc.dst)
		}
	}
	if err := f.ReadRows(&TensorInfo{Name: "ok", Dims: []int64{4, 2}}, 0, 1, make([]float32, 4)); err == nil {
		t.Error("a TensorInfo from elsewhere was accepted")
	}
}

func BenchmarkReadRows(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, typ := range SupportedTypes {
		b.Run(typ.String(), func(b *testing.B) {
			const cols, rows = 4096, 64
			x := make([]float32, cols*rows)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			f, _ := writeTestFile(b, nil, []tensorSpec{{name: "w", typ: typ, dims: []int64{cols, rows}, rows: x}})
			ti, _ := f.Tensor("w")
			dst := make([]float32, cols*rows)
			b.SetBytes(int64(len(dst)) * 4)
			b.ReportAllocs()
			for b.Loop() {
				if err := f.ReadRows(ti, 0, rows, dst); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
