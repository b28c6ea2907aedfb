package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/infermesh/infermesh/shards"
)

// Settings of MeasureBlocks.
const (
	// benchPrompt is the past a decode step is timed after: this many byte
	// tokens run as a prompt first.
	benchPrompt = "the mesh"
	// benchWarmup is the untimed steps (decoders) or passes (others) each
	// timed block runs before its timed rounds.
	benchWarmup = 1
	// benchDimSize is the size of symbolic dimensions other than the batch
	// in the inputs of models that are not decoders (shards.RandomInputs).
	benchDimSize = 32
	// benchSeed seeds those inputs.
	benchSeed = 1
)

// MeasureBlocks times each block in [start, end) of model m on rt and
// returns one figure per block: the median over rounds of one pass through
// that block alone, batch 1, in microseconds (protocol.ServedSpan's
// BlockMicros).
//
// For a decoder (m.Manifest.Decoder set) a pass is one decode step of one
// token after a short prompt, with the block's KV cache kept in a session;
// each round feeds the next token, so the past grows by one per round
// (prompt + warm-up + rounds must fit Decoder.MaxContext; the prompt is
// shortened to fit). Other models run seeded random inputs
// (shards.RandomInputs, batch 1, other symbolic dimensions 32).
//
// Blocks before start run, untimed, only to make the inputs of the first
// timed block: each block's inputs are what the blocks before it output,
// as in a chain of peers. Blocks are loaded one at a time, each once, as
// one-block spans (rt.LoadSpan(m, i, i+1)), and closed before the next, so
// at most one block is in memory. A timed figure includes what serving the
// block costs besides onnxruntime's Run: converting its inputs and outputs.
// ctx is checked between passes.
func MeasureBlocks(ctx context.Context, rt *shards.Runtime, m *shards.Model, start, end int, rounds int) ([]float64, error) {
	if m == nil || m.Manifest == nil || rt == nil {
		return nil, errors.New("measure blocks: no model or runtime")
	}
	if n := len(m.Manifest.Blocks); start < 0 || end > n || start >= end {
		return nil, fmt.Errorf("measure blocks: span [%d,%d) out of range: model %s has %d blocks", start, end, m.ID, n)
	}
	if rounds < 1 {
		return nil, fmt.Errorf("measure blocks: %d rounds, want at least 1", rounds)
	}
	steps, err := benchSteps(m.Manifest, rounds)
	if err != nil {
		return nil, err
	}
	out := make([]float64, 0, end-start)
	for i := range end {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		timed := i >= start
		var d time.Duration
		var err error
		if m.Manifest.Decoder != nil {
			d, err = measureDecoderBlock(ctx, rt, m, i, steps, timed)
		} else {
			d, err = measurePassBlock(ctx, rt, m, i, steps, rounds, timed)
		}
		if err != nil {
			return nil, fmt.Errorf("measure block %d of %s: %w", i, m.ID, err)
		}
		if timed {
			out = append(out, float64(d.Nanoseconds())/1e3)
		}
	}
	return out, nil
}

// benchSteps returns the inputs of block 0 for each pass: for a decoder
// the prompt step, the warm-up steps and then one step per round; for
// another model one set of random inputs (every pass reuses it).
func benchSteps(m *shards.Manifest, rounds int) ([]shards.Tensors, error) {
	dec := m.Decoder
	if dec == nil {
		return []shards.Tensors{shards.RandomInputs(m, benchSeed, 1, benchDimSize)}, nil
	}
	if dec.Vocab <= 0 {
		return nil, fmt.Errorf("measure blocks: decoder vocabulary %d", dec.Vocab)
	}
	decodes := benchWarmup + rounds
	prompt := len(benchPrompt)
	if dec.MaxContext > 0 && prompt+decodes > dec.MaxContext {
		prompt = dec.MaxContext - decodes
		if prompt < 1 {
			return nil, fmt.Errorf("measure blocks: context of %d tokens is too short for a prompt and %d decode steps", dec.MaxContext, decodes)
		}
	}
	tokens := make([]int64, 0, prompt+decodes)
	for i := range prompt {
		tokens = append(tokens, int64(benchPrompt[i])%int64(dec.Vocab))
	}
	steps := []shards.Tensors{shards.StepInputs(dec, tokens, 0)}
	for k := range decodes {
		fed := len(tokens)
		tokens = append(tokens, int64('a'+k%26)%int64(dec.Vocab))
		steps = append(steps, shards.StepInputs(dec, tokens, fed))
	}
	return steps, nil
}

// measureDecoderBlock loads block i, runs every step through it in one
// session, replaces steps[k] by the block's outputs (the next block's
// inputs), and, when timed, returns the median time of the decode steps
// after the prompt and warm-up.
func measureDecoderBlock(ctx context.Context, rt *shards.Runtime, m *shards.Model, i int, steps []shards.Tensors, timed bool) (time.Duration, error) {
	span, err := rt.LoadSpan(m, i, i+1)
	if err != nil {
		return 0, err
	}
	defer span.Close()
	sess := span.NewSession()
	defer sess.Close()
	var times []time.Duration
	for k, in := range steps {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		t0 := time.Now()
		out, err := sess.Step(in)
		d := time.Since(t0)
		if err != nil {
			return 0, fmt.Errorf("step %d: %w", k, err)
		}
		steps[k] = out
		if k > benchWarmup { // step 0 is the prompt
			times = append(times, d)
		}
	}
	if !timed {
		return 0, nil
	}
	return median(times), nil
}

// measurePassBlock loads block i, runs one pass on steps[0] (which it
// replaces by the block's outputs) and, when timed, the warm-up and rounds
// more, returning their median time.
func measurePassBlock(ctx context.Context, rt *shards.Runtime, m *shards.Model, i int, steps []shards.Tensors, rounds int, timed bool) (time.Duration, error) {
	span, err := rt.LoadSpan(m, i, i+1)
	if err != nil {
		return 0, err
	}
	defer span.Close()
	in := steps[0]
	out, err := span.Run(in)
	if err != nil {
		return 0, err
	}
	steps[0] = out
	if !timed {
		return 0, nil
	}
	// The pass above warmed the block up too.
	for range benchWarmup - 1 {
		if _, err := span.Run(in); err != nil {
			return 0, err
		}
	}
	times := make([]time.Duration, 0, rounds)
	for range rounds {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		t0 := time.Now()
		_, err := span.Run(in)
		d := time.Since(t0)
		if err != nil {
			return 0, err
		}
		times = append(times, d)
	}
	return median(times), nil
}

// median returns the middle of ds (the mean of the two middle ones for an
// even count); ds is sorted in place.
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	n := len(ds)
	if n%2 == 1 {
		return ds[n/2]
	}
	return (ds[n/2-1] + ds[n/2]) / 2
}
