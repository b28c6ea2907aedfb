//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package node

// lockDataDir does nothing where syscall.Flock is not available (Windows,
// Solaris...): running two nodes on one data directory is the operator's
// to avoid there.
func lockDataDir(dir string) (release func() error, err error) {
	return func() error { return nil }, nil
}
