// Package node will be the daemon: configuration, identity, wiring of mesh
// and shards, the local HTTP API, metrics and the dashboard. It may import
// protocol, shards and mesh.
//
// It is empty until the node daemon work (issue 3) lands; the package exists
// so that the dependency rules in deps_test.go cover it from the start.
package node
