package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// Writer writes a version 3 GGUF file in one pass. Declare everything
// first — metadata with AddKV, tensors with AddTensor, in the order their
// data will follow — then give each tensor's data in that order, in as
// many pieces as convenient, with WriteRows (float32 values, quantized to
// the tensor's type) or WriteRaw (bytes already in the tensor's type).
// The header is written at the first data call, so a tensor need never be
// in memory at once. Close checks every tensor got all its data.
//
// A Writer is not safe for concurrent use. After an error every later call
// returns it; a file left by a failed Writer is incomplete.
type Writer struct {
	bw        *bufio.Writer
	closer    io.Closer
	kvs       []KV
	keys      map[string]bool
	tensors   []*TensorInfo
	names     map[string]bool
	alignment int64
	next      int64 // data offset of the next declared tensor
	started   bool  // header written
	cur       int   // tensor receiving data
	written   int64 // bytes of tensors[cur] written so far
	pos       int64 // bytes written to the file
	buf       []byte
	err       error
}

// NewWriter returns a Writer writing to w. Close flushes but does not
// close w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{
		bw:        bufio.NewWriterSize(w, 1<<20),
		keys:      map[string]bool{},
		names:     map[string]bool{},
		alignment: DefaultAlignment,
	}
}

// Create creates (or truncates) the file at path and returns a Writer to
// it; Close closes the file.
func Create(path string) (*Writer, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	w := NewWriter(f)
	w.closer = f
	return w, nil
}

func (w *Writer) fail(err error) error {
	if w.err == nil {
		w.err = err
	}
	return err
}

// valueTypeOf returns the GGUF type of a Go metadata value, as KV
// documents them.
func valueTypeOf(v any) (vt, et ValueType, ok bool) {
	switch v.(type) {
	case uint8:
		return ValueUint8, 0, true
	case int8:
		return ValueInt8, 0, true
	case uint16:
		return ValueUint16, 0, true
	case int16:
		return ValueInt16, 0, true
	case uint32:
		return ValueUint32, 0, true
	case int32:
		return ValueInt32, 0, true
	case float32:
		return ValueFloat32, 0, true
	case bool:
		return ValueBool, 0, true
	case string:
		return ValueString, 0, true
	case uint64:
		return ValueUint64, 0, true
	case int64:
		return ValueInt64, 0, true
	case float64:
		return ValueFloat64, 0, true
	case []uint8:
		return ValueArray, ValueUint8, true
	case []int8:
		return ValueArray, ValueInt8, true
	case []uint16:
		return ValueArray, ValueUint16, true
	case []int16:
		return ValueArray, ValueInt16, true
	case []uint32:
		return ValueArray, ValueUint32, true
	case []int32:
		return ValueArray, ValueInt32, true
	case []float32:
		return ValueArray, ValueFloat32, true
	case []bool:
		return ValueArray, ValueBool, true
	case []string:
		return ValueArray, ValueString, true
	case []uint64:
		return ValueArray, ValueUint64, true
	case []int64:
		return ValueArray, ValueInt64, true
	case []float64:
		return ValueArray, ValueFloat64, true
	}
	return 0, 0, false
}

// AddKV adds a metadata pair. value must have one of the Go types KV
// documents (a Go int is refused: say which width you mean). Setting
// general.alignment (a uint32 power of two) changes the data alignment.
func (w *Writer) AddKV(key string, value any) error {
	if w.err != nil {
		return w.err
	}
	if w.started {
		return w.fail(errors.New("gguf: AddKV after tensor data"))
	}
	if w.keys[key] {
		return w.fail(fmt.Errorf("gguf: metadata key %q added twice", key))
	}
	vt, et, ok := valueTypeOf(value)
	if !ok {
		return w.fail(fmt.Errorf("gguf: metadata %q: unsupported Go type %T", key, value))
	}
	if key == AlignmentKey {
		a, ok := value.(uint32)
		if !ok || a == 0 || a&(a-1) != 0 || a > maxAlignment {
			return w.fail(fmt.Errorf("gguf: %s must be a uint32 power of two up to %d, got %T %v", AlignmentKey, maxAlignment, value, value))
		}
		if len(w.tensors) > 0 {
			return w.fail(fmt.Errorf("gguf: set %s before adding tensors", AlignmentKey))
		}
		w.alignment = int64(a)
	}
	w.keys[key] = true
	w.kvs = append(w.kvs, KV{Key: key, Type: vt, ElemType: et, Value: value})
	return nil
}

