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
	for _, srv := range tm.servers {
		st := srv.Status()
		if len(st.Serving) != 1 || st.Serving[0].ResidentBytes != m.Manifest.ResidentBytes(st.Serving[0].Start, st.Serving[0].End) ||
			st.Serving[0].ResidentBytes <= 0 || st.Load.FreeKVBytes <= 0 {
			t.Errorf("a server advertises %+v, load %+v", st.Serving, st.Load)
		}
	}
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

// A node budgets the memory its blocks take loaded, which depends on how
// they store their weights, not only their file sizes (a q4 block's file
// is also about 0.3x a float16 one's: TestQuantizedBlockBytes). What it
// advertises is checked in TestQuantizedModelThroughMesh.
func TestSpanCapacityCountsResidentBytes(t *testing.T) {
	blocks := make([]shards.BlockSpec, 20)
	for i := range blocks {
		blocks[i].Size = 100 << 20
	}
	n := &Node{cfg: Config{MaxMemory: 2900 << 20}}
	f16 := &shards.Model{Manifest: &shards.Manifest{Blocks: blocks, Info: &shards.ModelInfo{DType: "float16"}}}
	q4 := &shards.Model{Manifest: &shards.Manifest{Blocks: blocks, Info: &shards.ModelInfo{DType: "float16", Quantization: "q4/32"}}}
	if got := n.spanCapacity(f16); got != 10 {
		t.Errorf("float16: %d blocks of 100 MiB in 2900 MiB, want 10 (2.9x their size loaded)", got)
	}
	if got := n.spanCapacity(q4); got != 12 {
		t.Errorf("q4: %d blocks of 100 MiB in 2900 MiB, want 12 (2.4x their size loaded)", got)
	}
}
