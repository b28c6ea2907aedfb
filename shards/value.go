package shards

import (
	"fmt"
	"unsafe"

	ort "github.com/yalue/onnxruntime_go"

	"github.com/infermesh/infermesh/protocol"
)

// toValue wraps a Tensor's bytes as an onnxruntime value without copying
// (unless the bytes are misaligned for the element type). The value refers
// to t.Data: keep t alive and unchanged until the value is destroyed.
func toValue(t *protocol.Tensor) (ort.Value, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	shape := ort.Shape(t.Shape)
	switch t.DType {
	case protocol.Float32:
		return newValue[float32](t, shape)
	case protocol.Float64:
		return newValue[float64](t, shape)
	case protocol.Int64:
		return newValue[int64](t, shape)
	case protocol.Int32:
		return newValue[int32](t, shape)
	case protocol.Int16:
		return newValue[int16](t, shape)
	case protocol.Int8:
		return newValue[int8](t, shape)
	case protocol.Uint8:
		return newValue[uint8](t, shape)
	case protocol.Uint16:
		return newValue[uint16](t, shape)
	case protocol.Uint32:
		return newValue[uint32](t, shape)
	case protocol.Uint64:
		return newValue[uint64](t, shape)
	case protocol.Bool:
		return newValue[bool](t, shape)
	case protocol.Float16, protocol.BFloat16:
		if len(shape) == 0 {
			return nil, fmt.Errorf("%v scalars are not supported", t.DType)
		}
		data := t.Data
		if len(data) == 0 {
			data = make([]byte, 2) // onnxruntime_go refuses an empty buffer even for a zero-size shape
		}
		return ort.NewCustomDataTensor(shape, data, ort.TensorElementDataType(t.DType))
	}
	return nil, fmt.Errorf("unsupported element type %v", t.DType)
}

func newValue[T protocol.Element](t *protocol.Tensor, shape ort.Shape) (ort.Value, error) {
	data, err := protocol.View[T](t)
	if err != nil {
		return nil, err
	}
	if len(shape) == 0 { // onnxruntime_go needs scalars made as scalars
		return ort.NewScalar(data[0])
	}
	return ort.NewTensor(shape, data)
}

// fromValue returns a Tensor sharing the Go-owned memory of an onnxruntime
// value (outputs that onnxruntime allocated are already copied to Go memory
// by onnxruntime_go, so the Tensor stays valid after the value is destroyed).
func fromValue(v ort.Value) (*protocol.Tensor, error) {
	switch x := v.(type) {
	case *ort.Tensor[float32]:
		return viewTensor(protocol.Float32, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[float64]:
		return viewTensor(protocol.Float64, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[int64]:
		return viewTensor(protocol.Int64, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[int32]:
		return viewTensor(protocol.Int32, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[int16]:
		return viewTensor(protocol.Int16, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[int8]:
		return viewTensor(protocol.Int8, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[uint8]:
		return viewTensor(protocol.Uint8, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[uint16]:
		return viewTensor(protocol.Uint16, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[uint32]:
		return viewTensor(protocol.Uint32, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[uint64]:
		return viewTensor(protocol.Uint64, x.GetShape(), x.GetData()), nil
	case *ort.Tensor[bool]:
		return viewTensor(protocol.Bool, x.GetShape(), x.GetData()), nil
	case *ort.Scalar[float32]:
		return scalarTensor(protocol.Float32, x.GetData()), nil
	case *ort.Scalar[float64]:
		return scalarTensor(protocol.Float64, x.GetData()), nil
	case *ort.Scalar[int64]:
		return scalarTensor(protocol.Int64, x.GetData()), nil
	case *ort.Scalar[int32]:
		return scalarTensor(protocol.Int32, x.GetData()), nil
	case *ort.Scalar[int16]:
		return scalarTensor(protocol.Int16, x.GetData()), nil
	case *ort.Scalar[int8]:
		return scalarTensor(protocol.Int8, x.GetData()), nil
	case *ort.Scalar[uint8]:
		return scalarTensor(protocol.Uint8, x.GetData()), nil
	case *ort.Scalar[uint16]:
		return scalarTensor(protocol.Uint16, x.GetData()), nil
	case *ort.Scalar[uint32]:
		return scalarTensor(protocol.Uint32, x.GetData()), nil
	case *ort.Scalar[uint64]:
		return scalarTensor(protocol.Uint64, x.GetData()), nil
	case *ort.Scalar[bool]:
		return scalarTensor(protocol.Bool, x.GetData()), nil
	case *ort.CustomDataTensor:
		return &protocol.Tensor{DType: protocol.DType(x.DataType()), Shape: append([]int64(nil), x.GetShape()...), Data: x.GetData()}, nil
	}
	return nil, fmt.Errorf("unsupported onnxruntime value %T", v)
}

func viewTensor[T protocol.Element](dt protocol.DType, shape ort.Shape, data []T) *protocol.Tensor {
	t := &protocol.Tensor{DType: dt, Shape: append([]int64(nil), shape...)}
	if len(data) > 0 {
		var zero T
		t.Data = unsafe.Slice((*byte)(unsafe.Pointer(&data[0])), len(data)*int(unsafe.Sizeof(zero)))
	} else {
		t.Data = []byte{}
	}
	return t
}

func scalarTensor[T protocol.Element](dt protocol.DType, v T) *protocol.Tensor {
	return viewTensor(dt, nil, []T{v})
}

// zeros makes a zero-filled tensor of a spec whose symbolic dimensions are
// bound by dims, unbound ones being 0 (an empty KV cache).
func zeros(spec TensorSpec, dims map[string]int64) *protocol.Tensor {
	shape := make([]int64, len(spec.Shape))
	for i, d := range spec.Shape {
		if d.Param == "" {
			shape[i] = d.Size
		} else {
			shape[i] = dims[d.Param]
		}
	}
	return &protocol.Tensor{DType: spec.DType, Shape: shape, Data: make([]byte, protocol.NumElements(shape)*int64(spec.DType.Size()))}
}

// bindDims records the size of each symbolic dimension of spec seen in t, and
// checks the fixed ones. It returns an error naming the tensor on a mismatch.
func bindDims(spec TensorSpec, t *protocol.Tensor, dims map[string]int64) error {
	if t.DType != spec.DType {
		return fmt.Errorf("input %q: got %v, want %v", spec.Name, t.DType, spec.DType)
	}
	if len(t.Shape) != len(spec.Shape) {
		return fmt.Errorf("input %q: got shape %v, want rank %d %v", spec.Name, t.Shape, len(spec.Shape), spec.Shape)
	}
	for i, d := range spec.Shape {
		got := t.Shape[i]
		switch {
		case d.Param == "":
			if got != d.Size {
				return fmt.Errorf("input %q: dimension %d is %d, want %d", spec.Name, i, got, d.Size)
			}
		case d.Param == "?":
		default:
			if prev, ok := dims[d.Param]; ok && prev != got {
				return fmt.Errorf("input %q: dimension %q is %d here but %d elsewhere", spec.Name, d.Param, got, prev)
			}
			dims[d.Param] = got
		}
	}
	return nil
}
