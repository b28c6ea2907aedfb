package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/node"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// The demo starts a small real mesh on this machine: nodes with their own
// identities, libp2p over QUIC on loopback and the private DHT, each serving
// a span of a GPT-style model's blocks. A requester node that serves
// nothing sends a single pass and several generations through it at once;
// every result is checked against running the model locally.
func runDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh demo", "[flags]",
		"Starts a mesh of nodes on loopback (QUIC, private DHT), splits a GPT-style model across them\n"+
			"and generates through it, printing routes and timings, each checked against a local run.")
	dir := fs.String("dir", "demo", "folder for the demo's model and node data")
	layers := fs.Int("layers", 8, "decoder layers")
	dim := fs.Int("dim", 256, "model width")
	hops := fs.Int("hops", 3, "nodes the model is split across")
	prompts := fs.String("prompts", "Hello mesh|Peer to peer|Inference without a cloud|Pipelines overlap", "prompts separated by |")
	tokens := fs.Int("tokens", 24, "tokens to generate per prompt")
	verbose := fs.Bool("v", false, "show the nodes' logs")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	logger := slog.New(slog.DiscardHandler)
	if *verbose {
		logger = slog.New(slog.NewTextHandler(e.stderr, nil))
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
	n := len(m.Manifest.Blocks)
	if *hops < 1 || *hops > n {
		return fmt.Errorf("--hops %d: want 1..%d", *hops, n)
	}

	// The nodes: a requester, then one server per span.
	var nodes []*node.Node
	defer func() {
		var wg sync.WaitGroup
		for _, nd := range nodes {
			wg.Go(func() { nd.Close() })
		}
		wg.Wait()
	}()
	start := func(name string, bootstrap []string, serve ...string) (*node.Node, error) {
		data := filepath.Join(*dir, "nodes", name)
		os.RemoveAll(data)
		cfg := node.DefaultConfig()
		cfg.Listen = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}
		cfg.API = "127.0.0.1:0"
		cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
		cfg.Bootstrap, cfg.Serve, cfg.Threads = bootstrap, serve, 1
		if _, err := node.Init(data, cfg); err != nil {
			return nil, err
		}
		nd, err := node.New(ctx, cfg, node.Options{DataDir: data, Logger: logger})
		if err != nil {
			return nil, err
		}
		nodes = append(nodes, nd)
		return nd, nil
	}
	requester, err := start("requester", nil)
	if err != nil {
		return err
	}
	boot := []string{requester.Status().Addrs[0]}
	for h := range *hops {
		first, end := h*n / *hops, (h+1)*n / *hops
		nd, err := start(fmt.Sprintf("server%d", h), boot, fmt.Sprintf("%s:%d-%d", modelDir, first, end-1))
		if err != nil {
			return err
		}
		e.printf("node %s serves blocks %d-%d\n", nd.Mesh().ID(), first, end-1)
	}
	waitStart := time.Now()
	for {
		cov, err := requester.Coverage(ctx, m.ID.String())
		if err == nil && cov.Complete && len(cov.Peers) == *hops {
			break
		}
		if time.Since(waitStart) > 20*time.Second {
			return fmt.Errorf("the mesh did not cover the model within 20 s: %+v %v", cov, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.printf("requester %s sees every block covered after %s\n\n", requester.Mesh().ID(), time.Since(waitStart).Round(time.Millisecond))

	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		return err
	}
	local, err := rt.LoadSpan(m, 0, n)
	if err != nil {
		return err
	}
	defer local.Close()

	// One pass through the mesh, against the local run.
	in := shards.RandomInputs(m.Manifest, 7, 1, 16)
	res, err := requester.Infer(ctx, m.ID, in, mesh.InferOptions{})
	if err != nil {
		return err
	}
	want, err := local.Run(in)
	if err != nil {
		return err
	}
	diff, err := protocol.MaxAbsDiff(want["logits"], res.Outputs["logits"])
	if err != nil {
		return err
	}
	e.printf("single pass through the mesh in %s, max abs diff from the local run %.2g\n", res.Info.Total.Round(time.Microsecond), diff)
	printHops(e, res.Info)

	// Several generations at once: their steps overlap in the pipeline.
	texts := strings.Split(*prompts, "|")
	results := make([]*node.GenerateResult, len(texts))
	errs := make([]error, len(texts))
	var wg sync.WaitGroup
	genStart := time.Now()
	for i, text := range texts {
		wg.Go(func() {
			results[i], errs[i] = requester.Generate(ctx, node.GenerateRequest{Model: m.ID, Prompt: bytesToTokens(text), MaxTokens: *tokens}, nil)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	took := time.Since(genStart)
	e.printf("\n%d generations through the mesh at once: %d tokens in %s (%.0f tokens/s)\n", len(texts), len(texts)**tokens,
		took.Round(time.Millisecond), float64(len(texts)**tokens)/took.Seconds())
	for i, text := range texts {
		got := results[i].Tokens
		wantTokens, err := localGenerate(local, m, bytesToTokens(text), len(got))
		if err != nil {
			return err
		}
		if !slices.Equal(got, wantTokens) {
			return fmt.Errorf("prompt %q: the mesh generated %v, the local run %v", text, got, wantTokens)
		}
		var out strings.Builder
		for _, t := range got {
			out.WriteString(printableByte(t))
		}
		e.printf("  %q -> \"%s\"  (first token %.1f ms)\n", text, out.String(), float64(results[i].FirstToken.Microseconds())/1000)
	}
	last := results[0].Steps[len(results[0].Steps)-1]
	e.printf("every token matches the local run; the route of the last step:\n")
	printHops(e, last)
	e.printf("(the weights are random, so the text is noise; what matters is that every path gives the same tokens)\n")
	return nil
}

func printHops(e *env, info *mesh.StepInfo) {
	for i, h := range info.Route {
		us := int64(0)
		if i < len(info.HopMicros) {
			us = info.HopMicros[i]
		}
		e.printf("  hop %d  %s  blocks %d-%d  compute %.2f ms\n", i, h.Peer, h.Start, h.End-1, float64(us)/1000)
	}
}

// localGenerate decodes greedily through a local span.
func localGenerate(span *shards.Span, m *shards.Model, prompt []int64, n int) ([]int64, error) {
	sess := span.NewSession()
	defer sess.Close()
	dec, err := shards.NewDecoder(m.Manifest.Decoder, sess, prompt, shards.Sampling{})
	if err != nil {
		return nil, err
	}
	var out []int64
	for range n {
		tok, err := dec.Next()
		if err != nil {
			return nil, err
		}
		out = append(out, tok)
	}
	return out, nil
}
