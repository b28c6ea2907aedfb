package protocol

import "fmt"

// DType is a tensor element type. Its numeric value is ONNX's
// TensorProto.DataType code, so it converts to and from ONNX files and
// onnxruntime without a table; its text form ("float32", "int64", ...) is what
// manifests and the HTTP API use.
type DType int32

// The element types infermesh carries. Values are ONNX's codes.
const (
	Invalid  DType = 0
	Float32  DType = 1
	Uint8    DType = 2
	Int8     DType = 3
	Uint16   DType = 4
	Int16    DType = 5
	Int32    DType = 6
	Int64    DType = 7
	Bool     DType = 9
	Float16  DType = 10
	Float64  DType = 11
	Uint32   DType = 12
	Uint64   DType = 13
	BFloat16 DType = 16
)

var dtypeNames = map[DType]string{
	Float32: "float32", Uint8: "uint8", Int8: "int8", Uint16: "uint16", Int16: "int16",
	Int32: "int32", Int64: "int64", Bool: "bool", Float16: "float16", Float64: "float64",
	Uint32: "uint32", Uint64: "uint64", BFloat16: "bfloat16",
}

var dtypeSizes = map[DType]int{
	Float32: 4, Uint8: 1, Int8: 1, Uint16: 2, Int16: 2, Int32: 4, Int64: 8, Bool: 1,
	Float16: 2, Float64: 8, Uint32: 4, Uint64: 8, BFloat16: 2,
}

// String returns the type's text name, or "dtype(N)" for a type infermesh
// does not carry.
func (d DType) String() string {
	if s, ok := dtypeNames[d]; ok {
		return s
	}
	return fmt.Sprintf("dtype(%d)", int32(d))
}

// Size is the number of bytes of one element, or 0 for an unsupported type.
func (d DType) Size() int { return dtypeSizes[d] }

// Valid reports whether infermesh can carry tensors of this type.
func (d DType) Valid() bool { return dtypeSizes[d] != 0 }

// ParseDType parses a text name such as "float32".
func ParseDType(s string) (DType, error) {
	for d, name := range dtypeNames {
		if name == s {
			return d, nil
		}
	}
	return Invalid, fmt.Errorf("unknown dtype %q", s)
}

// MarshalText implements encoding.TextMarshaler.
func (d DType) MarshalText() ([]byte, error) {
	if !d.Valid() {
		return nil, fmt.Errorf("cannot encode unsupported %v", d)
	}
	return []byte(d.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *DType) UnmarshalText(b []byte) error {
	v, err := ParseDType(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}
