// Package build generates deterministic test models: a residual MLP chain
// and a GPT-style decoder with a KV cache, with weights drawn from a seeded
// generator. It is the engine of `infermesh shard build`.
//
// Each builder writes a model directory (see shards.WriteModel): the
// manifest, one ONNX file per block, and the same model unsplit as
// full.onnx, so that a test can check that the blocks chained equal the
// whole. The same configuration and seed always give byte-identical files,
// hence the same block CIDs and model ID.
//
// Files:
//   - graph.go: a small ONNX graph builder (nodes, seeded weights, inputs
//     and outputs with symbolic dimensions).
//   - assemble.go: emits each layer once as its own block and once inside
//     the whole graph, from the same code, and writes the directory.
//   - nn.go: LayerNorm, linear and GELU building blocks.
//   - mlp.go, gpt.go: the two models.
package build
