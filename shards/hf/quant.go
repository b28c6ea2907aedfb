package hf

import (
	"errors"
	"fmt"
	"math"
)

// Weight-only block quantization, in the layout of onnxruntime's
// com.microsoft MatMulNBits and GatherBlockQuantized (uint8 data, no
// zero_points input, so the default zero point applies):
//
//   - a weight [N, K] (a Hugging Face Linear's [out, in]) is quantized row
//     by row, each row in K/Block blocks of Block consecutive elements;
//   - each block has one float32 scale d and Block integers q, signed:
//     q in [-8, 7] for 4 bits, [-128, 127] for 8 bits, and stands for d·q;
//   - q is stored unsigned as q+8 (4 bits) or q+128 (8 bits): the default
//     zero point 2^(bits-1) of both operators;
//   - 8 bits: one byte per element, in order; 4 bits: two elements per byte,
//     element 2j in the low nibble of byte j and element 2j+1 in the high
//     nibble;
//   - the packed data is [N, K/Block, Block·Bits/8] bytes (one row after
//     another) and the scales [N, K/Block] float32.
//
// A GGUF Q8_0 block (d, 32 int8) and a Q4_0 block (d, 32 nibbles standing for
// d·(q-8)) hold exactly these values with Block 32; Q4_0 packs elements 0-15
// in the low nibbles and 16-31 in the high ones, so its bytes are
// re-paired (not re-quantized) to this layout, and its float16 d widens to
// float32 exactly.

// Quantization is how an import stores the weights of the projections, the
// language-model head and the embedding table: Bits 4 or 8 per weight plus
// one float32 scale per Block weights along the input dimension. The zero
// value stores them unquantized (Options.DType).
type Quantization struct {
	Bits  int // 4 or 8; 0: not quantized
	Block int // weights per scale: 32 or 128
}

// DefaultQuantBlock is the block size of a quantization asked for without
// one: GGUF's Q4_0 and Q8_0 blocks.
const DefaultQuantBlock = 32

// accuracyLevel is MatMulNBits' accuracy_level in every quantized block:
// 4 quantizes the activations to int8 per block and multiplies with int8
// dot products (AVX-512 VNNI here), 0 dequantizes the weights and
// multiplies in float32. See TestQuantizedAgainstFloat for what it costs in
// accuracy and BenchmarkDecodeStepQuantized for what it gains.
var accuracyLevel int64 = 4

// ErrBadQuantization is returned, wrapped, for a quantization Import cannot
// write: an unknown name or block size, or a block size that does not
// divide a weight's input dimension.
var ErrBadQuantization = errors.New("bad quantization")

// ParseQuantization reads the quantization named by --quantize ("none" or
// "", "q8", "q4") with block weights per scale (0 means DefaultQuantBlock;
// else 32 or 128).
func ParseQuantization(name string, block int) (Quantization, error) {
	var q Quantization
	switch name {
	case "", "none":
		return Quantization{}, nil
	case "q8":
		q.Bits = 8
	case "q4":
		q.Bits = 4
	default:
		return Quantization{}, fmt.Errorf("%w: %q: want none, q8 or q4", ErrBadQuantization, name)
	}
	q.Block = block
	if block == 0 {
		q.Block = DefaultQuantBlock
	}
	if err := q.check(); err != nil {
		return Quantization{}, err
	}
	return q, nil
}

func (q Quantization) check() error {
	if q.Bits == 0 && q.Block == 0 {
		return nil
	}
	if q.Bits != 4 && q.Bits != 8 {
		return fmt.Errorf("%w: %d bits: want 4 or 8", ErrBadQuantization, q.Bits)
	}
	if q.Block != 32 && q.Block != 128 {
		return fmt.Errorf("%w: block size %d: want 32 or 128", ErrBadQuantization, q.Block)
	}
	return nil
}

// On reports whether q quantizes anything.
func (q Quantization) On() bool { return q.Bits != 0 }

// String is the manifest's name of q: "q4/32", "q8/128"; "" when off.
func (q Quantization) String() string {
	if !q.On() {
		return ""
	}
	return fmt.Sprintf("q%d/%d", q.Bits, q.Block)
}

// ends returns the quantization of the embedding table and the head where
// it differs from q: under 4 bits they are kept at 8 (as llama.cpp's Q4_0
// keeps output.weight at 6 bits), unless the source holds one at 4 bits
// with q's block already, which is then copied as it is. Measured on the
// tiny random checkpoints (TestQuantizedAgainstFloat), 4-bit embedding
// and head cost as much accuracy as all the 4-bit projections together
// (mean logits cosine 0.977-0.983 instead of 0.987-0.993 at block 32),
// for a small share of a large model's bytes.
func (q Quantization) ends(src Source, tensors ...string) map[string]Quantization {
	if q.Bits != 4 {
		return nil
	}
	qs, _ := src.(QuantizedSource)
	m := map[string]Quantization{}
	for _, t := range tensors {
		if qs != nil {
			if have, ok := qs.Quantized(t); ok && have == q {
				continue
			}
		}
		m[t] = Quantization{Bits: 8, Block: q.Block}
	}
	return m
}

