// Package mesh will hold the peer-to-peer layer: the libp2p host over QUIC,
// the private Kademlia DHT with signed capacity records, network coordinates,
// the pure routing and placement functions, and the pipeline client and stage
// server. It may import protocol and shards.
//
// It is empty until the mesh membership work (issue 3) lands; the package
// exists so that the dependency rules in deps_test.go cover it from the
// start.
package mesh
