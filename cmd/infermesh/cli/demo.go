package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// The demo shows, on one machine, what the mesh does across peers: a model
// cut into content-addressed blocks, the blocks grouped into spans ("hops"),
// and several generations pipelined through the hops at once, each hop
// keeping the KV cache of its blocks per session. Until the mesh exists the
// hops are goroutines joined by channels rather than peers joined by QUIC.
func runDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh demo", "[flags]", "Builds a GPT-style test model and runs pipelined generation through its blocks.")
	dir := fs.String("dir", "demo", "folder for the demo model")
	layers := fs.Int("layers", 8, "decoder layers")
	dim := fs.Int("dim", 256, "model width")
	hops := fs.Int("hops", 3, "spans of blocks the model is served as")
	prompts := fs.String("prompts", "Hello mesh|Peer to peer|Inference without a cloud|Pipelines overlap", "prompts separated by |")
	tokens := fs.Int("tokens", 24, "tokens to generate per prompt")
	var rf runtimeFlags
	rf.register(fs)
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	// Every hop lives in this one process: their thread pools must not spin
	// against each other on a machine with few cores.
	rf.noSpin = true
	rt, err := rf.open()
	if err != nil {
		return err
	}

	modelDir := filepath.Join(*dir, fmt.Sprintf("gpt-%dx%d", *layers, *dim))
	m, err := shards.OpenModel(modelDir)
	if err != nil || m.Verify() != nil {
		start := time.Now()
		os.RemoveAll(modelDir)
		if m, err = build.GPT(build.GPTConfig{Layers: *layers, Dim: *dim, Seed: 1}, modelDir); err != nil {
			return err
		}
		e.printf("built model %s: %d blocks, %s in %s\n", m.ID, len(m.Manifest.Blocks), humanBytes(m.Manifest.TotalSize()), time.Since(start).Round(time.Millisecond))
	} else {
		e.printf("model %s: %d blocks, %s (from %s)\n", m.ID, len(m.Manifest.Blocks), humanBytes(m.Manifest.TotalSize()), modelDir)
	}

	// Blocks chained must compute what the unsplit model computes.
	diff, err := compareOnRandom(rt, m)
	if err != nil {
		return err
	}
	e.printf("blocks chained vs full.onnx on random input: max abs diff %.2g\n", diff)

	n := len(m.Manifest.Blocks)
	if *hops < 1 || *hops > n {
		return fmt.Errorf("--hops %d: want 1..%d", *hops, n)
	}
	var stages []*shards.Span
	defer func() {
		for _, s := range stages {
			s.Close()
		}
	}()
	for h := range *hops {
		start, end := h*n / *hops, (h+1)*n / *hops
		span, err := rt.LoadSpan(m, start, end)
		if err != nil {
			return err
		}
		stages = append(stages, span)
		e.printf("hop %d serves blocks %d-%d, sends on: %s\n", h, start, end-1, names(span.Outputs()))
	}

	texts := strings.Split(*prompts, "|")
	pipe := newPipeline(ctx, stages)
	defer pipe.close()
	start := time.Now()
	results := make([]string, len(texts))
	errs := make([]error, len(texts))
	var wg sync.WaitGroup
	for i, text := range texts {
		wg.Go(func() { results[i], errs[i] = pipe.generate(m.Manifest.Decoder, text, *tokens) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	took := time.Since(start)
	for i, text := range texts {
		e.printf("  %q -> \"%s\"\n", text, results[i])
	}
	e.printf("%d generations pipelined through %d hops: %d tokens in %s (%.0f tokens/s)\n",
		len(texts), *hops, len(texts)**tokens, took.Round(time.Millisecond), float64(len(texts)**tokens)/took.Seconds())

	// The same generations through the unsplit model, one at a time: the
	// pipelined hops must have produced exactly the same tokens.
	whole, err := rt.LoadWhole(m)
	if err != nil {
		return err
	}
	defer whole.Close()
	single := newPipeline(ctx, []*shards.Span{whole})
	defer single.close()
	start = time.Now()
	for i, text := range texts {
		want, err := single.generate(m.Manifest.Decoder, text, *tokens)
		if err != nil {
			return err
		}
		if want != results[i] {
			return fmt.Errorf("prompt %q: pipelined blocks generated %q, full.onnx %q", text, results[i], want)
		}
	}
	took = time.Since(start)
	e.printf("full.onnx, one generation at a time: %s (%.0f tokens/s); every token matches the pipelined blocks\n",
		took.Round(time.Millisecond), float64(len(texts)**tokens)/took.Seconds())
	e.printf("(the weights are random, so the text is noise; what matters is that every path gives the same tokens)\n")
	return nil
}

func names(ts []shards.TensorSpec) string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Name
	}
	return strings.Join(out, ", ")
}

func compareOnRandom(rt *shards.Runtime, m *shards.Model) (float64, error) {
	blocks, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		return 0, err
	}
	defer blocks.Close()
	in := shards.RandomInputs(m.Manifest, 7, 2, 5)
	out, err := blocks.Run(in)
	if err != nil {
		return 0, err
	}
	return compareWhole(rt, m, filepath.Join(m.Dir, shards.WholeFile), in, out)
}

// pipeline runs each span in its own goroutine; a step enters hop 0 and
// flows hop to hop, so steps of different generations overlap in time.
type pipeline struct {
	in     []chan *step
	cancel context.CancelFunc
	wg     sync.WaitGroup
	stages []*shards.Span
}

type step struct {
	sessions []shards.Session // one per hop: each keeps its blocks' KV cache
	tensors  shards.Tensors
	done     chan error
}

func newPipeline(ctx context.Context, stages []*shards.Span) *pipeline {
	ctx, cancel := context.WithCancel(ctx)
	p := &pipeline{cancel: cancel, stages: stages}
	for range stages {
		p.in = append(p.in, make(chan *step, 4))
	}
	for h := range stages {
		p.wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case s := <-p.in[h]:
					out, err := s.sessions[h].Step(s.tensors)
					if err != nil || h == len(stages)-1 {
						s.tensors = out
						s.done <- err
						continue
					}
					s.tensors = out
					p.in[h+1] <- s
				}
			}
		})
	}
	return p
}

func (p *pipeline) close() { p.cancel(); p.wg.Wait() }

// generate decodes greedily through the hops with one session per hop.
func (p *pipeline) generate(dec *shards.DecoderSpec, prompt string, n int) (string, error) {
	s := &step{done: make(chan error, 1)}
	for _, st := range p.stages {
		sess := st.NewSession()
		defer sess.Close()
		s.sessions = append(s.sessions, sess)
	}
	tokens := bytesToTokens(prompt)
	fed := 0
	var out strings.Builder
	for range n {
		if len(tokens) >= dec.MaxContext {
			break
		}
		s.tensors = shards.StepInputs(dec, tokens, fed)
		p.in[0] <- s
		if err := <-s.done; err != nil {
			return "", err
		}
		fed = len(tokens)
		logits, err := shards.LastLogits(s.tensors[dec.Logits])
		if err != nil {
			return "", err
		}
		tok := argmax(logits)
		tokens = append(tokens, tok)
		out.WriteString(printableByte(tok))
	}
	return out.String(), nil
}

func argmax(v []float32) int64 {
	best := 0
	for i := range v {
		if v[i] > v[best] {
			best = i
		}
	}
	return int64(best)
}
