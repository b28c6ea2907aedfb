// Package safetensors reads and writes the safetensors format, and opens a
// Hugging Face model folder's weights (model.safetensors, or the shards named
// by model.safetensors.index.json).
//
// Byte layout of a file:
//
//	[0, 8)        N, the header length: u64 little-endian
//	[8, 8+N)      the header: a JSON object (UTF-8, may end in spaces)
//	[8+N, EOF)    the data section: the tensors' raw little-endian bytes
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets"}, the
// offsets [begin, end) counting from the start of the data section; the
// optional key "__metadata__" maps strings to strings. A checkpoint is
// untrusted input, so everything read is validated: the header length is at
// most MaxHeaderSize and lies within the file, the JSON is well formed with
// no repeated keys, every dtype is known, shape product × element size equals
// the span of data_offsets, and the tensors tile the data section exactly (no
// overlaps, no holes, as the reference implementation requires). Errors wrap
// ErrMalformed and name the file and tensor.
//
// Reading streams: a Checkpoint keeps its files open and reads tensors with
// ReadAt (Reader hands out an io.SectionReader), never the whole file. The
// Writer streams too: the header first, then each tensor in the order given.
//
// Files:
//   - dtype.go: element types and the exact float16/bfloat16 conversions.
//   - header.go: parsing and validating a file's header.
//   - checkpoint.go: Checkpoint, OpenFile and OpenCheckpoint (sharded index).
//   - writer.go: Writer, a streaming file writer.
package safetensors
