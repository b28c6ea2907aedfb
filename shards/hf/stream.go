package hf

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"os"

	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/onnxpb"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// Field numbers of onnx-ml.proto the streaming writer emits by hand (see
// shards/onnxwire.go for those the scanner reads).
const (
	modelGraph        = 7 // ModelProto.graph
	graphInitializer  = 5 // GraphProto.initializer
	tensorRawData     = 9 // TensorProto.raw_data
	convertChunkElems = 1 << 18
)

// ErrOverflow is returned, wrapped with the tensor's name, when a weight
// does not fit the element type asked for (a bfloat16 value beyond
// float16's range).
var ErrOverflow = errors.New("value out of float16 range")

// blockWriter streams one block file into the store: the graph's nodes and
// small constants first, then each weight's raw_data converted chunk by
// chunk from the checkpoint, hashing as it writes. Only one chunk of one
// tensor is in memory at a time.
//
// A quantized tensor is two initializers written one after the other: its
// integers, quantized row by row as they stream, then its scales, which
// are kept from the first until the second is written (a float32 per
// block: an eighth of the tensor's float32 size at block 32, 32 MB for
// Llama 3's 128256×2048 embedding).
type blockWriter struct {
	store    *shards.FileStore
	src      Source
	progress func(n int64, tensor string)
	scales   []float32 // of the quantized tensor scalesOf, until written
	scalesOf string
	floats   []float32 // a chunk of a tensor as float32
}

// write encodes g with its weights into the store and returns the file's
// CID and size.
func (bw *blockWriter) write(g *graph) (cid.Cid, int64, error) {
	header, body, err := g.encode()
	if err != nil {
		return cid.Undef, 0, err
	}
	// Each weight is one GraphProto.initializer field: a TensorProto of
	// dims, data_type and name, then raw_data, whose bytes are streamed.
	heads := make([][]byte, len(g.weights))
	graphLen := int64(len(body))
	opts := proto.MarshalOptions{Deterministic: true}
	for i, w := range g.weights {
		h, err := opts.Marshal(&onnxpb.TensorProto{Name: proto.String(w.name), DataType: proto.Int32(int32(w.dtype)), Dims: w.dims})
		if err != nil {
			return cid.Undef, 0, err
		}
		n := w.bytes()
		h = protowire.AppendTag(h, tensorRawData, protowire.BytesType)
		h = protowire.AppendVarint(h, uint64(n))
		tensorLen := int64(len(h)) + n
		field := protowire.AppendTag(nil, graphInitializer, protowire.BytesType)
		field = protowire.AppendVarint(field, uint64(tensorLen))
		heads[i] = append(field, h...)
		graphLen += int64(len(heads[i])) + n
	}
	header = protowire.AppendTag(header, modelGraph, protowire.BytesType)
	header = protowire.AppendVarint(header, uint64(graphLen))
	total := int64(len(header)) + graphLen
	if total >= math.MaxInt32 {
		return cid.Undef, 0, fmt.Errorf("block of %d bytes is over protobuf's 2 GiB: use a smaller --layers-per-block", total)
	}

	f, err := os.CreateTemp(bw.store.Dir(), ".tmp-import-*")
	if err != nil {
		return cid.Undef, 0, err
	}
	tmp := f.Name()
	defer func() {
		if tmp != "" {
			f.Close()
			os.Remove(tmp)
		}
	}()
	sha := sha256.New()
	out := bufio.NewWriterSize(io.MultiWriter(f, sha), 1<<20)
	out.Write(header)
	out.Write(body)
	for i, w := range g.weights {
		out.Write(heads[i])
		if err := bw.copyWeight(out, w); err != nil {
			return cid.Undef, 0, err
		}
	}
	if err := out.Flush(); err != nil {
		return cid.Undef, 0, err
	}
	if err := f.Chmod(0o644); err != nil {
		return cid.Undef, 0, err
	}
	if err := f.Close(); err != nil {
		return cid.Undef, 0, err
	}
	c := blockCID(sha)
	if err := os.Rename(tmp, bw.store.Path(c)); err != nil {
		return cid.Undef, 0, err
	}
	tmp = ""
	return c, total, nil
}

func blockCID(h hash.Hash) cid.Cid {
	d, err := mh.Encode(h.Sum(nil), mh.SHA2_256)
	if err != nil {
		panic(err)
	}
	return cid.NewCidV1(shards.CodecBlock, d)
}

