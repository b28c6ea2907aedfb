package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"os"
)

// Format constants.
const (
	// Magic is the first four bytes of every GGUF file.
	Magic = "GGUF"
	// Version is the version the Writer writes; Open reads 2 and 3.
	Version = 3
	// DefaultAlignment is the data alignment, in bytes, of a file without
	// general.alignment.
	DefaultAlignment = 32
	// AlignmentKey is the metadata key overriding DefaultAlignment (a
	// uint32 power of two).
	AlignmentKey = "general.alignment"
	// MaxDims is the most dimensions a tensor may have (GGML_MAX_DIMS).
	MaxDims = 4
)

// maxAlignment bounds general.alignment, so that padding stays small.
const maxAlignment = 1 << 16

// Minimum encoded sizes, used to bound counts by the bytes left in a file
// before anything is allocated from them.
const (
	minKVBytes     = 8 + 4 + 1         // key length, value type, one byte of value
	minTensorBytes = 8 + 4 + 8 + 4 + 8 // name length, n_dims, one dim, type, offset
	minStringBytes = 8                 // length of an empty string
)

// Errors a reader returns, wrapped with the details.
var (
	// ErrMalformed is returned for a file that breaks the GGUF format or
	// claims more than it holds.
	ErrMalformed = errors.New("gguf: malformed file")
	// ErrUnsupported is returned for a valid file using something this
	// package does not implement (a version, a tensor type to dequantize).
	ErrUnsupported = errors.New("gguf: unsupported")
	// ErrNoKey is returned by the typed metadata helpers for a missing key.
	ErrNoKey = errors.New("gguf: no such metadata key")
)

// KV is one metadata key/value pair. Value holds the Go type matching Type:
// uint8, int8, uint16, int16, uint32, int32, float32, bool, string, uint64,
// int64 or float64; an array (Type ValueArray) holds a slice of its
// ElemType's Go type ([]uint8 ... []string). Arrays of arrays are refused,
// as ggml refuses them.
type KV struct {
	Key      string
	Type     ValueType
	ElemType ValueType // element type of an array; 0 otherwise
	Value    any
}

// TensorInfo describes one tensor of a file.
type TensorInfo struct {
	Name string
	// Dims are the sizes in ggml order: Dims[0] (ne[0]) is the contiguous,
	// fastest-varying dimension, the length of a row. Shape gives the
	// row-major (numpy) order.
	Dims []int64
	Type Type
	// Offset is where the tensor's data starts, relative to the data
	// section (File.DataOffset).
	Offset int64
	// Size is the tensor's data length in bytes.
	Size int64
}

// Shape returns the dimensions in row-major (numpy, PyTorch) order: Dims
// reversed.
func (t *TensorInfo) Shape() []int64 {
	s := make([]int64, len(t.Dims))
	for i, d := range t.Dims {
		s[len(s)-1-i] = d
	}
	return s
}

// Elements is the number of elements of the tensor.
func (t *TensorInfo) Elements() int64 {
	n := int64(1)
	for _, d := range t.Dims {
		n *= d
	}
	return n
}

// RowLen is the number of elements in a row, Dims[0].
func (t *TensorInfo) RowLen() int64 { return t.Dims[0] }

// Rows is the number of rows: the product of all dimensions but Dims[0].
func (t *TensorInfo) Rows() int64 { return t.Elements() / t.Dims[0] }

// RowBytes is the bytes one row takes in the file.
func (t *TensorInfo) RowBytes() int64 { return t.Size / t.Rows() }

// File is an open GGUF file. Its metadata and tensor infos are read by Open;
// tensor data is read on demand with ReadAt, never all at once. Its methods
// are safe for concurrent use until Close.
type File struct {
	// Version is the file's GGUF version (2 or 3).
	Version uint32
	// Alignment is the data alignment in bytes.
	Alignment int64
	// DataOffset is where the data section starts in the file.
	DataOffset int64

	meta    Metadata
	tensors []*TensorInfo
	byName  map[string]*TensorInfo
	r       io.ReaderAt
	size    int64
	closer  io.Closer
}

// Open opens and parses the GGUF file at path. The file stays open for
// ReadRows until Close.
func Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	gf, err := NewFile(f, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	gf.closer = f
	return gf, nil
}

// NewFile parses a GGUF file of size bytes read through r. Close does not
// close r.
func NewFile(r io.ReaderAt, size int64) (*File, error) {
	p := &parser{br: bufio.NewReaderSize(io.NewSectionReader(r, 0, size), 64<<10), size: size}
	f := &File{r: r, size: size, Alignment: DefaultAlignment}
	if err := p.header(f); err != nil {
		return nil, err
	}
	return f, nil
}

