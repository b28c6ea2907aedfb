package gguf

import (
	"fmt"
	"strings"
)

// Type is a ggml tensor type, as stored in a tensor info (ggml.h's
// ggml_type). Every ID ggml has assigned is named, so errors can say which
// type a file uses; only the types in SupportedTypes can be dequantized.
type Type uint32

// ggml type IDs. Gaps (4, 5) are types ggml removed long ago.
const (
	TypeF32       Type = 0
	TypeF16       Type = 1
	TypeQ4_0      Type = 2
	TypeQ4_1      Type = 3
	TypeQ5_0      Type = 6
	TypeQ5_1      Type = 7
	TypeQ8_0      Type = 8
	TypeQ8_1      Type = 9
	TypeQ2_K      Type = 10
	TypeQ3_K      Type = 11
	TypeQ4_K      Type = 12
	TypeQ5_K      Type = 13
	TypeQ6_K      Type = 14
	TypeQ8_K      Type = 15
	TypeIQ2_XXS   Type = 16
	TypeIQ2_XS    Type = 17
	TypeIQ3_XXS   Type = 18
	TypeIQ1_S     Type = 19
	TypeIQ4_NL    Type = 20
	TypeIQ3_S     Type = 21
	TypeIQ2_S     Type = 22
	TypeIQ4_XS    Type = 23
	TypeI8        Type = 24
	TypeI16       Type = 25
	TypeI32       Type = 26
	TypeI64       Type = 27
	TypeF64       Type = 28
	TypeIQ1_M     Type = 29
	TypeBF16      Type = 30
	TypeQ4_0_4_4  Type = 31 // deprecated by ggml (repacked at load time now)
	TypeQ4_0_4_8  Type = 32 // deprecated
	TypeQ4_0_8_8  Type = 33 // deprecated
	TypeTQ1_0     Type = 34
	TypeTQ2_0     Type = 35
	TypeIQ4_NL4_4 Type = 36 // deprecated
	TypeIQ4_NL4_8 Type = 37 // deprecated
	TypeIQ4_NL8_8 Type = 38 // deprecated
	TypeMXFP4     Type = 39
	TypeNVFP4     Type = 40
	TypeQ1_0      Type = 41
	TypeQ2_0      Type = 42
)

// typeInfo is a type's name and block layout: blockSize elements are
// stored in blockBytes bytes.
type typeInfo struct {
	name       string
	blockSize  int
	blockBytes int
}

// qkK is the number of elements in a k-quant super-block (QK_K).
const qkK = 256

var types = map[Type]typeInfo{
	TypeF32:       {"F32", 1, 4},
	TypeF16:       {"F16", 1, 2},
	TypeQ4_0:      {"Q4_0", 32, 2 + 16},
	TypeQ4_1:      {"Q4_1", 32, 2 + 2 + 16},
	TypeQ5_0:      {"Q5_0", 32, 2 + 4 + 16},
	TypeQ5_1:      {"Q5_1", 32, 2 + 2 + 4 + 16},
	TypeQ8_0:      {"Q8_0", 32, 2 + 32},
	TypeQ8_1:      {"Q8_1", 32, 4 + 4 + 32},
	TypeQ2_K:      {"Q2_K", qkK, 2 + 2 + qkK/16 + qkK/4},
	TypeQ3_K:      {"Q3_K", qkK, 2 + qkK/4 + qkK/8 + 12},
	TypeQ4_K:      {"Q4_K", qkK, 2 + 2 + 12 + qkK/2},
	TypeQ5_K:      {"Q5_K", qkK, 2 + 2 + 12 + qkK/8 + qkK/2},
	TypeQ6_K:      {"Q6_K", qkK, qkK/2 + qkK/4 + qkK/16 + 2},
	TypeQ8_K:      {"Q8_K", qkK, 4 + qkK + qkK/8},
	TypeIQ2_XXS:   {"IQ2_XXS", qkK, 2 + qkK/4},
	TypeIQ2_XS:    {"IQ2_XS", qkK, 2 + qkK/4 + qkK/32},
	TypeIQ3_XXS:   {"IQ3_XXS", qkK, 2 + qkK/4 + qkK/8},
	TypeIQ1_S:     {"IQ1_S", qkK, 2 + qkK/8 + qkK/16},
	TypeIQ4_NL:    {"IQ4_NL", 32, 2 + 16},
	TypeIQ3_S:     {"IQ3_S", qkK, 2 + qkK/4 + qkK/8 + qkK/32 + 4},
	TypeIQ2_S:     {"IQ2_S", qkK, 2 + qkK/4 + qkK/16},
	TypeIQ4_XS:    {"IQ4_XS", qkK, 2 + 2 + qkK/2 + qkK/64},
	TypeI8:        {"I8", 1, 1},
	TypeI16:       {"I16", 1, 2},
	TypeI32:       {"I32", 1, 4},
	TypeI64:       {"I64", 1, 8},
	TypeF64:       {"F64", 1, 8},
	TypeIQ1_M:     {"IQ1_M", qkK, qkK/8 + qkK/16 + qkK/32},
	TypeBF16:      {"BF16", 1, 2},
	TypeQ4_0_4_4:  {"Q4_0_4_4", 32, 2 + 16},
	TypeQ4_0_4_8:  {"Q4_0_4_8", 32, 2 + 16},
	TypeQ4_0_8_8:  {"Q4_0_8_8", 32, 2 + 16},
	TypeTQ1_0:     {"TQ1_0", qkK, 2 + 4*13},
	TypeTQ2_0:     {"TQ2_0", qkK, 2 + 64},
	TypeIQ4_NL4_4: {"IQ4_NL_4_4", 32, 2 + 16},
	TypeIQ4_NL4_8: {"IQ4_NL_4_8", 32, 2 + 16},
	TypeIQ4_NL8_8: {"IQ4_NL_8_8", 32, 2 + 16},
	TypeMXFP4:     {"MXFP4", 32, 1 + 16},
	TypeNVFP4:     {"NVFP4", 64, 4 + 32},
	TypeQ1_0:      {"Q1_0", 128, 2 + 16},
	TypeQ2_0:      {"Q2_0", 64, 2 + 16},
}

