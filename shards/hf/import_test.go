package hf_test

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// Stand-ins for the tokenizer files: the importer copies them, it does not
// read them.
var (
	tokenizerJSON       = []byte(`{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}`)
	tokenizerConfigJSON = []byte(`{"bos_token":"<s>","eos_token":"</s>"}`)
)

// writeCheckpoint writes a random-weight checkpoint of cfg into a new
// folder and returns it.
func writeCheckpoint(tb testing.TB, cfg checkpoint.Config) string {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "tiny-"+strings.ToLower(strings.TrimSuffix(cfg.Architecture, "ForCausalLM")))
	if err := checkpoint.Write(dir, cfg, tokenizerJSON, tokenizerConfigJSON); err != nil {
		tb.Fatal(err)
	}
	return dir
}

func importModel(tb testing.TB, src string, opts hf.Options) *shards.Model {
	tb.Helper()
	m, err := hf.Import(src, tb.TempDir(), opts)
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

// editConfig rewrites src/config.json through edit.
func editConfig(tb testing.TB, src string, edit func(map[string]any)) {
	tb.Helper()
	path := filepath.Join(src, "config.json")
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		tb.Fatal(err)
	}
	edit(m)
	if b, err = json.Marshal(m); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		tb.Fatal(err)
	}
}

func TestImportManifest(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Llama)
	src := writeCheckpoint(t, cfg)
	os.WriteFile(filepath.Join(src, "chat_template.jinja"), []byte("{{ messages }}"), 0o644)
	var last hf.Progress
	calls := 0
	m := importModel(t, src, hf.Options{Progress: func(p hf.Progress) { last = p; calls++ }})
	man := m.Manifest
	if err := m.Verify(); err != nil {
		t.Fatal(err)
	}
	if len(man.Blocks) != cfg.Layers+2 || man.Kind != hf.Kind || man.Name != "tiny-llama" {
		t.Fatalf("%d blocks, kind %q, name %q", len(man.Blocks), man.Kind, man.Name)
	}
	d := man.Decoder
	if d.Tokenizer != shards.TokenizerHF || d.Vocab != cfg.Vocab || d.MaxContext != cfg.MaxPositions || !slices.Equal(d.EOS, []int64{2, 3}) {
		t.Fatalf("decoder %+v", d)
	}
	var names []string
	for _, f := range man.Files {
		names = append(names, f.Name)
		want, _ := os.ReadFile(filepath.Join(src, f.Name))
		got, err := m.File(f.Name)
		if err != nil || string(got) != string(want) {
			t.Fatalf("file %s: %v", f.Name, err)
		}
	}
	if want := []string{"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "chat_template.jinja"}; !slices.Equal(names, want) {
		t.Fatalf("files %q, want %q", names, want)
	}
	// Parameters: embedding, lm_head, final norm, and per layer the
	// projections and two norms.
	h, i, kv := int64(cfg.Hidden), int64(cfg.Intermediate), int64(cfg.KVHeads*cfg.Hidden/cfg.Heads)
	params := 2*int64(cfg.Vocab)*h + h + int64(cfg.Layers)*(2*h*h+2*kv*h+3*h*i+2*h)
	if info := man.Info; info.Architecture != hf.ArchLlama || info.DType != "float32" || info.Parameters != params {
		t.Fatalf("info %+v, want %d parameters", info, params)
	}
	if last.Done != last.Total || last.Total != 4*params || last.Blocks != len(man.Blocks) || calls < len(man.Blocks) {
		t.Fatalf("last progress %+v after %d calls", last, calls)
	}
	for i, b := range man.Blocks {
		if i > 0 && i <= cfg.Layers && len(b.State) != 2 {
			t.Fatalf("block %d: state %v", i, b.State)
		}
	}
}

func TestImportLayersPerBlock(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Qwen3) // 3 layers: blocks of 2 and 1
	m := importModel(t, writeCheckpoint(t, cfg), hf.Options{LayersPerBlock: 2})
	if n := len(m.Manifest.Blocks); n != 4 {
		t.Fatalf("%d blocks, want 4", n)
	}
	if s := m.Manifest.Blocks[1].State; len(s) != 4 || s[3].Input != "past_value_1" {
		t.Fatalf("block 1 state %v", s)
	}
}

func TestImportDeterministic(t *testing.T) {
	src := writeCheckpoint(t, checkpoint.Tiny(checkpoint.Qwen2))
	a := importModel(t, src, hf.Options{})
	b := importModel(t, src, hf.Options{})
	if !a.ID.Equals(b.ID) {
		t.Fatalf("two imports of one checkpoint: %s and %s", a.ID, b.ID)
	}
	c := importModel(t, src, hf.Options{DType: "float32"})
	if a.ID.Equals(c.ID) {
		t.Fatal("float16 and float32 imports have the same ID")
	}
	t.Logf("model %s", a.ID)
}

