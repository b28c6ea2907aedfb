package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Names of a Hugging Face model folder's weight files.
const (
	SingleFile = "model.safetensors"            // an unsharded checkpoint
	IndexFile  = "model.safetensors.index.json" // a sharded one's index
)

// maxIndexSize bounds the index JSON a reader accepts.
const maxIndexSize = 64 << 20

// Checkpoint is a Hugging Face model folder's weights: model.safetensors, or
// the shards listed by model.safetensors.index.json ("weight_map"). Its
// methods are safe for concurrent use (reads go through ReadAt) until Close.
type Checkpoint struct {
	files    []*os.File
	tensors  map[string]located
	names    []string
	metadata map[string]string
}

type located struct {
	entry
	file int // index into files
}

// OpenFile opens one .safetensors file.
func OpenFile(path string) (*Checkpoint, error) {
	c := &Checkpoint{tensors: map[string]located{}}
	h, err := c.open(path)
	if err != nil {
		return nil, err
	}
	for _, e := range h.tensors {
		c.tensors[e.Name] = located{entry: e, file: 0}
	}
	c.metadata = h.metadata
	c.sortNames()
	return c, nil
}

// open opens and validates one file, appending it to c.files; on error c is
// closed.
func (c *Checkpoint) open(path string) (*header, error) {
	f, err := os.Open(path)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	c.files = append(c.files, f)
	st, err := f.Stat()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if !st.Mode().IsRegular() {
		c.Close()
		return nil, fmt.Errorf("safetensors: %s: not a regular file: %w", path, ErrMalformed)
	}
	h, err := readHeader(path, f, st.Size())
	if err != nil {
		c.Close()
		return nil, err
	}
	return h, nil
}

// index is model.safetensors.index.json; its "metadata" (total_size, ...) is
// not used.
type index struct {
	WeightMap map[string]string `json:"weight_map"`
}

