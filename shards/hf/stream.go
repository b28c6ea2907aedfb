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
type blockWriter struct {
	store    *shards.FileStore
	ckpt     *safetensors.Checkpoint
	progress func(n int64, tensor string)
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
		h, err := opts.Marshal(&onnxpb.TensorProto{Name: proto.String(w.name), DataType: proto.Int32(int32(w.dtype)), Dims: w.shape})
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

// copyWeight streams the checkpoint tensor w.tensor into out as w.dtype.
func (bw *blockWriter) copyWeight(out io.Writer, w weightRef) error {
	r, info, err := bw.ckpt.Reader(w.tensor)
	if err != nil {
		return err
	}
	if !sameShape(info.Shape, w.shape) {
		return fmt.Errorf("tensor %s has shape %v, config.json implies %v", w.tensor, info.Shape, w.shape)
	}
	inSize, ok := safetensors.ElemSize(info.DType)
	if !ok || (info.DType != "F32" && info.DType != "F16" && info.DType != "BF16") {
		return fmt.Errorf("tensor %s: dtype %s: %w (want F32, F16 or BF16)", w.tensor, info.DType, ErrUnsupported)
	}
	outSize := int64(w.dtype.Size())
	in := make([]byte, convertChunkElems*inSize)
	conv := make([]byte, convertChunkElems*outSize)
	left := protocol.NumElements(w.shape)
	for left > 0 {
		n := min(left, convertChunkElems)
		buf := in[:n*inSize]
		if _, err := io.ReadFull(r, buf); err != nil {
			return fmt.Errorf("tensor %s: %w", w.tensor, err)
		}
		dst := conv[:n*outSize]
		if err := convert(dst, w.dtype, buf, info.DType); err != nil {
			return fmt.Errorf("tensor %s: %w", w.tensor, err)
		}
		if _, err := out.Write(dst); err != nil {
			return err
		}
		left -= n
		if bw.progress != nil {
			bw.progress(int64(len(dst)), w.tensor)
		}
	}
	return nil
}

// convert converts little-endian elements of safetensors dtype from into
// dst of element type to (Float32 or Float16). Each pair has its own loop:
// this runs over every weight of the model.
func convert(dst []byte, to protocol.DType, src []byte, from string) error {
	switch {
	case from == "F32" && to == protocol.Float32, from == "F16" && to == protocol.Float16:
		copy(dst, src)
	case from == "BF16" && to == protocol.Float32:
		for i := range len(dst) / 4 {
			binary.LittleEndian.PutUint32(dst[4*i:], uint32(binary.LittleEndian.Uint16(src[2*i:]))<<16)
		}
	case from == "F16" && to == protocol.Float32:
		for i := range len(dst) / 4 {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(safetensors.F16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))))
		}
	case to == protocol.Float16:
		for i := range len(dst) / 2 {
			var f float32
			if from == "BF16" {
				f = safetensors.BF16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
			} else {
				f = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
			}
			h, overflow := safetensors.Float32ToF16(f)
			if overflow {
				return fmt.Errorf("%w: %g (import with --dtype float32)", ErrOverflow, f)
			}
			binary.LittleEndian.PutUint16(dst[2*i:], h)
		}
	default:
		return fmt.Errorf("cannot convert %s weights to %v", from, to)
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