// TestImportRefuses checks that an unsupported architecture, rope type or
// activation is refused by name, and nothing is written.
func TestImportRefuses(t *testing.T) {
	cases := []struct {
		name  string
		edit  func(map[string]any)
		names string
	}{
		{"architecture", func(m map[string]any) { m["architectures"] = []string{"GPT2LMHeadModel"} }, "GPT2LMHeadModel"},
		{"rope type", func(m map[string]any) {
			m["rope_scaling"] = map[string]any{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
		}, "rope_scaling.rope_type = yarn"},
		{"activation", func(m map[string]any) { m["hidden_act"] = "gelu_pytorch_tanh" }, "hidden_act"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := writeCheckpoint(t, checkpoint.Tiny(checkpoint.Llama))
			editConfig(t, src, tc.edit)
			out := t.TempDir()
			_, err := hf.Import(src, out, hf.Options{})
			if !errors.Is(err, hf.ErrUnsupported) || !strings.Contains(err.Error(), tc.names) {
				t.Fatalf("got %v, want ErrUnsupported naming %q", err, tc.names)
			}
			if entries, _ := os.ReadDir(out); len(entries) != 0 {
				t.Fatalf("a refused import wrote %d entries", len(entries))
			}
			t.Log(err)
		})
	}
}

// TestImportTruncated cuts the weights file short: the import fails with
// an error, leaves no manifest and no temporary file.
func TestImportTruncated(t *testing.T) {
	src := writeCheckpoint(t, checkpoint.Tiny(checkpoint.Llama))
	path := filepath.Join(src, safetensors.SingleFile)
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, cut := range []int64{st.Size() - 100, st.Size() / 2, 20} {
		if err := os.Truncate(path, cut); err != nil {
			t.Fatal(err)
		}
		out := t.TempDir()
		_, err := hf.Import(src, out, hf.Options{})
		if err == nil {
			t.Fatalf("cut to %d bytes: imported", cut)
		}
		t.Logf("cut to %d bytes: %v", cut, err)
		if _, err := os.Stat(filepath.Join(out, shards.ManifestFile)); err == nil {
			t.Fatal("a failed import wrote a manifest")
		}
		if tmp, _ := filepath.Glob(filepath.Join(out, shards.BlocksDir, ".tmp*")); len(tmp) != 0 {
			t.Fatalf("a failed import left %q", tmp)
		}
	}
}

// TestImportOverflow puts a bfloat16 weight beyond float16's range: a
// float16 import fails naming the tensor and suggesting float32; a float32
// import succeeds.
func TestImportOverflow(t *testing.T) {
	src := writeCheckpoint(t, checkpoint.Tiny(checkpoint.Qwen2))
	const victim = "model.layers.1.mlp.up_proj.weight"
	rewriteTensor(t, src, victim, func(raw []byte) {
		binary.LittleEndian.PutUint16(raw[6:], safetensors.Float32ToBF16(1e6))
	})
	_, err := hf.Import(src, t.TempDir(), hf.Options{})
	if !errors.Is(err, hf.ErrOverflow) || !strings.Contains(err.Error(), victim) || !strings.Contains(err.Error(), "float32") {
		t.Fatalf("got %v, want ErrOverflow naming %s and float32", err, victim)
	}
	t.Log(err)
	importModel(t, src, hf.Options{DType: "float32"})
}

// rewriteTensor rewrites src/model.safetensors with one tensor's bytes
// changed by edit.
func rewriteTensor(tb testing.TB, src, name string, edit func([]byte)) {
	tb.Helper()
	path := filepath.Join(src, safetensors.SingleFile)
	ck, err := safetensors.OpenCheckpoint(src)
	if err != nil {
		tb.Fatal(err)
	}
	defer ck.Close()
	var infos []safetensors.Info
	for _, n := range ck.Names() {
		in, _ := ck.Info(n)
		infos = append(infos, in)
	}
	w, err := safetensors.Create(path+".new", infos, map[string]string{"format": "pt"})
	if err != nil {
		tb.Fatal(err)
	}
	for _, in := range infos {
		raw, err := ck.Raw(in.Name)
		if err != nil {
			tb.Fatal(err)
		}
		if in.Name == name {
			edit(raw)
		}
		if err := w.Write(in.Name, raw); err != nil {
			tb.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		tb.Fatal(err)
	}
}

// TestImportSlidingWindow: a Mistral window under max_position_embeddings
// becomes the model's context, so that full attention is exact.
func TestImportSlidingWindow(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Mistral)
	cfg.SlidingWindow = 128
	m := importModel(t, writeCheckpoint(t, cfg), hf.Options{})
	if got := m.Manifest.Decoder.MaxContext; got != 128 {
		t.Fatalf("context %d, want the window 128", got)
	}
}
