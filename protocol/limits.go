package protocol

// Hard limits every node enforces on what it accepts. A value past a limit is
// refused with an error; it is never truncated.
const (
	// MaxTensorBytes bounds one tensor's data: 1 GiB.
	MaxTensorBytes = 1 << 30
	// MaxTensorRank bounds the number of dimensions of a tensor.
	MaxTensorRank = 16
)
