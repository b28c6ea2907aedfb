// Package mesh is a node's membership of the infermesh network: the libp2p
// host over QUIC, the private Kademlia DHT (protocol prefix /infermesh),
// signed capacity records, provider records, Vivaldi network coordinates,
// the cached view of who serves which blocks of which model, routing and
// placement, the inference pipeline with failover, and block transfer.
//
// Files:
//   - mesh.go: Config, Mesh (New, Publish, Provide, Close), the republish loop.
//   - host.go: the libp2p host (QUIC only, resource and connection managers, NAT traversal).
//   - record.go: capacity records as signed envelopes, and their DHT validator.
//   - push.go: /infermesh/record/1.0.0, pushing a new record to connected peers.
//   - view.go: View, the per-model coverage cache refreshed from the DHT.
//   - coord.go: /infermesh/coord/1.0.0 and the Vivaldi client.
//   - route.go, place.go: the pure routing and placement functions.
//   - stage.go, client.go, batch.go: /infermesh/stage/1.0.0, serving and requesting inference, failover.
//   - blocks.go, manifest.go: /infermesh/blocks/1.0.0 and /infermesh/manifest/1.0.0, block and manifest transfer.
//
// The wire formats are specified in protocol/SPEC.md. mesh imports protocol
// and shards of ours, never node.
package mesh