// SupportedTypes are the types ReadRows dequantizes and the Writer
// quantizes to, in the order errors list them.
var SupportedTypes = []Type{TypeF32, TypeF16, TypeBF16, TypeQ8_0, TypeQ4_0, TypeQ4_K, TypeQ5_K, TypeQ6_K}

// String returns ggml's name for t, or "type(N)" for an ID ggml never used.
func (t Type) String() string {
	if ti, ok := types[t]; ok {
		return ti.name
	}
	return fmt.Sprintf("type(%d)", uint32(t))
}

// Known reports whether t is a ggml type ID whose block layout is known.
func (t Type) Known() bool {
	_, ok := types[t]
	return ok
}

// Supported reports whether ReadRows can dequantize t and the Writer can
// quantize to it.
func (t Type) Supported() bool {
	for _, s := range SupportedTypes {
		if s == t {
			return true
		}
	}
	return false
}

// BlockSize is the number of elements in one block of t (1 for plain
// types, 32 for Q8_0/Q4_0, 256 for the k-quants), 0 for an unknown type.
func (t Type) BlockSize() int { return types[t].blockSize }

// BlockBytes is the number of bytes one block of t takes, 0 for an unknown
// type.
func (t Type) BlockBytes() int { return types[t].blockBytes }

// RowBytes returns the bytes a row of n elements of t takes. n must be a
// positive multiple of t's block size.
func (t Type) RowBytes(n int64) (int64, error) {
	ti, ok := types[t]
	if !ok {
		return 0, fmt.Errorf("unknown tensor type %d", uint32(t))
	}
	if n <= 0 || n%int64(ti.blockSize) != 0 {
		return 0, fmt.Errorf("a row of %d elements is not a positive multiple of %s's block size %d", n, ti.name, ti.blockSize)
	}
	return n / int64(ti.blockSize) * int64(ti.blockBytes), nil
}

// UnsupportedTypeError is returned for a tensor type that ReadRows cannot
// dequantize or the Writer cannot quantize to. It matches ErrUnsupported
// with errors.Is.
type UnsupportedTypeError struct{ Type Type }

func (e *UnsupportedTypeError) Error() string {
	names := make([]string, len(SupportedTypes))
	for i, s := range SupportedTypes {
		names[i] = s.String()
	}
	return fmt.Sprintf("type %s is not supported (supported: %s)", e.Type, strings.Join(names, ", "))
}

// Is reports whether target is ErrUnsupported.
func (e *UnsupportedTypeError) Is(target error) bool { return target == ErrUnsupported }

func errUnsupported(t Type) error { return &UnsupportedTypeError{t} }

// ValueType is the type of a metadata value (gguf.h's gguf_type).
type ValueType uint32

// Metadata value types.
const (
	ValueUint8   ValueType = 0
	ValueInt8    ValueType = 1
	ValueUint16  ValueType = 2
	ValueInt16   ValueType = 3
	ValueUint32  ValueType = 4
	ValueInt32   ValueType = 5
	ValueFloat32 ValueType = 6
	ValueBool    ValueType = 7
	ValueString  ValueType = 8
	ValueArray   ValueType = 9
	ValueUint64  ValueType = 10
	ValueInt64   ValueType = 11
	ValueFloat64 ValueType = 12
)

var valueTypeNames = [...]string{"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array", "uint64", "int64", "float64"}

// valueSizes is each scalar type's size in bytes (0 for string and array).
var valueSizes = [...]int{1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8}

// String returns the type's name as the GGUF spec spells it, lower case.
func (v ValueType) String() string {
	if int(v) < len(valueTypeNames) {
		return valueTypeNames[v]
	}
	return fmt.Sprintf("value_type(%d)", uint32(v))
}

func (v ValueType) valid() bool { return int(v) < len(valueTypeNames) }