// AddTensor declares a tensor of type t with dims in ggml order (dims[0]
// is the row length, the fastest-varying dimension: a numpy array of shape
// (rows, cols) has dims {cols, rows}). Any known type may be declared;
// only SupportedTypes can be given as float32 rows.
func (w *Writer) AddTensor(name string, t Type, dims ...int64) error {
	if w.err != nil {
		return w.err
	}
	if w.started {
		return w.fail(errors.New("gguf: AddTensor after tensor data"))
	}
	if w.names[name] {
		return w.fail(fmt.Errorf("gguf: tensor %s added twice", name))
	}
	if !t.Known() {
		return w.fail(fmt.Errorf("gguf: tensor %s: unknown type %d", name, uint32(t)))
	}
	if len(dims) == 0 || len(dims) > MaxDims {
		return w.fail(fmt.Errorf("gguf: tensor %s: %d dimensions (want 1 to %d)", name, len(dims), MaxDims))
	}
	elems := int64(1)
	for _, d := range dims {
		if d <= 0 || elems > math.MaxInt64/d {
			return w.fail(fmt.Errorf("gguf: tensor %s: bad dims %v", name, dims))
		}
		elems *= d
	}
	rb, err := t.RowBytes(dims[0])
	if err != nil {
		return w.fail(fmt.Errorf("gguf: tensor %s: %w", name, err))
	}
	ti := &TensorInfo{Name: name, Dims: append([]int64(nil), dims...), Type: t, Offset: w.next, Size: rb * (elems / dims[0])}
	w.next = alignUp(w.next+ti.Size, w.alignment)
	w.names[name] = true
	w.tensors = append(w.tensors, ti)
	return nil
}

func (w *Writer) write(b []byte) error {
	n, err := w.bw.Write(b)
	w.pos += int64(n)
	if err != nil {
		return w.fail(err)
	}
	return nil
}

func (w *Writer) u32(v uint32) error {
	return w.write(binary.LittleEndian.AppendUint32(w.buf[:0], v))
}

func (w *Writer) u64(v uint64) error {
	return w.write(binary.LittleEndian.AppendUint64(w.buf[:0], v))
}

func (w *Writer) str(s string) error {
	if err := w.u64(uint64(len(s))); err != nil {
		return err
	}
	_, err := w.bw.WriteString(s)
	w.pos += int64(len(s))
	if err != nil {
		return w.fail(err)
	}
	return nil
}

// zeros is padding.
var zeros [maxAlignment]byte

func (w *Writer) pad() error {
	return w.write(zeros[:alignUp(w.pos, w.alignment)-w.pos])
}

// header writes everything before the data section.
func (w *Writer) header() error {
	if w.started {
		return w.err
	}
	w.started = true
	w.buf = make([]byte, 0, 8)
	w.write([]byte(Magic))
	w.u32(Version)
	w.u64(uint64(len(w.tensors)))
	w.u64(uint64(len(w.kvs)))
	for _, kv := range w.kvs {
		w.str(kv.Key)
		w.u32(uint32(kv.Type))
		if kv.Type == ValueArray {
			w.u32(uint32(kv.ElemType))
		}
		w.value(kv.Value)
	}
	for _, t := range w.tensors {
		w.str(t.Name)
		w.u32(uint32(len(t.Dims)))
		for _, d := range t.Dims {
			w.u64(uint64(d))
		}
		w.u32(uint32(t.Type))
		w.u64(uint64(t.Offset))
	}
	w.pad()
	return w.err
}

// value writes a metadata value (without its type).
func (w *Writer) value(v any) {
	le := binary.LittleEndian
	switch x := v.(type) {
	case uint8:
		w.write([]byte{x})
	case int8:
		w.write([]byte{byte(x)})
	case uint16:
		w.write(le.AppendUint16(w.buf[:0], x))
	case int16:
		w.write(le.AppendUint16(w.buf[:0], uint16(x)))
	case uint32:
		w.u32(x)
	case int32:
		w.u32(uint32(x))
	case float32:
		w.u32(math.Float32bits(x))
	case bool:
		b := byte(0)
		if x {
			b = 1
		}
		w.write([]byte{b})
	case string:
		w.str(x)
	case uint64:
		w.u64(x)
	case int64:
		w.u64(uint64(x))
	case float64:
		w.u64(math.Float64bits(x))
	case []uint8:
		w.u64(uint64(len(x)))
		w.write(x)
	default:
		writeArray(w, v)
	}
}

