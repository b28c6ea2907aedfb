package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
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
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
)

// The demo starts a small real mesh on this machine: nodes with their own
// identities, libp2p over QUIC on loopback and the private DHT, each serving
// a span of an imported Llama-architecture model (random weights in true
// Hugging Face layout, with the real Llama 3 tokenizer and chat template).
// A requester node that serves nothing sends a single pass and several chat
// completions through it at once over its OpenAI-compatible API; every
// result is checked against running the model locally.
func runDemo(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh demo", "[flags]",
		"Starts a mesh of nodes on loopback (QUIC, private DHT), imports a Llama-architecture checkpoint with\n"+
			"random weights and the real Llama 3 tokenizer, splits it across them and chats through the\n"+
			"OpenAI-compatible API, printing routes and timings, each answer checked against a local run.")
	dir := fs.String("dir", "demo", "folder for the demo's model and node data")
	tokenizer := fs.String("tokenizer", filepath.Join(".cache", "tokenizers", "llama3"),
		"folder with the Llama 3 tokenizer.json and tokenizer_config.json (`make tokenizer` fetches them)")
	layers := fs.Int("layers", 4, "decoder layers")
	hidden := fs.Int("hidden", 256, "model width (hidden_size)")
	hops := fs.Int("hops", 3, "nodes the model is split across")
	prompts := fs.String("prompts", "Hello mesh!|What is peer-to-peer inference?|Écris un haïku sur les réseaux.|用一句话介绍你自己", "user messages separated by |")
	tokens := fs.Int("tokens", 24, "tokens to generate per reply")
	verbose := fs.Bool("v", false, "show the nodes' logs")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	logger := slog.New(slog.DiscardHandler)
	if *verbose {
		logger = slog.New(slog.NewTextHandler(e.stderr, nil))
	}

	m, err := demoModel(e, *dir, *tokenizer, *layers, *hidden)
	if err != nil {
		return err
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
		nd, err := start(fmt.Sprintf("server%d", h), boot, fmt.Sprintf("%s:%d-%d", m.Dir, first, end-1))
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

	// Chats through the requester's OpenAI-compatible API, as an app sends
	// them, several at once: their steps overlap in the pipeline.
	api := &demoAPI{base: "http://" + requester.APIAddr(), model: m.ID.String()}
	texts := strings.Split(*prompts, "|")
	first, err := api.tokenize(ctx, texts[0])
	if err != nil {
		return err
	}
	e.printf("\nthe model's chat template turns %q into %d tokens:\n%s\n", texts[0], len(first.Tokens), indent(strings.Join(first.Pieces, "")))
	answers := make([]*node.Completion, len(texts))
	errs := make([]error, len(texts))
	var wg sync.WaitGroup
	genStart := time.Now()
	for i, text := range texts {
		wg.Go(func() { answers[i], errs[i] = api.chat(ctx, text, *tokens) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	took := time.Since(genStart)
	generated := 0
	for _, a := range answers {
		generated += a.Usage.CompletionTokens
	}
	e.printf("\n%d chats through the mesh at once (POST /v1/chat/completions): %d tokens in %s (%.0f tokens/s)\n", len(texts), generated,
		took.Round(time.Millisecond), float64(generated)/took.Seconds())
	for i, text := range texts {
		prompt, err := api.tokenize(ctx, text)
		if err != nil {
			return err
		}
		wantTokens, err := localGenerate(local, m, prompt.Tokens, *tokens)
		if err != nil {
			return err
		}
		wantText, err := api.detokenize(ctx, wantTokens)
		if err != nil {
			return err
		}
		a := answers[i]
		got := *a.Choices[0].Message.Content
		if got != wantText || a.Usage.PromptTokens != len(prompt.Tokens) || a.Usage.CompletionTokens != len(wantTokens)+eosCount(wantTokens, *tokens) {
			return fmt.Errorf("chat %q: the mesh answered %q (usage %+v), the local run %q (%d tokens)", text, got, *a.Usage, wantText, len(wantTokens))
		}
		e.printf("  %q -> %q  (%d+%d tokens)\n", text, printableText(got), a.Usage.PromptTokens, a.Usage.CompletionTokens)
	}
	e.printf("every token matches the local run\n")
	e.printf("(the weights are random: no model weights are reachable here, so the replies are noise; the tokenizer\n" +
		" and chat template are Llama 3's own, and a real checkpoint imports the same way: infermesh shard import)\n")
	return nil
}

// demoModel returns the demo's imported model in dir, writing a
// random-weight checkpoint and importing it the first time.
func demoModel(e *env, dir, tokenizer string, layers, hidden int) (*shards.Model, error) {
	src := filepath.Join(dir, fmt.Sprintf("llama-hf-l%d-d%d", layers, hidden))
	out := filepath.Join(dir, fmt.Sprintf("llama-l%d-d%d", layers, hidden))
	if m, err := shards.OpenModel(out); err == nil && m.Verify() == nil {
		e.printf("model %s: %d blocks, %s (from %s)\n", m.ID, len(m.Manifest.Blocks), humanBytes(m.Manifest.TotalSize()), out)
		return m, nil
	}
	tokJSON, err := os.ReadFile(filepath.Join(tokenizer, "tokenizer.json"))
	if err != nil {
		return nil, fmt.Errorf("the demo uses the real Llama 3 tokenizer: %w (run `make tokenizer`, or pass --tokenizer DIR)", err)
	}
	tokCfg, err := os.ReadFile(filepath.Join(tokenizer, "tokenizer_config.json"))
	if err != nil {
		return nil, err
	}
	cfg := checkpoint.Llama32_1B() // its tokenizer's shape and rope, smaller
	cfg.Hidden, cfg.Intermediate, cfg.Layers, cfg.Heads, cfg.KVHeads, cfg.HeadDim = hidden, 4*hidden, layers, 8, 2, 0
	cfg.MaxPositions = 4096
	// Untied: with random weights a tied head mostly echoes the last token.
	cfg.TieEmbeddings = false
	start := time.Now()
	os.RemoveAll(src)
	if err := checkpoint.Write(src, cfg, tokJSON, tokCfg); err != nil {
		return nil, err
	}
	e.printf("wrote a random-weight Llama checkpoint in Hugging Face layout (%d layers, hidden %d, vocabulary %d, %s)\n"+
		"with the real Llama 3 tokenizer and chat template: %s\n", layers, hidden, cfg.Vocab, cfg.DType, src)
	os.RemoveAll(out)
	m, err := hf.Import(src, out, hf.Options{})
	if err != nil {
		return nil, err
	}
	e.printf("imported (infermesh shard import %s --out %s): model %s, %d blocks, %s in %s\n\n", src, out, m.ID,
		len(m.Manifest.Blocks), humanBytes(m.Manifest.TotalSize()), time.Since(start).Round(time.Millisecond))
	return m, nil
}

// eosCount is 1 when a local run of n tokens stopped early at an eos token
// (the mesh counts it as generated), else 0.
func eosCount(toks []int64, n int) int {
	if len(toks) < n {
		return 1
	}
	return 0
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(printableText(s), "\n", "\n    ")
}

// demoAPI is the requester's HTTP API, as an app uses it.
type demoAPI struct{ base, model string }

func (a *demoAPI) post(ctx context.Context, path string, body, out any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.base+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, data)
	}
	return json.Unmarshal(data, out)
}

func (a *demoAPI) messages(text string) []map[string]string {
	return []map[string]string{{"role": "user", "content": text}}
}

func (a *demoAPI) tokenize(ctx context.Context, text string) (*node.TokenizeResponse, error) {
	var out node.TokenizeResponse
	return &out, a.post(ctx, "/v1/tokenize", map[string]any{"model": a.model, "messages": a.messages(text), "with_pieces": true}, &out)
}

func (a *demoAPI) detokenize(ctx context.Context, toks []int64) (string, error) {
	var out node.DetokenizeResponse
	err := a.post(ctx, "/v1/detokenize", node.DetokenizeRequest{Model: a.model, Tokens: toks}, &out)
	return out.Content, err
}

func (a *demoAPI) chat(ctx context.Context, text string, maxTokens int) (*node.Completion, error) {
	var out node.Completion
	err := a.post(ctx, "/v1/chat/completions", map[string]any{"model": a.model, "messages": a.messages(text),
		"max_tokens": maxTokens, "temperature": 0}, &out)
	if err == nil && (len(out.Choices) != 1 || out.Choices[0].Message == nil || out.Choices[0].Message.Content == nil || out.Usage == nil) {
		err = fmt.Errorf("chat: an answer without a message or usage: %+v", out)
	}
	return &out, err
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

// localGenerate decodes greedily through a local span, up to n tokens or
// the model's first eos token (left out).
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
		if slices.Contains(m.Manifest.Decoder.EOS, tok) {
			break
		}
		out = append(out, tok)
	}
	return out, nil
}
