package split

// SetBlocksHook makes Split pass the blocks it built to f before writing
// and verifying them, until the returned function is called.
func SetBlocksHook(f func(blocks [][]byte)) (restore func()) {
	testHookBlocks = f
	return func() { testHookBlocks = nil }
}