func writeArray(w *Writer, v any) {
	each := func(n int, at func(int) any) {
		w.u64(uint64(n))
		for i := range n {
			w.value(at(i))
		}
	}
	switch x := v.(type) {
	case []int8:
		each(len(x), func(i int) any { return x[i] })
	case []uint16:
		each(len(x), func(i int) any { return x[i] })
	case []int16:
		each(len(x), func(i int) any { return x[i] })
	case []uint32:
		each(len(x), func(i int) any { return x[i] })
	case []int32:
		each(len(x), func(i int) any { return x[i] })
	case []float32:
		each(len(x), func(i int) any { return x[i] })
	case []bool:
		each(len(x), func(i int) any { return x[i] })
	case []string:
		each(len(x), func(i int) any { return x[i] })
	case []uint64:
		each(len(x), func(i int) any { return x[i] })
	case []int64:
		each(len(x), func(i int) any { return x[i] })
	case []float64:
		each(len(x), func(i int) any { return x[i] })
	}
}

// current returns the tensor receiving data, writing the header first.
func (w *Writer) current() (*TensorInfo, error) {
	if w.err != nil {
		return nil, w.err
	}
	if err := w.header(); err != nil {
		return nil, err
	}
	if w.cur >= len(w.tensors) {
		return nil, w.fail(errors.New("gguf: data written past the last declared tensor"))
	}
	return w.tensors[w.cur], nil
}

// advance records n bytes written to the current tensor and, once it is
// complete, pads to the alignment and moves to the next.
func (w *Writer) advance(n int64) error {
	w.written += n
	t := w.tensors[w.cur]
	if w.written < t.Size {
		return nil
	}
	w.cur++
	w.written = 0
	return w.pad()
}

// WriteRaw appends b, bytes already encoded in the current tensor's type,
// to the current tensor's data. b may end anywhere within the tensor but
// not past its end.
func (w *Writer) WriteRaw(b []byte) error {
	if len(b) == 0 {
		return w.err
	}
	t, err := w.current()
	if err != nil {
		return err
	}
	if left := t.Size - w.written; int64(len(b)) > left {
		return w.fail(fmt.Errorf("gguf: tensor %s: %d bytes given, only %d left", t.Name, len(b), left))
	}
	if err := w.write(b); err != nil {
		return err
	}
	return w.advance(int64(len(b)))
}

// WriteRows quantizes x, a whole number of rows (Dims[0] values each), to
// the current tensor's type and appends them to its data. The rows must
// not run past the tensor's end.
func (w *Writer) WriteRows(x []float32) error {
	t, err := w.current()
	if err != nil {
		return err
	}
	if !t.Type.Supported() {
		return w.fail(fmt.Errorf("tensor %s: %w", t.Name, errUnsupported(t.Type)))
	}
	rl, rb := t.RowLen(), t.RowBytes()
	if int64(len(x))%rl != 0 {
		return w.fail(fmt.Errorf("gguf: tensor %s: %d values is not a whole number of rows of %d", t.Name, len(x), rl))
	}
	rows := int64(len(x)) / rl
	if rows*rb > t.Size-w.written {
		return w.fail(fmt.Errorf("gguf: tensor %s: %d rows given, only %d left", t.Name, rows, (t.Size-w.written)/rb))
	}
	// Quantize a bounded number of rows at a time.
	step := max(1, readChunk/rb)
	for done := int64(0); done < rows; {
		k := min(rows-done, step)
		need := int(k * rb)
		if cap(w.buf) < need {
			w.buf = make([]byte, need)
		}
		out := w.buf[:need]
		if err := quantize(t.Type, x[done*rl:(done+k)*rl], out); err != nil {
			return w.fail(fmt.Errorf("tensor %s: %w", t.Name, err))
		}
		if err := w.write(out); err != nil {
			return err
		}
		if err := w.advance(int64(need)); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// Close writes the header if no data was written yet (a file without
// tensors), checks every declared tensor got all its data, flushes, and
// closes the file Create opened.
func (w *Writer) Close() error {
	err := w.err
	if err == nil {
		err = w.header()
	}
	if err == nil && w.cur < len(w.tensors) {
		t := w.tensors[w.cur]
		err = fmt.Errorf("gguf: tensor %s: %d of %d bytes written", t.Name, w.written, t.Size)
	}
	if ferr := w.bw.Flush(); err == nil && ferr != nil {
		err = ferr
	}
	if w.closer != nil {
		if cerr := w.closer.Close(); err == nil {
			err = cerr
		}
		w.closer = nil
	}
	if w.err == nil {
		w.err = errors.New("gguf: Writer is closed")
	}
	return err
}
