package protocol

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"
	"unsafe"
)

// Tensor is a dense tensor: element type, shape and raw little-endian bytes in
// row-major order. It is the one tensor type of infermesh: the runtime reads
// and writes it, the wire carries its bytes as they are, and the API encodes
// it as JSON. Data is owned by whoever holds the Tensor; functions that keep a
// Tensor say so.
type Tensor struct {
	DType DType   `json:"dtype"`
	Shape []int64 `json:"shape"`
	Data  []byte  `json:"-"`
}

// NumElements is the product of the shape's dimensions (1 for a scalar).
func NumElements(shape []int64) int64 {
	n := int64(1)
	for _, d := range shape {
		n *= d
	}
	return n
}

// Validate checks that the type is supported, no dimension is negative and
// the data is exactly as long as the shape and type require.
func (t *Tensor) Validate() error {
	if !t.DType.Valid() {
		return fmt.Errorf("tensor: unsupported element type %v", t.DType)
	}
	n := int64(1)
	for _, d := range t.Shape {
		if d < 0 {
			return fmt.Errorf("tensor: negative dimension in shape %v", t.Shape)
		}
		if d > 0 && n > MaxTensorBytes/d {
			return fmt.Errorf("tensor: shape %v exceeds %d bytes", t.Shape, MaxTensorBytes)
		}
		n *= d
	}
	if want := n * int64(t.DType.Size()); int64(len(t.Data)) != want {
		return fmt.Errorf("tensor: %v %v needs %d bytes, have %d", t.DType, t.Shape, want, len(t.Data))
	}
	return nil
}

// String describes the tensor without its data, e.g. "float32[1 8 256]".
func (t *Tensor) String() string { return fmt.Sprintf("%v%v", t.DType, t.Shape) }

// littleEndian is true on every platform infermesh builds for today; the
// typed views below reinterpret bytes in place only when it holds.
var littleEndian = func() bool { x := uint16(1); return *(*byte)(unsafe.Pointer(&x)) == 1 }()

// NewTensor copies data into a new Tensor of the Go element type's DType.
func NewTensor[T Element](shape []int64, data []T) *Tensor {
	var zero T
	t := &Tensor{DType: dtypeOf(zero), Shape: append([]int64(nil), shape...)}
	size := int(unsafe.Sizeof(zero))
	t.Data = make([]byte, len(data)*size)
	if len(data) > 0 {
		copy(t.Data, unsafe.Slice((*byte)(unsafe.Pointer(&data[0])), len(t.Data)))
	}
	return t
}

// Element is the set of Go types a Tensor can be viewed as.
type Element interface {
	~float32 | ~float64 | ~int8 | ~uint8 | ~int16 | ~uint16 | ~int32 | ~uint32 | ~int64 | ~uint64 | ~bool
}

func dtypeOf(v any) DType {
	switch v.(type) {
	case float32:
		return Float32
	case float64:
		return Float64
	case int8:
		return Int8
	case uint8:
		return Uint8
	case int16:
		return Int16
	case uint16:
		return Uint16
	case int32:
		return Int32
	case uint32:
		return Uint32
	case int64:
		return Int64
	case uint64:
		return Uint64
	case bool:
		return Bool
	}
	return Invalid
}

// View returns the tensor's data as a []T sharing its memory. It fails when T
// does not match the tensor's type. Float16 tensors are viewed as []uint16.
func View[T Element](t *Tensor) ([]T, error) {
	var zero T
	want := dtypeOf(zero)
	if t.DType == Float16 || t.DType == BFloat16 {
		want = t.DType
		if _, ok := any(zero).(uint16); !ok {
			return nil, fmt.Errorf("tensor: view %v as uint16, not %T", t.DType, zero)
		}
	}
	if want != t.DType {
		return nil, fmt.Errorf("tensor: cannot view %v as %T", t.DType, zero)
	}
	size := int(unsafe.Sizeof(zero))
	if len(t.Data)%size != 0 {
		return nil, fmt.Errorf("tensor: %d bytes is not a whole number of %T", len(t.Data), zero)
	}
	if len(t.Data) == 0 {
		return []T{}, nil
	}
	if !littleEndian {
		return nil, fmt.Errorf("tensor: big-endian hosts are not supported")
	}
	if uintptr(unsafe.Pointer(&t.Data[0]))%uintptr(size) != 0 {
		// Misaligned (a sub-slice of a frame buffer): copy to an aligned one.
		aligned := make([]T, len(t.Data)/size)
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&aligned[0])), len(t.Data)), t.Data)
		return aligned, nil
	}
	return unsafe.Slice((*T)(unsafe.Pointer(&t.Data[0])), len(t.Data)/size), nil
}

// Float64s converts any numeric tensor to float64 values, for printing and
// comparing outputs whatever their type.
func (t *Tensor) Float64s() ([]float64, error) {
	size := t.DType.Size()
	if size == 0 || len(t.Data)%size != 0 {
		return nil, fmt.Errorf("tensor: bad %v data of %d bytes", t.DType, len(t.Data))
	}
	out := make([]float64, len(t.Data)/size)
	le := binary.LittleEndian
	for i := range out {
		b := t.Data[i*size:]
		switch t.DType {
		case Float32:
			out[i] = float64(math.Float32frombits(le.Uint32(b)))
		case Float64:
			out[i] = math.Float64frombits(le.Uint64(b))
		case Float16:
			out[i] = float64(Float16ToFloat32(le.Uint16(b)))
		case BFloat16:
			out[i] = float64(math.Float32frombits(uint32(le.Uint16(b)) << 16))
		case Int8:
			out[i] = float64(int8(b[0]))
		case Uint8:
			out[i] = float64(b[0])
		case Bool:
			out[i] = float64(b[0])
		case Int16:
			out[i] = float64(int16(le.Uint16(b)))
		case Uint16:
			out[i] = float64(le.Uint16(b))
		case Int32:
			out[i] = float64(int32(le.Uint32(b)))
		case Uint32:
			out[i] = float64(le.Uint32(b))
		case Int64:
			out[i] = float64(int64(le.Uint64(b)))
		case Uint64:
			out[i] = float64(le.Uint64(b))
		default:
			return nil, fmt.Errorf("tensor: unsupported element type %v", t.DType)
		}
	}
	return out, nil
}

// Float16ToFloat32 converts an IEEE 754 half-precision value.
func Float16ToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0 && mant == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal: normalise
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3ff
		return math.Float32frombits(sign | e<<23 | mant<<13)
	case exp == 0x1f:
		return math.Float32frombits(sign | 0xff<<23 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// MaxAbsDiff returns the largest absolute element-wise difference between two
// tensors of the same type and shape, converting both to float64. NaNs in
// the same place agree, as do equal infinities; a NaN against a number is an
// infinite difference.
func MaxAbsDiff(a, b *Tensor) (float64, error) {
	if a == nil || b == nil {
		return 0, fmt.Errorf("tensor: missing tensor to compare")
	}
	if a.DType != b.DType || !slices.Equal(a.Shape, b.Shape) {
		return 0, fmt.Errorf("tensor: %v differs from %v", a, b)
	}
	x, err := a.Float64s()
	if err != nil {
		return 0, err
	}
	y, err := b.Float64s()
	if err != nil {
		return 0, err
	}
	worst := 0.0
	for i := range x {
		switch {
		case x[i] == y[i], math.IsNaN(x[i]) && math.IsNaN(y[i]):
		case math.IsNaN(x[i]) || math.IsNaN(y[i]):
			return math.Inf(1), nil
		default:
			worst = max(worst, math.Abs(x[i]-y[i]))
		}
	}
	return worst, nil
}
