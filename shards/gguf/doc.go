// Package gguf reads, writes and dequantizes GGUF files, the single-file
// model format of llama.cpp and ggml. It is the base of `infermesh shard
// import model.gguf`.
//
// Byte layout of a file (all integers little-endian; a string is a u64
// byte length then the UTF-8 bytes):
//
//	magic "GGUF", version u32 (2 or 3; 1 is refused)
//	tensor count u64, metadata count u64
//	metadata: key string, value type u32, value
//	    (an array value is element type u32, count u64, the elements)
//	tensor infos: name string, n_dims u32 (1..4), dims u64 × n_dims,
//	    type u32 (a ggml type), offset u64 (relative to the data section)
//	padding to the alignment (general.alignment, default 32)
//	data section: each tensor's blocks at its offset, offsets aligned
//
// Dimensions are in ggml order: Dims[0] (ne[0]) is the contiguous,
// fastest-varying one, so a numpy array of shape (rows, cols) has Dims
// {cols, rows}; TensorInfo.Shape reverses them. A row is Dims[0] elements
// and always a whole number of the type's blocks.
//
// A GGUF file is untrusted input. Open reads the header through a buffered
// io.ReaderAt, never the whole file, and bounds every count and length by
// the bytes left in the file before allocating from it; it checks that
// every tensor has 1 to 4 positive dims whose product does not overflow, a
// known type, an aligned offset and data lying within the file. Errors
// wrap ErrMalformed or ErrUnsupported and name the key or tensor.
//
// Dequantization (ReadRows, Dequantize) covers F32, F16, BF16, Q8_0, Q4_0,
// Q4_K, Q5_K and Q6_K and equals llama.cpp's dequantize_row_* reference
// code bit for bit. Every other ggml type is recognised by name: it can be
// read raw (ReadRawRows) but not dequantized. The Writer writes version 3
// files, streaming tensor data in rows, and quantizes with ports of
// llama.cpp's reference quantizers (quantize_row_*_ref).
//
// Files:
//   - types.go: ggml tensor types (names, block sizes) and metadata value types.
//   - reader.go: Open, the header parser and its bounds checks, TensorInfo.
//   - metadata.go: Metadata and its typed lookups.
//   - dequant.go: f16/bf16 conversions, dequantizers, ReadRows, ReadRawRows.
//   - quant.go: quantizers for the supported types.
//   - writer.go: Writer, a streaming version 3 writer.
package gguf
