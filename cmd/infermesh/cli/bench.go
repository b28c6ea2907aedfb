package cli

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/infermesh/infermesh/shards"
)

func shardBench(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard bench", "DIR [--steps N --rounds R]",
		"Times loading each block, and one KV-cached decode step through all blocks (one session per block)\n"+
			"against the same step through DIR/full.onnx, interleaved in one process. Prints Markdown.")
	steps := fs.Int("steps", 48, "decode steps per round")
	prompt := fs.Int("prompt", 16, "prompt tokens before the timed steps")
	rounds := fs.Int("rounds", 5, "rounds, alternating blocks and whole")
	var rf runtimeFlags
	rf.register(fs)
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	m, err := shards.OpenModel(pos[0])
	if err != nil {
		return err
	}
	dec := m.Manifest.Decoder
	if dec == nil {
		return fmt.Errorf("model %s has no decoder: bench times decode steps of text models", m.ID)
	}
	if *prompt+*steps > dec.MaxContext || *prompt < 1 || *steps < 1 || *rounds < 1 {
		return fmt.Errorf("need 1 <= prompt, 1 <= steps, prompt+steps <= context %d, rounds >= 1", dec.MaxContext)
	}
	rt, err := rf.open()
	if err != nil {
		return err
	}

	// Load time per block: verify against the CID, parse, create the session.
	var loads []time.Duration
	for i := range m.Manifest.Blocks {
		start := time.Now()
		span, err := rt.LoadSpan(m, i, i+1)
		if err != nil {
			return err
		}
		loads = append(loads, time.Since(start))
		span.Close()
	}

	// Three ways to run the same model: the blocks fused into one session
	// (what a node does with the span it serves), one session per block,
	// and the unsplit full.onnx.
	perBlockRT, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: rf.threads, Provider: rf.provider, NoSpin: rf.noSpin, SessionPerBlock: true})
	if err != nil {
		return err
	}
	spans := map[string]*shards.Span{}
	n := len(m.Manifest.Blocks)
	for name, load := range map[string]func() (*shards.Span, error){
		"fused":     func() (*shards.Span, error) { return rt.LoadSpan(m, 0, n) },
		"per-block": func() (*shards.Span, error) { return perBlockRT.LoadSpan(m, 0, n) },
		"whole":     func() (*shards.Span, error) { return rt.LoadWhole(m) },
	} {
		span, err := load()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		defer span.Close()
		spans[name] = span
	}
	order := []string{"fused", "per-block", "whole"}

	// The same token sequence for both, so both do identical work.
	tokens := make([]int64, *prompt+*steps)
	for i := range tokens {
		tokens[i] = int64('a' + i%26)
	}
	var perStep = map[string][]time.Duration{}
	for r := range *rounds * len(order) {
		name := order[r%len(order)]
		if err := ctx.Err(); err != nil {
			return err
		}
		d, err := timeDecode(spans[name], dec, tokens, *prompt)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		perStep[name] = append(perStep[name], d...)
	}
	fused, perBlock, whole := median(perStep["fused"]), median(perStep["per-block"]), median(perStep["whole"])
	e.printf("model %s (%s): %d blocks, %s; %d rounds of %d steps after a %d-token prompt, threads %d, no-spin %v\n\n",
		m.ID, m.Manifest.Name, n, humanBytes(m.Manifest.TotalSize()), *rounds, *steps, *prompt, rf.threads, rf.noSpin)
	e.printf("| measure | value |\n|---|---|\n")
	e.printf("| decode step, %d blocks fused into one session (median) | %s |\n", n, fused.Round(time.Microsecond))
	e.printf("| decode step, %d blocks, one session each (median) | %s |\n", n, perBlock.Round(time.Microsecond))
	e.printf("| decode step, full.onnx in one session (median) | %s |\n", whole.Round(time.Microsecond))
	e.printf("| ratio blocks/full, fused | %.3f |\n", float64(fused)/float64(whole))
	e.printf("| ratio blocks/full, one session per block | %.3f |\n", float64(perBlock)/float64(whole))
	e.printf("| block load (read + verify CID + parse + session), median | %s |\n", median(loads).Round(time.Microsecond))
	e.printf("| block load, max | %s |\n", slices.Max(loads).Round(time.Microsecond))
	e.printf("| onnxruntime | %s (%s), %s |\n", shards.Version(), rt.Provider(), shards.LibraryPath())
	return nil
}

// timeDecode runs the prompt in one step, then one token per step, and
// returns the duration of each single-token step.
func timeDecode(span *shards.Span, dec *shards.DecoderSpec, tokens []int64, prompt int) ([]time.Duration, error) {
	sess := span.NewSession()
	defer sess.Close()
	if _, err := sess.Step(shards.StepInputs(dec, tokens[:prompt], 0)); err != nil {
		return nil, err
	}
	var out []time.Duration
	for n := prompt + 1; n <= len(tokens); n++ {
		in := shards.StepInputs(dec, tokens[:n], n-1)
		start := time.Now()
		if _, err := sess.Step(in); err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
