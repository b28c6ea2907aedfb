//go:build race

package mesh

// raceEnabled: the race detector is on, so timings mean little.
const raceEnabled = true
