package gguf

import (
	"encoding/binary"
	"fmt"
	"math"
)

// The quantizers follow llama.cpp's quantize_row_*_ref reference
// quantizers (the ones without an importance matrix): the same scale
// searches, clamps and rounding, in float32. They are meant for test and
// random-weight checkpoints; their output is close to llama-quantize's
// without an imatrix but is not promised to be byte-identical.

// Quantize encodes src, a whole number of t's blocks, as type t.
func Quantize(t Type, src []float32) ([]byte, error) {
	if !t.Supported() {
		return nil, errUnsupported(t)
	}
	bs := t.BlockSize()
	if len(src)%bs != 0 {
		return nil, fmt.Errorf("gguf: %d values is not a whole number of %s blocks (%d values each)", len(src), t, bs)
	}
	dst := make([]byte, len(src)/bs*t.BlockBytes())
	if err := quantize(t, src, dst); err != nil {
		return nil, err
	}
	return dst, nil
}

// quantize encodes src into dst; lengths are already checked.
func quantize(t Type, src []float32, dst []byte) error {
	le := binary.LittleEndian
	switch t {
	case TypeF32:
		for i, v := range src {
			le.PutUint32(dst[4*i:], math.Float32bits(v))
		}
		return nil
	case TypeF16:
		for i, v := range src {
			le.PutUint16(dst[2*i:], Float32ToF16(v))
		}
		return nil
	case TypeBF16:
		for i, v := range src {
			le.PutUint16(dst[2*i:], Float32ToBF16(v))
		}
		return nil
	}
	for i, v := range src {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return fmt.Errorf("gguf: value %d is %v: %s cannot encode it", i, v, t)
		}
	}
	bs, bb := t.BlockSize(), t.BlockBytes()
	for b := 0; b*bs < len(src); b++ {
		x, y := src[b*bs:(b+1)*bs], dst[b*bb:(b+1)*bb]
		switch t {
		case TypeQ8_0:
			quantQ8_0(x, y)
		case TypeQ4_0:
			quantQ4_0(x, y)
		case TypeQ4_K:
			quantQ4_K(x, y)
		case TypeQ5_K:
			quantQ5_K(x, y)
		case TypeQ6_K:
			quantQ6_K(x, y)
		}
	}
	return nil
}

func putF16(b []byte, f float32) { binary.LittleEndian.PutUint16(b, Float32ToF16(f)) }

func abs32(f float32) float32 { return math.Float32frombits(math.Float32bits(f) &^ (1 << 31)) }

// nearestInt rounds to the nearest integer, ties to even, with ggml's
// trick of adding 1.5×2^23 and reading the low mantissa bits. |f| must be
// at most 2^22.
func nearestInt(f float32) int {
	v := f + 12582912
	return int(math.Float32bits(v)&0x7fffff) - 0x400000
}

func quantQ8_0(x []float32, y []byte) {
	var amax float32
	for _, v := range x {
		amax = max(amax, abs32(v))
	}
	d := amax / 127
	var id float32
	if d != 0 {
		id = 1 / d
	}
	putF16(y, d)
	for j, v := range x {
		y[2+j] = byte(int8(math.Round(float64(v * id))))
	}
}

func quantQ4_0(x []float32, y []byte) {
	var amax, mx float32
	for _, v := range x {
		if amax < abs32(v) {
			amax, mx = abs32(v), v
		}
	}
	d := mx / -8
	var id float32
	if d != 0 {
		id = 1 / d
	}
	putF16(y, d)
	for j := range 16 {
		x0, x1 := x[j]*id, x[16+j]*id
		q0 := min(15, int(x0+8.5))
		q1 := min(15, int(x1+8.5))
		y[2+j] = byte(q0) | byte(q1)<<4
	}
}

