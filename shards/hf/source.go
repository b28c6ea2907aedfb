package hf

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"sync"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// Source is what an import reads weights from: a safetensors checkpoint
// (SafetensorsSource) today, a GGUF file next. Tensors are named and shaped
// as in a Hugging Face checkpoint: "model.layers.3.mlp.up_proj.weight",
// [out, in] for a projection, row-major. ImportFrom calls a Source from one
// goroutine at a time.
type Source interface {
	// Names lists every tensor the source holds. Import refuses a source
	// with a tensor the model does not use (other than rotary inv_freq
	// buffers, and lm_head.weight when the embeddings are tied).
	Names() []string
	// Shape is the named tensor's shape; false if there is no such tensor.
	Shape(name string) ([]int64, bool)
	// DType is the narrowest float type that holds the tensor's values
	// exactly: protocol.Float32, Float16 or BFloat16 (a quantized tensor
	// whose scales are float16, such as GGUF's Q4_0, says Float16). The
	// embedding table's decides Options.DType "auto": float32 for
	// Float32, float16 otherwise. false: no such tensor, or not a float.
	DType(name string) (protocol.DType, bool)
	// ReadFloat32 reads elements [off, off+len(dst)) of the named tensor,
	// row-major, as float32 (a quantized tensor dequantized).
	ReadFloat32(name string, off int64, dst []float32) error
}

// QuantizedSource is a Source that holds some tensors already quantized in
// the layout Import writes (see quant.go: symmetric blocks along the input
// dimension, default zero point, MatMulNBits' nibble order). When an
// import's Quantization equals a tensor's, its rows are copied as they are,
// without loss; otherwise Import reads the tensor with ReadFloat32 and
// quantizes (or not) itself.
type QuantizedSource interface {
	Source
	// Quantized reports how the named tensor, a matrix [N, K], is held;
	// false if it is not quantized (or not held).
	Quantized(name string) (Quantization, bool)
	// ReadQuantizedRows reads rows [row0, row0+n) of the named quantized
	// tensor: packed gets n·K·Bits/8 bytes, scales n·K/Block float32s,
	// laid out as Quantization.quantizeRow writes them.
	ReadQuantizedRows(name string, row0, n int, packed []byte, scales []float32) error
}

// SafetensorsSource reads a Hugging Face checkpoint's F32, F16 and BF16
// tensors. The checkpoint stays the caller's to close.
func SafetensorsSource(c *safetensors.Checkpoint) Source { return &stSource{ckpt: c} }

type stSource struct {
	ckpt *safetensors.Checkpoint
	mu   sync.Mutex
	buf  []byte // raw bytes of the last read
}

func (s *stSource) Names() []string { return s.ckpt.Names() }

func (s *stSource) Shape(name string) ([]int64, bool) {
	info, ok := s.ckpt.Info(name)
	return info.Shape, ok
}

func (s *stSource) DType(name string) (protocol.DType, bool) {
	info, ok := s.ckpt.Info(name)
	if !ok {
		return 0, false
	}
	switch info.DType {
	case "F32":
		return protocol.Float32, true
	case "F16":
		return protocol.Float16, true
	case "BF16":
		return protocol.BFloat16, true
	}
	return 0, false
}

func (s *stSource) ReadFloat32(name string, off int64, dst []float32) error {
	r, info, err := s.ckpt.Reader(name)
	if err != nil {
		return err
	}
	es, ok := safetensors.ElemSize(info.DType)
	if !ok || (info.DType != "F32" && info.DType != "F16" && info.DType != "BF16") {
		return fmt.Errorf("tensor %s: dtype %s: %w (want F32, F16 or BF16)", name, info.DType, ErrUnsupported)
	}
	if off < 0 || off+int64(len(dst)) > info.NumElements() {
		return fmt.Errorf("tensor %s: elements [%d,%d) of %d", name, off, off+int64(len(dst)), info.NumElements())
	}
	if len(dst) == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := int64(len(dst)) * es
	if int64(cap(s.buf)) < n {
		s.buf = make([]byte, n)
	}
	raw := s.buf[:n]
	if ra, ok := r.(io.ReaderAt); ok {
		_, err = ra.ReadAt(raw, off*es)
	} else {
		if _, err = io.CopyN(io.Discard, r, off*es); err == nil {
			_, err = io.ReadFull(r, raw)
		}
	}
	if err != nil {
		return fmt.Errorf("tensor %s: %w", name, err)
	}
	switch info.DType {
	case "F32":
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
	case "F16":
		for i := range dst {
			dst[i] = safetensors.F16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	case "BF16":
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(raw[2*i:])) << 16)
		}
	}
	return nil
}