// copyWeight streams the source tensor w.tensor into out as w says:
// converted to w.dtype, quantized, or its scales.
func (bw *blockWriter) copyWeight(out io.Writer, w weightRef) error {
	shape, ok := bw.src.Shape(w.tensor)
	if !ok {
		return fmt.Errorf("no tensor %s", w.tensor)
	}
	if !sameShape(shape, w.shape) {
		return fmt.Errorf("tensor %s has shape %v, the config implies %v", w.tensor, shape, w.shape)
	}
	switch w.part {
	case packedWeight:
		return bw.copyQuantized(out, w)
	case weightScales:
		if bw.scalesOf != w.tensor {
			return fmt.Errorf("tensor %s: scales written before its integers", w.tensor)
		}
		buf := make([]byte, 0, min(len(bw.scales), convertChunkElems)*4)
		for s := bw.scales; len(s) > 0; {
			n := min(len(s), convertChunkElems)
			buf = buf[:0]
			for _, v := range s[:n] {
				buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(v))
			}
			if _, err := out.Write(buf); err != nil {
				return err
			}
			bw.report(int64(len(buf)), w.tensor)
			s = s[n:]
		}
		bw.scales, bw.scalesOf = nil, ""
		return nil
	}
	outSize := int64(w.dtype.Size())
	conv := make([]byte, convertChunkElems*outSize)
	total := protocol.NumElements(w.shape)
	for off := int64(0); off < total; {
		n := min(total-off, convertChunkElems)
		f := bw.chunk(int(n))
		if err := bw.src.ReadFloat32(w.tensor, off, f); err != nil {
			return err
		}
		dst := conv[:n*outSize]
		if err := encodeFloats(dst, w.dtype, f); err != nil {
			return fmt.Errorf("tensor %s: %w", w.tensor, err)
		}
		if _, err := out.Write(dst); err != nil {
			return err
		}
		off += n
		bw.report(int64(len(dst)), w.tensor)
	}
	return nil
}

// copyQuantized streams the integers of the quantized matrix w.tensor
// [rows, k], some rows at a time, and keeps its scales for the next
// weightRef. Rows the source holds quantized as w.quant are copied.
func (bw *blockWriter) copyQuantized(out io.Writer, w weightRef) error {
	q, rows, k := w.quant, int(w.shape[0]), int(w.shape[1])
	if k%q.Block != 0 {
		return fmt.Errorf("tensor %s: %w: block size %d does not divide its input size %d", w.tensor, ErrBadQuantization, q.Block, k)
	}
	qs, _ := bw.src.(QuantizedSource)
	copyRows := false
	if qs != nil {
		have, ok := qs.Quantized(w.tensor)
		copyRows = ok && have == q
	}
	rb, sb := q.rowBytes(k), k/q.Block
	bw.scales, bw.scalesOf = make([]float32, rows*sb), w.tensor
	step := max(1, convertChunkElems/k)
	packed := make([]byte, step*rb)
	for r := 0; r < rows; r += step {
		n := min(step, rows-r)
		p, sc := packed[:n*rb], bw.scales[r*sb:(r+n)*sb]
		if copyRows {
			if err := qs.ReadQuantizedRows(w.tensor, r, n, p, sc); err != nil {
				return err
			}
		} else {
			f := bw.chunk(n * k)
			if err := bw.src.ReadFloat32(w.tensor, int64(r)*int64(k), f); err != nil {
				return err
			}
			for i := range n {
				q.quantizeRow(p[i*rb:(i+1)*rb], sc[i*sb:(i+1)*sb], f[i*k:(i+1)*k])
			}
		}
		if _, err := out.Write(p); err != nil {
			return err
		}
		bw.report(int64(len(p)), w.tensor)
	}
	return nil
}

// chunk returns bw's float32 buffer with n elements.
func (bw *blockWriter) chunk(n int) []float32 {
	if cap(bw.floats) < n {
		bw.floats = make([]float32, n)
	}
	return bw.floats[:n]
}

func (bw *blockWriter) report(n int64, tensor string) {
	if bw.progress != nil {
		bw.progress(n, tensor)
	}
}

// encodeFloats writes src into dst as little-endian float32 or float16
// (rounded to nearest even; a value beyond float16's range is ErrOverflow).
func encodeFloats(dst []byte, to protocol.DType, src []float32) error {
	switch to {
	case protocol.Float32:
		for i, f := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(f))
		}
	case protocol.Float16:
		for i, f := range src {
			h, overflow := safetensors.Float32ToF16(f)
			if overflow {
				return fmt.Errorf("%w: %g (import with --dtype float32)", ErrOverflow, f)
			}
			binary.LittleEndian.PutUint16(dst[2*i:], h)
		}
	default:
		return fmt.Errorf("cannot store weights as %v", to)
	}
	return nil
}

func sameShape(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
