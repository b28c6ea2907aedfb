// Package simulations will be the discrete-event simulator of the mesh,
// calling mesh's routing and placement functions as they are. It may import
// protocol, shards and mesh.
//
// It is empty until the simulation work (issue 7) lands; the package exists
// so that the dependency rules in deps_test.go cover it from the start.
package simulations