// rowBytes is the packed size of a row of k weights.
func (q Quantization) rowBytes(k int) int { return k * q.Bits / 8 }

// zeroPoint is the default zero point, added to the signed q.
func (q Quantization) zeroPoint() int { return 1 << (q.Bits - 1) }

// quantizeRow quantizes one row x (len a multiple of q.Block) into packed
// (q.rowBytes(len(x)) bytes) and scales (len(x)/q.Block).
func (q Quantization) quantizeRow(packed []byte, scales []float32, x []float32) {
	var ints [128]int8
	zp := q.zeroPoint()
	for b := range scales {
		blk := x[b*q.Block : (b+1)*q.Block]
		l := ints[:q.Block]
		if q.Bits == 8 {
			scales[b] = quantize8(blk, l)
			out := packed[b*q.Block:]
			for i, v := range l {
				out[i] = byte(int(v) + zp)
			}
			continue
		}
		scales[b] = quantize4(blk, l)
		out := packed[b*q.Block/2:]
		for j := range q.Block / 2 {
			out[j] = byte(int(l[2*j])+zp) | byte(int(l[2*j+1])+zp)<<4
		}
	}
}

// dequantizeRow is quantizeRow's inverse: dst[i] = d·q.
func (q Quantization) dequantizeRow(dst []float32, packed []byte, scales []float32) {
	zp := q.zeroPoint()
	for i := range dst {
		var u int
		if q.Bits == 8 {
			u = int(packed[i])
		} else {
			u = int(packed[i/2]>>(4*(i%2))) & 0xf
		}
		dst[i] = scales[i/q.Block] * float32(u-zp)
	}
}

// quantize8 is llama.cpp's Q8_0 reference quantizer: d = max|x|/127,
// q = round(x/d).
func quantize8(x []float32, l []int8) float32 {
	amax := float32(0)
	for _, v := range x {
		amax = max(amax, abs32(v))
	}
	d := amax / 127
	id := float32(0)
	if d != 0 {
		id = 1 / d
	}
	for i, v := range x {
		l[i] = int8(math.Round(float64(v * id)))
	}
	return d
}

// quantize4 picks the scale of a 4-bit block as llama.cpp's make_qx_quants
// does (its rmse_type 1 without weights): Q4_0's reference maps the element
// of largest magnitude m to -8 (d = m/-8, so that the asymmetric range
// [-8, 7] gives that element the extra level); here 19 rounding grids
// around it are tried, m mapped to -(8 + 0.1·i) for i in [-9, 9], and for
// each the least-squares scale of its integers is taken; the grid whose
// scale reduces the squared error most wins. The result is still d·q with q
// in [-8, 7]: a Q4_0 block.
func quantize4(x []float32, l []int8) float32 {
	m := float32(0)
	for _, v := range x {
		if abs32(v) > abs32(m) {
			m = v
		}
	}
	if m == 0 {
		for i := range l {
			l[i] = 0
		}
		return 0
	}
	bestScore, bestIscale := -1.0, float32(0)
	for is := -9; is <= 9; is++ {
		iscale := -(8 + 0.1*float32(is)) / m
		var sumlx, suml2 float64
		for _, v := range x {
			q := clampRound(v*iscale, -8, 7)
			sumlx += float64(v) * float64(q)
			suml2 += float64(q) * float64(q)
		}
		if suml2 > 0 && sumlx*sumlx/suml2 > bestScore {
			bestScore, bestIscale = sumlx*sumlx/suml2, iscale
		}
	}
	var sumlx, suml2 float64
	for i, v := range x {
		q := clampRound(v*bestIscale, -8, 7)
		l[i] = int8(q)
		sumlx += float64(v) * float64(q)
		suml2 += float64(q) * float64(q)
	}
	return float32(sumlx / suml2)
}

// clampRound rounds v half away from zero, as math.Round (and C's roundf)
// does, and clamps it to [lo, hi]. v ± 0.5 is exact in float64 (not in
// float32: 0.49999997+0.5 rounds to 1), so truncating it rounds.
func clampRound(v float32, lo, hi int) int {
	if v >= 0 {
		return min(hi, int(float64(v)+0.5))
	}
	return max(lo, int(float64(v)-0.5))
}

func abs32(v float32) float32 { return math.Float32frombits(math.Float32bits(v) &^ (1 << 31)) }
