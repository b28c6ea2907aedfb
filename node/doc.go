// Package node is the infermesh daemon: its configuration and identity (a
// data directory), the spans it serves (local models, or models joined by ID
// whose blocks it fetches from peers and places itself), its membership of
// the mesh, requests through the mesh, and its local HTTP API. node.New
// wires it all; cmd/infermesh is a thin shell around it.
//
// Files:
//   - config.go: Config (DATA/config.json), Init, --serve parsing.
//   - identity.go: the Ed25519 identity (DATA/identity.key).
//   - node.go: Node (New, Close), served spans, the advert, the coverage log.
//   - api.go: the local HTTP API on 127.0.0.1 (status, peers, infer, generate).
//   - infer.go: Infer and Generate through the mesh, sub-spans served on demand, manifests.
//   - openai.go, sse.go: the OpenAI-compatible API, streamed generation (Server-Sent Events).
//   - join.go: joining by model ID, placement and rebalancing.
//   - publish.go: publishing and pulling models (POST /v1/publish, /v1/pull).
//   - store.go: the stores a node serves blocks from.
//   - sysinfo.go: accelerators (NVML GPUs, the CPU).
//   - blockbench.go: MeasureBlocks, the start-up timing of each served block.
package node