// OpenCheckpoint opens the weights of the Hugging Face model folder dir:
// model.safetensors.index.json if present, else model.safetensors. With an
// index, every file it names must exist in dir and hold the tensors the
// index maps to it; the checkpoint holds exactly the index's tensors (names
// a shard holds beyond them are ignored, as transformers does). Metadata is
// the first shard's, the others' keys added where they are new.
func OpenCheckpoint(dir string) (*Checkpoint, error) {
	idxPath := filepath.Join(dir, IndexFile)
	f, err := os.Open(idxPath)
	if errors.Is(err, fs.ErrNotExist) {
		return OpenFile(filepath.Join(dir, SingleFile))
	}
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxIndexSize+1))
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %s: %w", idxPath, err)
	}
	if len(data) > maxIndexSize {
		return nil, malformed(idxPath, "larger than %d bytes", maxIndexSize)
	}
	var idx index
	if err := json.Unmarshal(data, &idx); err != nil {
		return nil, malformed(idxPath, "%v", err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, malformed(idxPath, "weight_map is missing or empty")
	}
	// Open each named file once, in sorted order (deterministic errors).
	var fileNames []string
	byFile := map[string][]string{}
	for name, file := range idx.WeightMap {
		if file == "" || file != filepath.Base(file) || file == "." || file == ".." || strings.ContainsAny(file, `/\`) {
			return nil, malformed(idxPath, "tensor %q maps to %q, which is not a file name in the folder", name, file)
		}
		if _, ok := byFile[file]; !ok {
			fileNames = append(fileNames, file)
		}
		byFile[file] = append(byFile[file], name)
	}
	slices.Sort(fileNames)
	c := &Checkpoint{tensors: map[string]located{}}
	for i, file := range fileNames {
		path := filepath.Join(dir, file)
		h, err := c.open(path)
		if err != nil {
			return nil, err
		}
		held := make(map[string]entry, len(h.tensors))
		for _, e := range h.tensors {
			held[e.Name] = e
		}
		names := byFile[file]
		slices.Sort(names)
		for _, name := range names {
			e, ok := held[name]
			if !ok {
				c.Close()
				return nil, malformed(idxPath, "tensor %q is mapped to %s, which does not hold it", name, file)
			}
			c.tensors[name] = located{entry: e, file: i}
		}
		for k, v := range h.metadata {
			if _, dup := c.metadata[k]; !dup {
				if c.metadata == nil {
					c.metadata = map[string]string{}
				}
				c.metadata[k] = v
			}
		}
	}
	c.sortNames()
	return c, nil
}

func (c *Checkpoint) sortNames() {
	c.names = make([]string, 0, len(c.tensors))
	for n := range c.tensors {
		c.names = append(c.names, n)
	}
	slices.Sort(c.names)
}

// Names returns the tensor names, sorted.
func (c *Checkpoint) Names() []string { return slices.Clone(c.names) }

// Info describes the named tensor.
func (c *Checkpoint) Info(name string) (Info, bool) {
	t, ok := c.tensors[name]
	if !ok {
		return Info{}, false
	}
	return cloneInfo(t.Info), true
}

func cloneInfo(i Info) Info {
	i.Shape = slices.Clone(i.Shape)
	return i
}

// Metadata returns the files' "__metadata__" (nil when there is none).
func (c *Checkpoint) Metadata() map[string]string {
	if c.metadata == nil {
		return nil
	}
	m := make(map[string]string, len(c.metadata))
	for k, v := range c.metadata {
		m[k] = v
	}
	return m
}

// ErrNoTensor is returned for a name the checkpoint does not hold.
var ErrNoTensor = errors.New("safetensors: no such tensor")

func (c *Checkpoint) lookup(name string) (located, error) {
	t, ok := c.tensors[name]
	if !ok {
		return located{}, fmt.Errorf("%w: %q", ErrNoTensor, name)
	}
	return t, nil
}

// Reader streams the raw little-endian bytes of the named tensor (an
// io.SectionReader over its file: nothing is held in memory). It is valid
// until Close.
func (c *Checkpoint) Reader(name string) (io.Reader, Info, error) {
	t, err := c.lookup(name)
	if err != nil {
		return nil, Info{}, err
	}
	return io.NewSectionReader(c.files[t.file], t.off, t.Size), cloneInfo(t.Info), nil
}

// Raw reads the raw little-endian bytes of the named tensor.
func (c *Checkpoint) Raw(name string) ([]byte, error) {
	t, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, t.Size)
	if _, err := c.files[t.file].ReadAt(buf, t.off); err != nil {
		return nil, fmt.Errorf("safetensors: %s: tensor %q: %w", c.files[t.file].Name(), name, err)
	}
	return buf, nil
}

// Float32 reads the named tensor as float32, row-major: F32, F16 and BF16
// convert exactly; other dtypes are refused.
func (c *Checkpoint) Float32(name string) ([]float32, error) {
	t, err := c.lookup(name)
	if err != nil {
		return nil, err
	}
	switch t.DType {
	case "F32", "F16", "BF16":
	default:
		return nil, fmt.Errorf("safetensors: tensor %q is %s: Float32 reads F32, F16 and BF16", name, t.DType)
	}
	raw, err := c.Raw(name)
	if err != nil {
		return nil, err
	}
	return DecodeFloat32(t.DType, raw), nil
}

// DecodeFloat32 converts little-endian F32, F16 or BF16 bytes to float32
// exactly. It panics on another dtype or a length that is not a multiple of
// the element size.
func DecodeFloat32(dtype string, raw []byte) []float32 {
	es, ok := elemSize[dtype]
	if !ok || int64(len(raw))%es != 0 {
		panic(fmt.Sprintf("safetensors: DecodeFloat32(%s, %d bytes)", dtype, len(raw)))
	}
	out := make([]float32, int64(len(raw))/es)
	switch dtype {
	case "F32":
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
	case "F16":
		for i := range out {
			out[i] = F16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	case "BF16":
		for i := range out {
			out[i] = BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	default:
		panic("safetensors: DecodeFloat32 of " + dtype)
	}
	return out
}

// Close closes the checkpoint's files.
func (c *Checkpoint) Close() error {
	var errs []error
	for _, f := range c.files {
		if err := f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
