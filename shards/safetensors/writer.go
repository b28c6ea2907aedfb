package safetensors

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
)

// headerAlign pads the header with spaces so the data section starts at a
// multiple of 8 bytes, as the reference writer does.
const headerAlign = 8

// Writer streams a safetensors file: the header first (from the infos, in
// the given order), then each tensor's bytes in that order. It is not safe
// for concurrent use.
type Writer struct {
	f       *os.File
	bw      *bufio.Writer
	infos   []Info
	next    int
	err     error // sticky
	closed  bool
	removed bool
}

// EncodeHeader returns the 8-byte length and JSON header of a file holding
// infos in order: "__metadata__" first (when metadata is non-empty), then
// each tensor, padded with spaces to a multiple of 8 bytes. Sizes are
// computed from dtype and shape; a non-zero Info.Size must agree.
func EncodeHeader(infos []Info, metadata map[string]string) ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString("{")
	first := true
	sep := func() {
		if !first {
			buf.WriteString(",")
		}
		first = false
	}
	if len(metadata) > 0 {
		sep()
		m, err := json.Marshal(metadata) // keys sorted
		if err != nil {
			return nil, err
		}
		buf.WriteString(`"` + metadataKey + `":`)
		buf.Write(m)
	}
	seen := map[string]bool{}
	var off int64
	for _, in := range infos {
		if in.Name == "" || in.Name == metadataKey || seen[in.Name] {
			return nil, fmt.Errorf("safetensors: bad or repeated tensor name %q", in.Name)
		}
		seen[in.Name] = true
		size, err := sizeOf(in)
		if err != nil {
			return nil, err
		}
		shape := in.Shape
		if shape == nil {
			shape = []int64{}
		}
		name, _ := json.Marshal(in.Name)
		desc, _ := json.Marshal(struct {
			DType       string  `json:"dtype"`
			Shape       []int64 `json:"shape"`
			DataOffsets []int64 `json:"data_offsets"`
		}{in.DType, shape, []int64{off, off + size}})
		sep()
		buf.Write(name)
		buf.WriteString(":")
		buf.Write(desc)
		off += size
	}
	buf.WriteString("}")
	for buf.Len()%headerAlign != 0 {
		buf.WriteByte(' ')
	}
	out := make([]byte, 8, 8+buf.Len())
	binary.LittleEndian.PutUint64(out, uint64(buf.Len()))
	return append(out, buf.Bytes()...), nil
}

func sizeOf(in Info) (int64, error) {
	es, ok := elemSize[in.DType]
	if !ok {
		return 0, fmt.Errorf("safetensors: tensor %q: unknown dtype %q", in.Name, in.DType)
	}
	n := es
	for _, d := range in.Shape {
		if d < 0 {
			return 0, fmt.Errorf("safetensors: tensor %q: negative dimension in %v", in.Name, in.Shape)
		}
		n *= d
	}
	if in.Size != 0 && in.Size != n {
		return 0, fmt.Errorf("safetensors: tensor %q: Size %d but %s%v is %d bytes", in.Name, in.Size, in.DType, in.Shape, n)
	}
	return n, nil
}

// Create creates (or truncates) path and writes the header for infos, in
// order. The tensors' bytes then follow through Write or WriteFrom, in the
// same order. Info.Size may be left 0: it is computed.
func Create(path string, infos []Info, metadata map[string]string) (*Writer, error) {
	hdr, err := EncodeHeader(infos, metadata)
	if err != nil {
		return nil, err
	}
	w := &Writer{infos: make([]Info, len(infos))}
	for i, in := range infos {
		in.Size, _ = sizeOf(in)
		w.infos[i] = cloneInfo(in)
	}
	if w.f, err = os.Create(path); err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	w.bw = bufio.NewWriterSize(w.f, 1<<20)
	if _, err := w.bw.Write(hdr); err != nil {
		w.abort()
		return nil, fmt.Errorf("safetensors: %s: %w", path, err)
	}
	return w, nil
}

// expect checks name is the next tensor and returns its info.
func (w *Writer) expect(name string) (Info, error) {
	if w.err != nil {
		return Info{}, w.err
	}
	if w.closed {
		return Info{}, fmt.Errorf("safetensors: %s: write after Close", w.f.Name())
	}
	if w.next >= len(w.infos) {
		return Info{}, fmt.Errorf("safetensors: %s: tensor %q written after the last one", w.f.Name(), name)
	}
	if in := w.infos[w.next]; in.Name != name {
		return Info{}, fmt.Errorf("safetensors: %s: tensor %q written where %q comes next", w.f.Name(), name, in.Name)
	}
	return w.infos[w.next], nil
}

// Write writes the next tensor's little-endian bytes; name must be the next
// in order and len(data) its size.
func (w *Writer) Write(name string, data []byte) error {
	in, err := w.expect(name)
	if err != nil {
		return err
	}
	if int64(len(data)) != in.Size {
		return fmt.Errorf("safetensors: %s: tensor %q is %d bytes, got %d", w.f.Name(), name, in.Size, len(data))
	}
	if _, err := w.bw.Write(data); err != nil {
		w.err = fmt.Errorf("safetensors: %s: %w", w.f.Name(), err)
		return w.err
	}
	w.next++
	return nil
}

// WriteFrom writes the next tensor's bytes from r, which must yield exactly
// its size: a tensor can be streamed without holding it in memory.
func (w *Writer) WriteFrom(name string, r io.Reader) error {
	in, err := w.expect(name)
	if err != nil {
		return err
	}
	n, err := io.Copy(w.bw, io.LimitReader(r, in.Size))
	if err != nil {
		w.err = fmt.Errorf("safetensors: %s: tensor %q: %w", w.f.Name(), name, err)
		return w.err
	}
	if n != in.Size {
		w.err = fmt.Errorf("safetensors: %s: tensor %q is %d bytes, reader gave %d", w.f.Name(), name, in.Size, n)
		return w.err
	}
	var probe [1]byte
	if k, _ := r.Read(probe[:]); k > 0 {
		w.err = fmt.Errorf("safetensors: %s: tensor %q: reader gave more than %d bytes", w.f.Name(), name, in.Size)
		return w.err
	}
	w.next++
	return nil
}

// Close finishes the file. It fails, and removes the file, if a write failed
// or a tensor is missing.
func (w *Writer) Close() error {
	if w.closed {
		return nil
	}
	w.closed = true
	if w.err == nil && w.next < len(w.infos) {
		w.err = fmt.Errorf("safetensors: %s: closed with %d of %d tensors written (next %q)",
			w.f.Name(), w.next, len(w.infos), w.infos[w.next].Name)
	}
	if w.err != nil {
		w.abort()
		return w.err
	}
	ferr := w.bw.Flush()
	cerr := w.f.Close()
	if err := errors.Join(ferr, cerr); err != nil {
		os.Remove(w.f.Name())
		return fmt.Errorf("safetensors: %s: %w", w.f.Name(), err)
	}
	return nil
}

func (w *Writer) abort() {
	w.f.Close()
	if !w.removed {
		os.Remove(w.f.Name())
		w.removed = true
	}
}

// Infos returns the tensors the writer expects, in order, sizes filled in.
func (w *Writer) Infos() []Info {
	out := make([]Info, len(w.infos))
	for i, in := range w.infos {
		out[i] = cloneInfo(in)
	}
	return out
}