// Close closes the file opened by Open.
func (f *File) Close() error {
	if f.closer == nil {
		return nil
	}
	return f.closer.Close()
}

// Size is the file's size in bytes.
func (f *File) Size() int64 { return f.size }

// Metadata returns the file's metadata.
func (f *File) Metadata() *Metadata { return &f.meta }

// Tensors returns the tensor infos in file order. The caller must not
// modify them.
func (f *File) Tensors() []*TensorInfo { return f.tensors }

// Tensor returns the tensor named name.
func (f *File) Tensor(name string) (*TensorInfo, bool) {
	t, ok := f.byName[name]
	return t, ok
}

// parser reads a file's header sequentially, knowing how many bytes are
// left so that no count is trusted beyond what the file can hold.
type parser struct {
	br   *bufio.Reader
	pos  int64
	size int64
	buf  [8]byte
}

func (p *parser) left() int64 { return p.size - p.pos }

func (p *parser) read(n int) ([]byte, error) {
	if int64(n) > p.left() {
		return nil, fmt.Errorf("%w: truncated at byte %d (file is %d bytes)", ErrMalformed, p.pos, p.size)
	}
	b := p.buf[:n]
	if _, err := io.ReadFull(p.br, b); err != nil {
		return nil, fmt.Errorf("%w: read at byte %d: %v", ErrMalformed, p.pos, err)
	}
	p.pos += int64(n)
	return b, nil
}

