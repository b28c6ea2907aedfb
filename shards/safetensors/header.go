package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"unicode/utf8"
)

// MaxHeaderSize bounds the JSON header a reader accepts (100 MiB): the
// reference implementation's own limit, far above any real model's header.
const MaxHeaderSize = 100 << 20

// metadataKey is the header key holding the free-form string metadata.
const metadataKey = "__metadata__"

// ErrMalformed is wrapped by every error about a file's or an index's
// contents (as opposed to errors reading it).
var ErrMalformed = errors.New("malformed safetensors")

// Info describes one tensor.
type Info struct {
	Name  string
	DType string // "F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", ... (see ElemSize)
	Shape []int64
	Size  int64 // bytes: the product of Shape × the dtype's element size
}

// NumElements returns the product of the shape (1 for a scalar).
func (i Info) NumElements() int64 {
	n := int64(1)
	for _, d := range i.Shape {
		n *= d
	}
	return n
}

// entry is a validated tensor of a parsed file.
type entry struct {
	Info
	off int64 // absolute offset in the file
}

// header is a parsed and validated file header.
type header struct {
	tensors  []entry // in file order
	metadata map[string]string
}

func malformed(file, format string, args ...any) error {
	return fmt.Errorf("safetensors: %s: %s: %w", file, fmt.Sprintf(format, args...), ErrMalformed)
}

// rawTensor is a tensor's header entry as written; unknown fields are ignored.
type rawTensor struct {
	DType       *string  `json:"dtype"`
	Shape       *[]int64 `json:"shape"`
	DataOffsets *[]int64 `json:"data_offsets"`
}

// readHeader reads and validates the header of the file r of the given size;
// file names it in errors.
func readHeader(file string, r io.ReaderAt, size int64) (*header, error) {
	var lenBuf [8]byte
	if size < 8 {
		return nil, malformed(file, "%d bytes: too short for the header length", size)
	}
	if _, err := r.ReadAt(lenBuf[:], 0); err != nil {
		return nil, fmt.Errorf("safetensors: %s: reading header length: %w", file, err)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return nil, malformed(file, "header length %d exceeds the limit of %d", n, MaxHeaderSize)
	}
	if int64(n) > size-8 {
		return nil, malformed(file, "header length %d runs past the end of the file (%d bytes)", n, size)
	}
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, 8); err != nil {
		return nil, fmt.Errorf("safetensors: %s: reading header: %w", file, err)
	}
	dataStart := 8 + int64(n)
	return parseHeader(file, buf, dataStart, size-dataStart)
}

// parseHeader validates the JSON header buf for a data section of dataSize
// bytes starting at dataStart.
func parseHeader(file string, buf []byte, dataStart, dataSize int64) (*header, error) {
	if !utf8.Valid(buf) {
		return nil, malformed(file, "header is not UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(buf))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil, malformed(file, "header is not a JSON object")
	}
	h := &header{}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, malformed(file, "header JSON: %v", err)
		}
		name, ok := tok.(string)
		if !ok {
			return nil, malformed(file, "header JSON: key expected")
		}
		if seen[name] {
			return nil, malformed(file, "key %q appears twice in the header", name)
		}
		seen[name] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, malformed(file, "header JSON at %q: %v", name, err)
		}
		if name == metadataKey {
			if err := json.Unmarshal(raw, &h.metadata); err != nil {
				return nil, malformed(file, "%s must map strings to strings: %v", metadataKey, err)
			}
			continue
		}
		e, err := parseTensor(file, name, raw)
		if err != nil {
			return nil, err
		}
		h.tensors = append(h.tensors, e)
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, malformed(file, "header JSON: %v", err)
	}
	if rest := bytes.TrimLeft(buf[dec.InputOffset():], " \t\r\n"); len(rest) > 0 {
		return nil, malformed(file, "trailing bytes after the header JSON")
	}
	if err := checkLayout(file, h.tensors, dataSize); err != nil {
		return nil, err
	}
	for i := range h.tensors {
		h.tensors[i].off += dataStart
	}
	return h, nil
}

// parseTensor validates one tensor entry; off is left relative to the data.
func parseTensor(file, name string, raw json.RawMessage) (entry, error) {
	bad := func(format string, args ...any) (entry, error) {
		return entry{}, malformed(file, "tensor %q: %s", name, fmt.Sprintf(format, args...))
	}
	if name == "" {
		return bad("empty name")
	}
	var rt rawTensor
	if err := json.Unmarshal(raw, &rt); err != nil {
		return bad("%v", err)
	}
	if rt.DType == nil || rt.Shape == nil || rt.DataOffsets == nil {
		return bad("needs dtype, shape and data_offsets")
	}
	es, ok := elemSize[*rt.DType]
	if !ok {
		return bad("unknown dtype %q", *rt.DType)
	}
	n := es
	for _, d := range *rt.Shape {
		if d < 0 {
			return bad("negative dimension in shape %v", *rt.Shape)
		}
		if d != 0 && n > math.MaxInt64/d {
			return bad("shape %v overflows", *rt.Shape)
		}
		n *= d
	}
	offs := *rt.DataOffsets
	if len(offs) != 2 || offs[0] < 0 || offs[1] < offs[0] {
		return bad("data_offsets %v must be [begin, end] with 0 <= begin <= end", offs)
	}
	if offs[1]-offs[0] != n {
		return bad("%s%v is %d bytes but data_offsets %v span %d", *rt.DType, *rt.Shape, n, offs, offs[1]-offs[0])
	}
	return entry{Info: Info{Name: name, DType: *rt.DType, Shape: *rt.Shape, Size: n}, off: offs[0]}, nil
}

// checkLayout checks the tensors tile [0, dataSize) exactly.
func checkLayout(file string, ts []entry, dataSize int64) error {
	order := make([]int, len(ts))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool {
		ta, tb := ts[order[a]], ts[order[b]]
		if ta.off != tb.off {
			return ta.off < tb.off
		}
		return ta.Size < tb.Size
	})
	var end int64
	prev := ""
	for _, i := range order {
		t := ts[i]
		switch {
		case t.off < end:
			return malformed(file, "tensor %q at [%d, %d) overlaps tensor %q", t.Name, t.off, t.off+t.Size, prev)
		case t.off > end:
			return malformed(file, "tensor %q at [%d, %d) leaves a hole at [%d, %d)", t.Name, t.off, t.off+t.Size, end, t.off)
		}
		if t.off+t.Size > dataSize {
			return malformed(file, "tensor %q at [%d, %d) runs past the data section (%d bytes)", t.Name, t.off, t.off+t.Size, dataSize)
		}
		end = t.off + t.Size
		prev = t.Name
	}
	if end != dataSize {
		return malformed(file, "data section is %d bytes but the tensors cover %d", dataSize, end)
	}
	return nil
}
