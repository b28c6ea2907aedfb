// Package node is the infermesh daemon: its configuration and identity (a
// data directory), the spans of local models it serves (verified, loaded and
// measured at start-up), its membership of the mesh, and its local HTTP API.
// node.New wires it all; cmd/infermesh is a thin shell around it.
//
// Files:
//   - config.go: Config (DATA/config.json), Init, --serve parsing.
//   - identity.go: the Ed25519 identity (DATA/identity.key).
//   - node.go: Node (New, Close), served spans, the advert, the coverage log.
//   - api.go: GET /v1/status and GET /v1/peers on 127.0.0.1.
//   - sysinfo.go: accelerators (NVML GPUs, the CPU).
//   - blockbench.go: MeasureBlocks, the start-up timing of each served block.
package node