func (p *parser) u32() (uint32, error) {
	b, err := p.read(4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

func (p *parser) u64() (uint64, error) {
	b, err := p.read(8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// count reads a u64 count of items taking at least minBytes each.
func (p *parser) count(what string, minBytes int64) (int, error) {
	n, err := p.u64()
	if err != nil {
		return 0, err
	}
	if n > uint64(p.left()/minBytes) {
		return 0, fmt.Errorf("%w: %s %d exceeds what the %d bytes left can hold", ErrMalformed, what, n, p.left())
	}
	return int(n), nil
}

func (p *parser) str(what string) (string, error) {
	n, err := p.u64()
	if err != nil {
		return "", err
	}
	if n > uint64(p.left()) {
		return "", fmt.Errorf("%w: %s: string length %d exceeds the %d bytes left", ErrMalformed, what, n, p.left())
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(p.br, b); err != nil {
		return "", fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
	}
	p.pos += int64(n)
	return string(b), nil
}

func (p *parser) header(f *File) error {
	b, err := p.read(4)
	if err != nil {
		return err
	}
	if string(b) != Magic {
		return fmt.Errorf("%w: not a GGUF file (magic %q)", ErrMalformed, b)
	}
	v, err := p.u32()
	if err != nil {
		return err
	}
	switch {
	case v == 2 || v == 3:
	case v == 1:
		return fmt.Errorf("%w: GGUF version 1 (32-bit counts, 2023) is not supported: convert the file with a current llama.cpp", ErrUnsupported)
	case v&0xffff == 0 && bits.ReverseBytes32(v) <= 3:
		return fmt.Errorf("%w: big-endian GGUF (version %d) is not supported", ErrUnsupported, bits.ReverseBytes32(v))
	default:
		return fmt.Errorf("%w: GGUF version %d is not supported (only 2 and 3)", ErrUnsupported, v)
	}
	f.Version = v
	nTensors, err := p.count("tensor count", minTensorBytes)
	if err != nil {
		return err
	}
	nKV, err := p.count("metadata count", minKVBytes)
	if err != nil {
		return err
	}
	f.meta.kvs = make([]KV, 0, nKV)
	f.meta.index = make(map[string]int, nKV)
	for i := range nKV {
		kv, err := p.kv(i)
		if err != nil {
			return err
		}
		if _, dup := f.meta.index[kv.Key]; dup {
			return fmt.Errorf("%w: metadata key %q appears twice", ErrMalformed, kv.Key)
		}
		f.meta.index[kv.Key] = len(f.meta.kvs)
		f.meta.kvs = append(f.meta.kvs, kv)
	}
	if kv, ok := f.meta.Lookup(AlignmentKey); ok {
		a, ok := kv.Value.(uint32)
		if !ok {
			return fmt.Errorf("%w: %s is %s, want uint32", ErrMalformed, AlignmentKey, kv.Type)
		}
		if a == 0 || a&(a-1) != 0 || a > maxAlignment {
			return fmt.Errorf("%w: %s %d is not a power of two up to %d", ErrMalformed, AlignmentKey, a, maxAlignment)
		}
		f.Alignment = int64(a)
	}
	if int64(nTensors) > p.left()/minTensorBytes {
		return fmt.Errorf("%w: tensor count %d exceeds what the %d bytes left can hold", ErrMalformed, nTensors, p.left())
	}
	f.tensors = make([]*TensorInfo, 0, nTensors)
	f.byName = make(map[string]*TensorInfo, nTensors)
	for i := range nTensors {
		t, err := p.tensor(i, f.Alignment)
		if err != nil {
			return err
		}
		if _, dup := f.byName[t.Name]; dup {
			return fmt.Errorf("%w: tensor %q appears twice", ErrMalformed, t.Name)
		}
		f.byName[t.Name] = t
		f.tensors = append(f.tensors, t)
	}
	f.DataOffset = alignUp(p.pos, f.Alignment)
	for _, t := range f.tensors {
		// Offset and Size are at most the file size each, so no overflow.
		if t.Offset > f.size || t.Size > f.size || f.DataOffset+t.Offset+t.Size > f.size {
			return fmt.Errorf("%w: tensor %s: data [%d, +%d) at offset %d lies past the end of the %d-byte file",
				ErrMalformed, t.Name, t.Offset, t.Size, f.DataOffset, f.size)
		}
	}
	return nil
}

func (p *parser) kv(i int) (KV, error) {
	key, err := p.str(fmt.Sprintf("metadata key #%d", i))
	if err != nil {
		return KV{}, err
	}
	vt, err := p.u32()
	if err != nil {
		return KV{}, fmt.Errorf("metadata %q: %w", key, err)
	}
	kv := KV{Key: key, Type: ValueType(vt)}
	if !kv.Type.valid() {
		return KV{}, fmt.Errorf("%w: metadata %q: unknown value type %d", ErrMalformed, key, vt)
	}
	if kv.Type == ValueArray {
		var et uint32
		if et, err = p.u32(); err != nil {
			return KV{}, fmt.Errorf("metadata %q: %w", key, err)
		}
		kv.ElemType = ValueType(et)
		if !kv.ElemType.valid() {
			return KV{}, fmt.Errorf("%w: metadata %q: unknown array element type %d", ErrMalformed, key, et)
		}
		if kv.ElemType == ValueArray {
			return KV{}, fmt.Errorf("%w: metadata %q: arrays of arrays are not supported", ErrUnsupported, key)
		}
		kv.Value, err = p.array(key, kv.ElemType)
	} else {
		kv.Value, err = p.scalar(key, kv.Type)
	}
	if err != nil {
		return KV{}, fmt.Errorf("metadata %q: %w", key, err)
	}
	return kv, nil
}

func (p *parser) scalar(key string, vt ValueType) (any, error) {
	if vt == ValueString {
		return p.str(key)
	}
	b, err := p.read(valueSizes[vt])
	if err != nil {
		return nil, err
	}
	return decodeScalar(vt, b)
}

// decodeScalar decodes a fixed-size value of type vt from b.
func decodeScalar(vt ValueType, b []byte) (any, error) {
	le := binary.LittleEndian
	switch vt {
	case ValueUint8:
		return b[0], nil
	case ValueInt8:
		return int8(b[0]), nil
	case ValueUint16:
		return le.Uint16(b), nil
	case ValueInt16:
		return int16(le.Uint16(b)), nil
	case ValueUint32:
		return le.Uint32(b), nil
	case ValueInt32:
		return int32(le.Uint32(b)), nil
	case ValueFloat32:
		return math.Float32frombits(le.Uint32(b)), nil
	case ValueBool:
		if b[0] > 1 {
			return nil, fmt.Errorf("%w: bool byte %d is neither 0 nor 1", ErrMalformed, b[0])
		}
		return b[0] == 1, nil
	case ValueUint64:
		return le.Uint64(b), nil
	case ValueInt64:
		return int64(le.Uint64(b)), nil
	case ValueFloat64:
		return math.Float64frombits(le.Uint64(b)), nil
	}
	return nil, fmt.Errorf("%w: value type %s is not a scalar", ErrMalformed, vt)
}

func (p *parser) array(key string, et ValueType) (any, error) {
	minBytes := int64(valueSizes[et])
	if et == ValueString {
		minBytes = minStringBytes
	}
	n, err := p.count("array length", minBytes)
	if err != nil {
		return nil, err
	}
	if et == ValueString {
		s := make([]string, n)
		for i := range s {
			if s[i], err = p.str(fmt.Sprintf("%s[%d]", key, i)); err != nil {
				return nil, err
			}
		}
		return s, nil
	}
	raw := make([]byte, int64(n)*minBytes)
	if _, err := io.ReadFull(p.br, raw); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	p.pos += int64(len(raw))
	le := binary.LittleEndian
	switch et {
	case ValueUint8:
		return raw, nil
	case ValueInt8:
		return fill(n, func(i int) int8 { return int8(raw[i]) }), nil
	case ValueUint16:
		return fill(n, func(i int) uint16 { return le.Uint16(raw[2*i:]) }), nil
	case ValueInt16:
		return fill(n, func(i int) int16 { return int16(le.Uint16(raw[2*i:])) }), nil
	case ValueUint32:
		return fill(n, func(i int) uint32 { return le.Uint32(raw[4*i:]) }), nil
	case ValueInt32:
		return fill(n, func(i int) int32 { return int32(le.Uint32(raw[4*i:])) }), nil
	case ValueFloat32:
		return fill(n, func(i int) float32 { return math.Float32frombits(le.Uint32(raw[4*i:])) }), nil
	case ValueUint64:
		return fill(n, func(i int) uint64 { return le.Uint64(raw[8*i:]) }), nil
	case ValueInt64:
		return fill(n, func(i int) int64 { return int64(le.Uint64(raw[8*i:])) }), nil
	case ValueFloat64:
		return fill(n, func(i int) float64 { return math.Float64frombits(le.Uint64(raw[8*i:])) }), nil
	case ValueBool:
		out := make([]bool, n)
		for i, c := range raw {
			if c > 1 {
				return nil, fmt.Errorf("%w: %s[%d]: bool byte %d is neither 0 nor 1", ErrMalformed, key, i, c)
			}
			out[i] = c == 1
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w: array element type %s", ErrMalformed, et)
}

func fill[T any](n int, f func(int) T) []T {
	out := make([]T, n)
	for i := range out {
		out[i] = f(i)
	}
	return out
}

func (p *parser) tensor(i int, alignment int64) (*TensorInfo, error) {
	name, err := p.str(fmt.Sprintf("tensor #%d name", i))
	if err != nil {
		return nil, err
	}
	wrap := func(err error) error { return fmt.Errorf("tensor %s: %w", name, err) }
	nd, err := p.u32()
	if err != nil {
		return nil, wrap(err)
	}
	if nd == 0 || nd > MaxDims {
		return nil, wrap(fmt.Errorf("%w: %d dimensions (want 1 to %d)", ErrMalformed, nd, MaxDims))
	}
	t := &TensorInfo{Name: name, Dims: make([]int64, nd)}
	elems := int64(1)
	for d := range t.Dims {
		v, err := p.u64()
		if err != nil {
			return nil, wrap(err)
		}
		if v == 0 || v > math.MaxInt64 {
			return nil, wrap(fmt.Errorf("%w: dimension %d is %d", ErrMalformed, d, v))
		}
		hi, lo := bits.Mul64(uint64(elems), v)
		if hi != 0 || lo > math.MaxInt64 {
			return nil, wrap(fmt.Errorf("%w: element count overflows", ErrMalformed))
		}
		t.Dims[d] = int64(v)
		elems = int64(lo)
	}
	ty, err := p.u32()
	if err != nil {
		return nil, wrap(err)
	}
	t.Type = Type(ty)
	if !t.Type.Known() {
		return nil, wrap(fmt.Errorf("%w: unknown tensor type %d", ErrMalformed, ty))
	}
	off, err := p.u64()
	if err != nil {
		return nil, wrap(err)
	}
	if off > uint64(p.size) {
		return nil, wrap(fmt.Errorf("%w: data offset %d lies past the end of the %d-byte file", ErrMalformed, off, p.size))
	}
	t.Offset = int64(off)
	if t.Offset%alignment != 0 {
		return nil, wrap(fmt.Errorf("%w: data offset %d is not a multiple of the alignment %d", ErrMalformed, off, alignment))
	}
	bs := int64(t.Type.BlockSize())
	if t.Dims[0]%bs != 0 {
		return nil, wrap(fmt.Errorf("%w: row length %d is not a multiple of %s's block size %d", ErrMalformed, t.Dims[0], t.Type, bs))
	}
	// elems/bs*blockBytes can exceed int64 only for tensors far larger
	// than any file; check against the file size.
	blocks := elems / bs
	if blocks > p.size/int64(t.Type.BlockBytes()) {
		return nil, wrap(fmt.Errorf("%w: %d elements of %s do not fit in the %d-byte file", ErrMalformed, elems, t.Type, p.size))
	}
	t.Size = blocks * int64(t.Type.BlockBytes())
	return t, nil
}

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }
