package cli

import (
	"context"
	"encoding/json"
	"slices"

	"github.com/infermesh/infermesh/node"
	"github.com/infermesh/infermesh/protocol"
)

func printRoute(e *env, route []node.HopTiming) {
	for i, h := range route {
		e.printf("  hop %d  %s  blocks %d-%d  compute %.2f ms\n", i, h.Peer, h.Start, h.End-1, float64(h.ComputeUS)/1000)
	}
}

func runInfer(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh infer", "--model CID --input FILE [--data DIR | --api ADDR]",
		"Runs one pass of a model through the mesh via the local node and prints the outputs (JSON),\n"+
			"the route taken and per-hop timings.")
	model := fs.String("model", "", "model ID")
	input := fs.String("input", "", "JSON file of input tensors ({name: {dtype, shape, data}}); - for stdin")
	fp16 := fs.Bool("fp16", false, "send float32 activations as float16 between hops")
	quiet := fs.Bool("quiet", false, "print output shapes, not data")
	data := fs.String("data", node.DefaultDataDir(), "data directory of the local node")
	api := fs.String("api", "", "the local node's API address")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	if *model == "" || *input == "" {
		fs.Usage()
		return errUsage
	}
	c, err := nodeClient(*api, *data)
	if err != nil {
		return err
	}
	inputs, err := readTensors(*input)
	if err != nil {
		return err
	}
	resp, err := c.InferWith(ctx, node.InferRequest{Model: *model, Inputs: inputs, FP16: *fp16})
	if err != nil {
		return err
	}
	if *quiet {
		for _, name := range sortedTensorNames(resp.Outputs) {
			e.printf("%s: %v\n", name, resp.Outputs[name])
		}
	} else {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(resp.Outputs); err != nil {
			return err
		}
	}
	e.printf("route (%d hops, %.2f ms end to end, %d failovers):\n", len(resp.Route), resp.TotalMS, resp.Failovers)
	printRoute(e, resp.Route)
	return nil
}

func sortedTensorNames(m map[string]*protocol.Tensor) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func runGenerate(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh generate", "--model CID --prompt TEXT [--tokens N] [--data DIR | --api ADDR]",
		"Generates text through the mesh via the local node: a session along a route of peers, each keeping\n"+
			"the KV cache of its blocks. Prints the text, the route and per-hop timings.")
	model := fs.String("model", "", "model ID")
	prompt := fs.String("prompt", "", "prompt text, tokenized with the model's tokenizer")
	tokens := fs.Int("tokens", 32, "tokens to generate")
	temp := fs.Float64("temperature", 0, "sampling temperature (0 = greedy)")
	topK := fs.Int("top-k", 0, "sample among the k most likely tokens (0 = all)")
	seed := fs.Uint64("seed", 0, "sampling seed")
	fp16 := fs.Bool("fp16", false, "send float32 activations as float16 between hops")
	data := fs.String("data", node.DefaultDataDir(), "data directory of the local node")
	api := fs.String("api", "", "the local node's API address")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	if *model == "" || *prompt == "" {
		fs.Usage()
		return errUsage
	}
	c, err := nodeClient(*api, *data)
	if err != nil {
		return err
	}
	req := node.GenerateAPIRequest{Model: *model, Prompt: *prompt, MaxTokens: *tokens, Temperature: *temp, TopK: *topK, Seed: *seed, FP16: *fp16}
	// Tokens are printed as they arrive.
	var resp node.GenerateResponse
	e.printf("%s", *prompt)
	for tok, err := range c.GenerateStream(ctx, req, &resp) {
		if err != nil {
			e.printf("\n")
			return err
		}
		e.printf("%s", printableText(tok.Text))
	}
	e.printf("\n")
	e.printf("%d tokens: first after %.1f ms, then %.0f tokens/s; %d failovers\nroute (mean compute per step):\n",
		len(resp.Tokens), resp.FirstTokenMS, resp.TokensPerS, resp.Failovers)
	printRoute(e, resp.Route)
	return nil
}
