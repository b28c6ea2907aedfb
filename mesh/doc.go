// Package mesh is a node's membership of the infermesh network: the libp2p
// host over QUIC, the private Kademlia DHT (protocol prefix /infermesh),
// signed capacity records, provider records, Vivaldi network coordinates,
// and the cached view of who serves which blocks of which model. Routing,
// placement and the pipeline (later work) build on the view.
//
// Files:
//   - mesh.go: Config, Mesh (New, Publish, Provide, Close), the republish loop.
//   - host.go: the libp2p host (QUIC only, resource and connection managers, NAT traversal).
//   - record.go: capacity records as signed envelopes, and their DHT validator.
//   - push.go: /infermesh/record/1.0.0, pushing a new record to connected peers.
//   - view.go: View, the per-model coverage cache refreshed from the DHT.
//   - coord.go: /infermesh/coord/1.0.0 and the Vivaldi client.
//
// The wire formats are specified in protocol/SPEC.md. mesh imports protocol
// and shards of ours, never node.
package mesh
