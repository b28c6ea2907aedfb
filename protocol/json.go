package protocol

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
)

// jsonTensor is a Tensor's JSON form: {"dtype", "shape", "data": [...]}, or
// with "b64" (the raw little-endian bytes in base64) instead of "data" for
// large tensors. float16 and bfloat16 values are written as numbers.
type jsonTensor struct {
	DType DType             `json:"dtype"`
	Shape []int64           `json:"shape"`
	Data  []json.RawMessage `json:"data,omitempty"`
	B64   string            `json:"b64,omitempty"`
}

// MarshalJSON writes the data as numbers (true/false for bool).
func (t *Tensor) MarshalJSON() ([]byte, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	vals, err := t.Float64s()
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.WriteString(`{"dtype":"` + t.DType.String() + `","shape":`)
	shape, _ := json.Marshal(t.Shape)
	if t.Shape == nil {
		shape = []byte("[]")
	}
	b.Write(shape)
	b.WriteString(`,"data":[`)
	le := binary.LittleEndian
	for i, v := range vals {
		if i > 0 {
			b.WriteByte(',')
		}
		switch t.DType {
		case Bool:
			b.WriteString(strconv.FormatBool(v != 0))
		case Int64: // exact beyond 2^53
			b.WriteString(strconv.FormatInt(int64(le.Uint64(t.Data[8*i:])), 10))
		case Uint64:
			b.WriteString(strconv.FormatUint(le.Uint64(t.Data[8*i:]), 10))
		case Float32, Float16, BFloat16:
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, fmt.Errorf("tensor: %v is not representable in JSON; use b64", v)
			}
			b.WriteString(strconv.FormatFloat(v, 'g', -1, 32))
		default:
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, fmt.Errorf("tensor: %v is not representable in JSON; use b64", v)
			}
			b.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
		}
	}
	b.WriteString("]}")
	return b.Bytes(), nil
}

// UnmarshalJSON reads either form and validates the result.
func (t *Tensor) UnmarshalJSON(b []byte) error {
	var j jsonTensor
	if err := json.Unmarshal(b, &j); err != nil {
		return fmt.Errorf("tensor: %w", err)
	}
	if !j.DType.Valid() {
		return fmt.Errorf("tensor: missing or unsupported dtype")
	}
	if len(j.Shape) > MaxTensorRank {
		return fmt.Errorf("tensor: rank %d over %d", len(j.Shape), MaxTensorRank)
	}
	out := Tensor{DType: j.DType, Shape: j.Shape}
	if out.Shape == nil {
		out.Shape = []int64{}
	}
	if j.B64 != "" {
		if j.Data != nil {
			return fmt.Errorf("tensor: both data and b64 given")
		}
		raw, err := base64.StdEncoding.DecodeString(j.B64)
		if err != nil {
			return fmt.Errorf("tensor: b64: %w", err)
		}
		out.Data = raw
	} else {
		size := j.DType.Size()
		if n := NumElements(j.Shape); n < 0 || n != int64(len(j.Data)) {
			return fmt.Errorf("tensor: shape %v needs %d values, have %d", j.Shape, n, len(j.Data))
		}
		out.Data = make([]byte, len(j.Data)*size)
		for i, raw := range j.Data {
			if err := putNumber(out.Data[i*size:], j.DType, raw); err != nil {
				return fmt.Errorf("tensor: value %d: %w", i, err)
			}
		}
	}
	if err := out.Validate(); err != nil {
		return err
	}
	*t = out
	return nil
}

func putNumber(dst []byte, dt DType, raw json.RawMessage) error {
	le := binary.LittleEndian
	s := string(raw)
	if dt == Bool {
		switch s {
		case "true", "1":
			dst[0] = 1
		case "false", "0":
			dst[0] = 0
		default:
			return fmt.Errorf("%s is not a bool", s)
		}
		return nil
	}
	switch dt {
	case Int8, Int16, Int32, Int64:
		v, err := strconv.ParseInt(s, 10, dt.Size()*8)
		if err != nil {
			return err
		}
		switch dt.Size() {
		case 1:
			dst[0] = byte(v)
		case 2:
			le.PutUint16(dst, uint16(v))
		case 4:
			le.PutUint32(dst, uint32(v))
		default:
			le.PutUint64(dst, uint64(v))
		}
		return nil
	case Uint8, Uint16, Uint32, Uint64:
		v, err := strconv.ParseUint(s, 10, dt.Size()*8)
		if err != nil {
			return err
		}
		switch dt.Size() {
		case 1:
			dst[0] = byte(v)
		case 2:
			le.PutUint16(dst, uint16(v))
		case 4:
			le.PutUint32(dst, uint32(v))
		default:
			le.PutUint64(dst, v)
		}
		return nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return err
	}
	switch dt {
	case Float32:
		le.PutUint32(dst, math.Float32bits(float32(v)))
	case Float64:
		le.PutUint64(dst, math.Float64bits(v))
	case Float16:
		le.PutUint16(dst, Float32ToFloat16(float32(v)))
	case BFloat16:
		le.PutUint16(dst, uint16(math.Float32bits(float32(v))>>16))
	default:
		return fmt.Errorf("unsupported %v", dt)
	}
	return nil
}

// Float32ToFloat16 converts to IEEE 754 half precision, rounding to nearest
// even; values too large become infinity.
func Float32ToFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23&0xff) - 127 + 15
	mant := b & 0x7fffff
	switch {
	case b&0x7fffffff == 0:
		return sign
	case b>>23&0xff == 0xff: // inf or NaN
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp >= 0x1f:
		return sign | 0x7c00
	case exp <= 0: // subnormal or zero
		if exp < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint32(14 - exp)
		h := uint16(mant >> shift)
		rem := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | h
	}
	h := sign | uint16(exp)<<10 | uint16(mant>>13)
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into the exponent, which is the correct rounding
	}
	return h
}
