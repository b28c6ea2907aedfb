// Package shards turns a model into content-addressed blocks and runs them.
//
// A model is a manifest (canonical JSON, see FORMAT.md) naming an ordered list
// of blocks; each block is a self-contained ONNX file identified by its CID
// (CIDv1, raw codec, sha2-256 of the file's bytes). The model's ID is the CID
// of its canonical manifest.
//
// Files:
//   - cid.go: block and manifest CIDs.
//   - manifest.go: the manifest schema, canonical encoding and checks.
//   - store.go: Store, the content-addressed block store, and FileStore.
//   - model.go: a model directory (manifest + store) on disk.
//   - runtime.go, span.go, value.go: the onnxruntime wrapper — the only code
//     in infermesh that imports onnxruntime_go.
//
// Sub-packages: onnxpb (generated ONNX protobuf), build (test models),
// split (cutting whole ONNX models into blocks).
package shards
