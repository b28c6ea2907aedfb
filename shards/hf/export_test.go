package hf

// SetAccuracyLevel sets MatMulNBits' accuracy_level of the blocks imported
// from now on and returns a function restoring the previous one.
func SetAccuracyLevel(level int64) (restore func()) {
	old := accuracyLevel
	accuracyLevel = level
	return func() { accuracyLevel = old }
}