// makeQKX2 fits x ≈ scale*L - min with L in [0, nmax] by weighted least
// squares over a few trial scales (make_qkx2_quants). It returns scale and
// the (non-negative) min.
func makeQKX2(nmax int, x, weights []float32, L, aux []uint8, rmin, rdelta float32, nstep int) (scale, theMin float32) {
	n := len(x)
	mn, mx := x[0], x[0]
	sumW := weights[0]
	sumX := sumW * x[0]
	for i := 1; i < n; i++ {
		mn = min(mn, x[i])
		mx = max(mx, x[i])
		w := weights[i]
		sumW += w
		sumX += w * x[i]
	}
	if mn > 0 {
		mn = 0
	}
	if mx == mn {
		clear(L)
		return 0, -mn
	}
	fmax := float32(nmax)
	iscale := fmax / (mx - mn)
	scale = 1 / iscale
	var bestErr float32
	for i := range n {
		l := max(0, min(nmax, nearestInt(iscale*(x[i]-mn))))
		L[i] = uint8(l)
		diff := float32(scale*float32(l)) + mn - x[i]
		bestErr += weights[i] * float32(diff*diff)
	}
	for is := 0; is <= nstep; is++ {
		iscale = (rmin + rdelta*float32(is) + fmax) / (mx - mn)
		var sumL, sumL2, sumXL float32
		for i := range n {
			l := max(0, min(nmax, nearestInt(iscale*(x[i]-mn))))
			aux[i] = uint8(l)
			w := weights[i]
			fl := float32(l)
			sumL += w * fl
			sumL2 += float32(w*fl) * fl
			sumXL += float32(w*fl) * x[i]
		}
		D := float32(sumW*sumL2) - float32(sumL*sumL)
		if D > 0 {
			thisScale := (float32(sumW*sumXL) - float32(sumX*sumL)) / D
			thisMin := (float32(sumL2*sumX) - float32(sumL*sumXL)) / D
			if thisMin > 0 {
				thisMin = 0
				thisScale = sumXL / sumL2
			}
			var curErr float32
			for i := range n {
				diff := float32(thisScale*float32(aux[i])) + thisMin - x[i]
				curErr += weights[i] * float32(diff*diff)
			}
			if curErr < bestErr {
				copy(L, aux)
				bestErr, scale, mn = curErr, thisScale, thisMin
			}
		}
	}
	return scale, -mn
}

// putScaleMinK4 packs the j-th six-bit scale and min of a Q4_K/Q5_K block,
// the inverse of scaleMinK4. Bytes must start zeroed.
func putScaleMinK4(j int, q []byte, ls, lm uint8) {
	if j < 4 {
		q[j] = ls
		q[j+4] = lm
		return
	}
	q[j+4] = ls&0xf | (lm&0xf)<<4
	q[j-4] |= (ls >> 4) << 6
	q[j] |= (lm >> 4) << 6
}

// quantK4 is the scale search shared by Q4_K (nmax 15) and Q5_K (nmax 31):
// per 32-element sub-block a scale and min, themselves quantized to six
// bits against the block's d and dmin. It fills y's d, dmin and scales and
// returns the levels L.
func quantK4(x []float32, y []byte, nmax int, rmin float32, nstep int, L *[qkK]uint8) {
	var scales, mins [8]float32
	var weights [32]float32
	var aux [32]uint8
	var maxScale, maxMin float32
	for j := range 8 {
		xs := x[32*j : 32*j+32]
		var sumX2 float32
		for _, v := range xs {
			sumX2 += v * v
		}
		avX := float32(math.Sqrt(float64(sumX2 / 32)))
		for l, v := range xs {
			weights[l] = avX + abs32(v)
		}
		scales[j], mins[j] = makeQKX2(nmax, xs, weights[:], L[32*j:32*j+32], aux[:], rmin, 0.1, nstep)
		maxScale = max(maxScale, scales[j])
		maxMin = max(maxMin, mins[j])
	}
	var invScale, invMin float32
	if maxScale > 0 {
		invScale = 63 / maxScale
	}
	if maxMin > 0 {
		invMin = 63 / maxMin
	}
	sc := y[4:16]
	clear(sc)
	for j := range 8 {
		ls := uint8(min(63, nearestInt(invScale*scales[j])))
		lm := uint8(min(63, nearestInt(invMin*mins[j])))
		putScaleMinK4(j, sc, ls, lm)
	}
	putF16(y[0:], maxScale/63)
	putF16(y[2:], maxMin/63)
	d, dmin := f16at(y, 0), f16at(y, 2)
	for j := range 8 {
		s, m := scaleMinK4(j, sc)
		dj := d * float32(s)
		if dj == 0 {
			continue
		}
		dm := dmin * float32(m)
		for i := range 32 {
			L[32*j+i] = uint8(max(0, min(nmax, nearestInt((x[32*j+i]+dm)/dj))))
		}
	}
}

