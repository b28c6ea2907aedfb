// Package split cuts a whole ONNX model into sequential blocks: the
// `infermesh shard split` command.
//
// The top-level nodes are put in a topological order (depth first from the
// graph outputs, so the order does not depend on how the file lists its
// nodes; cycles are refused). A cut position is a place in that order; the
// tensors crossing it are those produced before it (model inputs included)
// and read after it, or returned as model outputs. Subgraphs (If, Loop, Scan)
// read names of the outer scope implicitly: those count as inputs of the node
// holding the subgraph. Constants never cross a cut: initializers, Constant
// nodes and the deterministic nodes that read only constants are copied into
// each block that reads them.
//
// With Options.Blocks the cuts are chosen automatically: each falls at the
// position where the fewest bytes cross, within a window around an even split
// of the nodes' weight (parameter bytes read, plus an even share per node).
// With Options.At they fall right after the nodes producing the named
// tensors. Per-session state pairs (Options.State) are kept inside one block.
//
// The types and shapes of the tensors at the cuts come from running the model
// in onnxruntime on sample inputs with every intermediate tensor as an extra
// output (element types guessed per operator, corrected by onnxruntime), then
// again with its symbolic dimensions changed: dimensions that change are
// symbolic, named after the input dimension that changed the same way. The
// same sample inputs verify that the chained blocks equal the whole model.
//
// Files:
//   - split.go: Options, Report and Split.
//   - graph.go: indexing and ordering a graph; subgraph references.
//   - types.go: element types guessed per operator.
//   - infer.go: sample inputs and the runs that type the tensors.
//   - plan.go: crossing tensors and the choice of cuts, free of ONNX.
//   - blocks.go: writing each block's ONNX file and the manifest.
//   - verify.go: comparing the chained blocks with the whole model.
package split
