// Package protocol holds what infermesh peers agree on byte for byte: tensor
// element types and the in-memory tensor that every layer passes around, the
// size limits a node enforces, and (as the mesh grows) protocol IDs, message
// schemas and the frame codec. It imports nothing of ours, so every other
// package can depend on it.
//
// Files: dtype.go (element types and their ONNX codes), tensor.go (Tensor and
// typed views), limits.go (hard size limits).
package protocol