func quantQ4_K(x []float32, y []byte) {
	var L [qkK]uint8
	quantK4(x, y, 15, -1, 20, &L)
	q := y[16:144]
	for g := range 4 {
		for l := range 32 {
			q[32*g+l] = L[64*g+l] | L[64*g+32+l]<<4
		}
	}
}

func quantQ5_K(x []float32, y []byte) {
	var L [qkK]uint8
	quantK4(x, y, 31, -0.5, 15, &L)
	qh, ql := y[16:48], y[48:176]
	clear(qh)
	for g := range 4 {
		m1, m2 := byte(1)<<(2*g), byte(2)<<(2*g)
		for j := range 32 {
			l1, l2 := L[64*g+j], L[64*g+32+j]
			if l1 > 15 {
				l1 -= 16
				qh[j] |= m1
			}
			if l2 > 15 {
				l2 -= 16
				qh[j] |= m2
			}
			ql[32*g+j] = l1 | l2<<4
		}
	}
}

// makeQX fits x ≈ scale*(L-nmax) with L in [0, 2*nmax) by least squares
// weighted with x² (make_qx_quants with rmse_type 1 and no weights).
func makeQX(nmax int, x []float32, L []int8) float32 {
	var mx, amax float32
	for _, v := range x {
		if abs32(v) > amax {
			amax, mx = abs32(v), v
		}
	}
	if amax < 1e-15 {
		clear(L)
		return 0
	}
	fmax := float32(nmax)
	iscale := -fmax / mx
	var sumLX, sumL2 float32
	for i, v := range x {
		l := max(-nmax, min(nmax-1, nearestInt(iscale*v)))
		L[i] = int8(l + nmax)
		w := v * v
		fl := float32(l)
		sumLX += float32(w*v) * fl
		sumL2 += float32(w*fl) * fl
	}
	var scale float32
	if sumL2 != 0 {
		scale = sumLX / sumL2
	}
	best := scale * sumLX
	for is := -9; is <= 9; is++ {
		if is == 0 {
			continue
		}
		iscale = -(fmax + 0.1*float32(is)) / mx
		sumLX, sumL2 = 0, 0
		for _, v := range x {
			l := max(-nmax, min(nmax-1, nearestInt(iscale*v)))
			w := v * v
			fl := float32(l)
			sumLX += float32(w*v) * fl
			sumL2 += float32(w*fl) * fl
		}
		if sumL2 > 0 && float32(sumLX*sumLX) > float32(best*sumL2) {
			for i, v := range x {
				L[i] = int8(nmax + max(-nmax, min(nmax-1, nearestInt(iscale*v))))
			}
			scale = sumLX / sumL2
			best = scale * sumLX
		}
	}
	return scale
}

func quantQ6_K(x []float32, y []byte) {
	var L [qkK]int8
	var scales [16]float32
	var maxScale, maxAbs float32
	for ib := range 16 {
		s := makeQX(32, x[16*ib:16*ib+16], L[16*ib:16*ib+16])
		scales[ib] = s
		if abs32(s) > maxAbs {
			maxAbs, maxScale = abs32(s), s
		}
	}
	clear(y)
	if maxAbs < 1e-15 {
		return
	}
	iscale := -128 / maxScale
	putF16(y[208:], 1/iscale)
	sc := y[192:208]
	for ib := range 16 {
		sc[ib] = byte(int8(min(127, nearestInt(iscale*scales[ib]))))
	}
	d := f16at(y, 208)
	for j := range 16 {
		dj := d * float32(int8(sc[j]))
		if dj == 0 {
			continue
		}
		for i := range 16 {
			l := max(-32, min(31, nearestInt(x[16*j+i]/dj)))
			L[16*j+i] = int8(l + 32)
		}
	}
	ql, qh := y[0:128], y[128:192]
	for h := range 2 {
		Lh := L[128*h:]
		for l := range 32 {
			q1, q2, q3, q4 := uint8(Lh[l]), uint8(Lh[l+32]), uint8(Lh[l+64]), uint8(Lh[l+96])
			ql[64*h+l] = q1&0xf | (q3&0xf)<<4
			ql[64*h+l+32] = q2&0xf | (q4&0xf)<<4
			qh[32*h+l] = q1>>4 | (q2>>4)<<2 | (q3>>4)<<4 | (q4>>4)<<6
		}
	}
}
