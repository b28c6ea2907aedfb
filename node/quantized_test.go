package node

import (
	"context"
	"path/filepath"
	"slices"
	"testing"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/gguf"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
)

// Acceptance 3 of issue 14: a q4 model, imported from a Q4_0 GGUF file (so
// its blocks hold the file's 4-bit weights and run on onnxruntime's
// MatMulNBits), split over 3 nodes, generates exactly the tokens the same
// blocks generate in this process: greedy and seeded sampling, as a decode
// ring and with the requester's loop.
func TestQuantizedModelThroughMesh(t *testing.T) {
	tokJSON, tokCfg := checkpoint.ByteTokenizer()
	cfg := checkpoint.Tiny(checkpoint.Llama)
	cfg.Layers, cfg.BOS, cfg.EOS, cfg.ExtraEOS = 4, 256, 257, nil
	path := filepath.Join(t.TempDir(), "tiny-q4_0.gguf")
	if err := checkpoint.WriteGGUF(path, cfg, checkpoint.GGUFTypes{Matrix: gguf.TypeQ4_0, Embedding: gguf.TypeQ4_0}, tokJSON, tokCfg); err != nil {
		t.Fatal(err)
	}
	m, notes, err := hf.ImportGGUF(path, filepath.Join(t.TempDir(), "model"), hf.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("imported: %s, %d blocks, %d bytes; notes %q", m.Manifest.Info.Quantization, len(m.Manifest.Blocks), m.Manifest.TotalSize(), notes)
	if m.Manifest.Info.Quantization != "q4/32" {
		t.Fatalf("quantization %q, want q4/32", m.Manifest.Info.Quantization)
	}
	tm := startMeshOf(t, m, "0-1", "2-3", "4-5")
	prompt := []int64{256, 'H', 'e', 'l', 'l', 'o'}
	const n = 24
	for _, tc := range []struct {
		name string
		s    shards.Sampling
	}{
		{"greedy", shards.Sampling{}},
		{"sampled", shards.Sampling{Temperature: 0.8, TopK: 40, TopP: 0.95, Seed: 7}},
	} {
		want, _ := localGenerateWith(t, m, prompt, n, tc.s)
		t.Logf("%s: %v", tc.name, want)
		for _, loop := range []bool{false, true} {
			res, err := tm.requester.Generate(context.Background(), GenerateRequest{Model: m.ID, Prompt: prompt, MaxTokens: n,
				Sampling: tc.s, Options: mesh.InferOptions{RequesterLoop: loop}}, nil)
			if err != nil {
				t.Fatalf("%s (requester loop %v): %v", tc.name, loop, err)
			}
			got := res.Tokens
			if i := slices.IndexFunc(got, func(tok int64) bool { return slices.Contains(m.Manifest.Decoder.EOS, tok) }); i >= 0 {
				got = got[:i] // the local run leaves the eos token out
			}
			if !slices.Equal(got, want) {
				t.Errorf("%s (requester loop %v): mesh %v\nlocal %v", tc.name, loop, got, want)
			}
		}
	}
}
