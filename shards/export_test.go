package shards

// SetMaxFusedBytes lowers the bound on a fused graph for a test, so that
// small models exercise spans fused in several groups.
func SetMaxFusedBytes(n int64) (restore func()) {
	old := maxFusedBytes
	maxFusedBytes = n
	return func() { maxFusedBytes = old }
}
