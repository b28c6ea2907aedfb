package shards

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/infermesh/infermesh/protocol"
)

// Sampling chooses the next token from logits. The zero value is greedy
// (argmax), which is deterministic.
type Sampling struct {
	Temperature float64 // 0 = greedy
	TopK        int     // 0 = no limit
	// TopP keeps the smallest set of most likely tokens whose probability
	// (after temperature) adds up to at least TopP (nucleus sampling); 0
	// or 1 and above = no limit.
	TopP float64
	Seed uint64
}

// Decoder drives autoregressive generation of one sequence through a
// Session over a whole model (or the first-to-last spans chained): the
// prompt in one step, then one token per step, with the KV cache kept by the
// session.
type Decoder struct {
	spec      *DecoderSpec
	sess      Session
	tokens    []int64 // prompt and generated so far
	fed       int     // tokens already in the KV cache
	generated int     // tokens generated so far: the next one's sampler index
	sample    Sampling
}

// ErrContextFull is returned when a sequence reaches the model's context.
var ErrContextFull = errors.New("context window full")

// NewDecoder starts decoding prompt through sess. The session must be new.
func NewDecoder(spec *DecoderSpec, sess Session, prompt []int64, s Sampling) (*Decoder, error) {
	if err := spec.CheckPrompt(prompt); err != nil {
		return nil, err
	}
	return &Decoder{spec: spec, sess: sess, tokens: slices.Clone(prompt), sample: s}, nil
}

// CheckPrompt says why prompt cannot start a generation of a model with
// this decoder spec (nil spec: the model generates no text), if it can't.
func (spec *DecoderSpec) CheckPrompt(prompt []int64) error {
	if spec == nil {
		return errors.New("model has no decoder spec: it is not a text-generation model")
	}
	if len(prompt) == 0 {
		return errors.New("empty prompt")
	}
	for _, t := range prompt {
		if t < 0 || t >= int64(spec.Vocab) {
			return fmt.Errorf("token %d outside the vocabulary [0,%d)", t, spec.Vocab)
		}
	}
	return nil
}

// StepInputs builds the inputs of one decoding step for a batch of one:
// tokens [fed, len) at positions fed..len-1 with a mask over all of them.
func StepInputs(spec *DecoderSpec, tokens []int64, fed int) Tensors {
	n := len(tokens) - fed
	pos := make([]int64, n)
	for i := range pos {
		pos[i] = int64(fed + i)
	}
	in := Tensors{spec.InputIDs: protocol.NewTensor([]int64{1, int64(n)}, tokens[fed:])}
	if spec.PositionIDs != "" {
		in[spec.PositionIDs] = protocol.NewTensor([]int64{1, int64(n)}, pos)
	}
	if spec.AttentionMask != "" {
		mask := make([]int64, len(tokens))
		for i := range mask {
			mask[i] = 1
		}
		in[spec.AttentionMask] = protocol.NewTensor([]int64{1, int64(len(tokens))}, mask)
	}
	return in
}

// Next runs one step and returns the next token, which is appended to the
// sequence (and fed on the following call).
func (d *Decoder) Next() (int64, error) {
	if len(d.tokens) >= d.spec.MaxContext {
		return 0, ErrContextFull
	}
	out, err := d.sess.Step(StepInputs(d.spec, d.tokens, d.fed))
	if err != nil {
		return 0, err
	}
	d.fed = len(d.tokens)
	logits, err := LastLogits(out[d.spec.Logits])
	if err != nil {
		return 0, err
	}
	tok := d.sample.Pick(logits, d.generated)
	d.generated++
	d.tokens = append(d.tokens, tok)
	return tok, nil
}

// Tokens is the prompt followed by every token generated so far.
func (d *Decoder) Tokens() []int64 { return d.tokens }

// LastLogits returns the logits of the last position of a [1, seq, vocab]
// float32 tensor.
func LastLogits(t *protocol.Tensor) ([]float32, error) {
	if t == nil || len(t.Shape) != 3 || t.Shape[0] != 1 {
		return nil, fmt.Errorf("logits: want float32 [1, seq, vocab], got %v", t)
	}
	all, err := protocol.View[float32](t)
	if err != nil {
		return nil, err
	}
	vocab := int(t.Shape[2])
	return all[len(all)-vocab:], nil
}

// Pick chooses the token of sampler index index (the index-th token
// generated, from 0) from logits. Its randomness is a function of the seed
// and the index alone, not of earlier draws: whoever samples the index-th
// token (this process, the last hop of a route, a replacement of it after
// a failover) picks the same one from the same logits, which is what
// makes a seeded generation through the mesh equal to a local one, and
// exact across failovers.
func (s Sampling) Pick(logits []float32, index int) int64 {
	if s.Temperature <= 0 {
		best := 0
		for i, v := range logits {
			if v > logits[best] {
				best = i
			}
		}
		return int64(best)
	}
	idx := make([]int, len(logits))
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx, func(a, b int) int { // descending logits, ties by index
		if logits[a] != logits[b] {
			if logits[a] > logits[b] {
				return -1
			}
			return 1
		}
		return a - b
	})
	if s.TopK > 0 && s.TopK < len(idx) {
		idx = idx[:s.TopK]
	}
	weights := make([]float64, len(idx))
	total := 0.0
	for i, j := range idx {
		weights[i] = math.Exp(float64(logits[j]-logits[idx[0]]) / s.Temperature)
		total += weights[i]
	}
	if s.TopP > 0 && s.TopP < 1 {
		keep, acc := len(weights), 0.0
		for i, w := range weights {
			if acc += w; acc >= s.TopP*total {
				keep = i + 1
				break
			}
		}
		weights, idx = weights[:keep], idx[:keep]
		total = 0
		for _, w := range weights {
			total += w
		}
	}
	// ChaCha8 keyed by (seed, index): independent draws per index, with no
	// correlation between neighbouring indices to worry about.
	var key [32]byte
	binary.LittleEndian.PutUint64(key[0:], s.Seed)
	binary.LittleEndian.PutUint64(key[8:], uint64(index))
	r := rand.New(rand.NewChaCha8(key)).Float64() * total
	for i, w := range weights {
		if r -= w; r <= 0 {
			return int64(idx[i])
		}
	}
	return int64(idx[len(idx)-1])
}
