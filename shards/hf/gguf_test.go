package hf_test

import (
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/gguf"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/texttest"
)

// ggufFamily is a tiny checkpoint of one architecture with a tokenizer (a
// GGUF file carries its tokenizer): Llama 3's real one for Llama, and
// byteTokenizer's for the others (real vocabularies make slow tests;
// package vocab checks the conversion of Qwen3's and Llama 2's).
func ggufFamily(tb testing.TB, arch string) (checkpoint.Config, []byte, []byte) {
	tb.Helper()
	cfg := checkpoint.Tiny(arch)
	cfg.ExtraEOS = nil
	switch arch {
	case checkpoint.Llama:
		cfg.Vocab, cfg.BOS, cfg.EOS = 128256, 128000, 128001
		tj, tc := texttest.Files(tb, "llama3")
		return cfg, tj, tc
	}
	cfg.BOS, cfg.EOS = 256, 257
	tj, tc := byteTokenizer(tb)
	return cfg, tj, tc
}

// byteTokenizer is checkpoint.ByteTokenizer for a test.
func byteTokenizer(testing.TB) ([]byte, []byte) { return checkpoint.ByteTokenizer() }

// writeBoth writes cfg as a Hugging Face checkpoint and as the GGUF file
// llama.cpp's converter would make of it, with types.
func writeBoth(tb testing.TB, cfg checkpoint.Config, types checkpoint.GGUFTypes, tj, tc []byte) (hfDir, ggufPath string) {
	tb.Helper()
	hfDir = filepath.Join(tb.TempDir(), "hf")
	if err := checkpoint.Write(hfDir, cfg, tj, tc); err != nil {
		tb.Fatal(err)
	}
	ggufPath = filepath.Join(tb.TempDir(), "model.gguf")
	if err := checkpoint.WriteGGUF(ggufPath, cfg, types, tj, tc); err != nil {
		tb.Fatal(err)
	}
	return hfDir, ggufPath
}

func importGGUF(tb testing.TB, path string, opts hf.Options) (*shards.Model, []string) {
	tb.Helper()
	m, notes, err := hf.ImportGGUF(path, tb.TempDir(), opts)
	if err != nil {
		tb.Fatal(err)
	}
	return m, notes
}

// TestGGUFImportEqualsHF: a float32 GGUF file of each architecture, laid
// out as llama.cpp's converter lays it out, imports to the blocks the
// float32 import of the same Hugging Face checkpoint writes, byte for byte:
// tensor names, dimension order and the converter's permutation of Llama's
// query and key rows are all undone exactly. Llama's rope scaling travels
// as rope_freqs (float32 divisors in place of the float64 formula), so its
// decoder blocks differ in the last bits of the rotary table: its logits
// are compared instead. (Mistral comes back as Llama: llama.cpp writes it
// so.) The tokenizer comes through: both encode text alike.
func TestGGUFImportEqualsHF(t *testing.T) {
	for _, arch := range []string{checkpoint.Llama, checkpoint.Mistral, checkpoint.Qwen2, checkpoint.Qwen3} {
		t.Run(strings.ToLower(strings.TrimSuffix(arch, "ForCausalLM")), func(t *testing.T) {
			cfg, tj, tc := ggufFamily(t, arch)
			hfDir, path := writeBoth(t, cfg, checkpoint.GGUFTypes{Matrix: gguf.TypeF32, Embedding: gguf.TypeF32}, tj, tc)
			opts := hf.Options{Name: "same", DType: "float32"}
			fromGGUF, notes := importGGUF(t, path, opts)
			fromHF := importModel(t, hfDir, opts)
			if len(notes) > 0 {
				t.Errorf("notes %q for a float32 file", notes)
			}
			wantArch := arch
			if arch == checkpoint.Mistral {
				wantArch = checkpoint.Llama
			}
			if fromGGUF.Manifest.Info.Architecture != wantArch || len(fromGGUF.Manifest.Blocks) != len(fromHF.Manifest.Blocks) {
				t.Fatalf("GGUF import: %s with %d blocks, want %s with %d", fromGGUF.Manifest.Info.Architecture,
					len(fromGGUF.Manifest.Blocks), wantArch, len(fromHF.Manifest.Blocks))
			}
			rope := cfg.RopeScaling != nil
			for i, b := range fromGGUF.Manifest.Blocks {
				decoder := i > 0 && i < len(fromGGUF.Manifest.Blocks)-1
				if b.CID != fromHF.Manifest.Blocks[i].CID && !(rope && decoder) {
					t.Errorf("block %d: %s, the Hugging Face import's %s", i, b.CID, fromHF.Manifest.Blocks[i].CID)
				}
			}
			if st := compareLogits(t, fromHF, fromGGUF, cfg.Vocab); st.minCos < 0.999999 || st.agree != st.steps {
				t.Errorf("logits against the Hugging Face import: %s", st)
			}

			tokGGUF := loadTokenizer(t, fromGGUF)
			tokHF, err := text.Load(tj, tc)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"Hello, world!", "  spaces\tand\nnewlines 12345", "日本語 and émojis 🙂"} {
				a, _ := tokHF.Encode(s, false)
				b, _ := tokGGUF.Encode(s, false)
				if !slices.Equal(a, b) {
					t.Errorf("%q: the GGUF tokenizer gives %v, the original %v", s, b, a)
				}
			}
			if !slices.Equal(fromGGUF.Manifest.Decoder.EOS, []int64{cfg.EOS}) {
				t.Errorf("eos %v, want [%d]", fromGGUF.Manifest.Decoder.EOS, cfg.EOS)
			}
		})
	}
}

func loadTokenizer(tb testing.TB, m *shards.Model) *text.Tokenizer {
	tb.Helper()
	tj, err := m.File("tokenizer.json")
	if err != nil {
		tb.Fatal(err)
	}
	tc, err := m.File("tokenizer_config.json")
	if err != nil {
		tb.Fatal(err)
	}
	tok, err := text.Load(tj, tc)
	if err != nil {
		tb.Fatal(err)
	}
	return tok
}

// TestGGUFQuantTypes imports GGUF files whose weights are Q8_0 and Q4_0
// (kept as they are: the blocks hold the file's bits), Q6_K, Q5_K and Q4_K
// (dequantized and quantized again to q8 or q4, which the notes say) and
// F16, on a width the K-quants' 256-element super-blocks divide. Each is
// compared with the float32 import of the same file (the file's own
// values, dequantized): what the import adds to the file's own loss. The
// loss against the checkpoint the file was made from is logged.
func TestGGUFQuantTypes(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Qwen3)
	tj, tc := byteTokenizer(t)
	cfg.BOS, cfg.EOS = 256, 257
	cfg.Hidden, cfg.Intermediate, cfg.Heads, cfg.KVHeads, cfg.HeadDim, cfg.Layers = 256, 512, 4, 2, 64, 2
	hfDir := filepath.Join(t.TempDir(), "hf")
	if err := checkpoint.Write(hfDir, cfg, tj, tc); err != nil {
		t.Fatal(err)
	}
	original := importModel(t, hfDir, hf.Options{DType: "float32"})
	cases := []struct {
		typ     gguf.Type
		quant   string  // the import's quantization
		cos     float64 // mean logits cosine goal against the file's values
		convert bool    // the notes must say the tensors were converted
	}{
		{gguf.TypeF16, "", 0.999999, false},
		{gguf.TypeQ8_0, "q8/32", 0.9995, false},
		{gguf.TypeQ6_K, "q8/32", 0.999, true},
		{gguf.TypeQ5_K, "q8/32", 0.999, true},
		{gguf.TypeQ4_0, "q4/32", 0.999, false},
		{gguf.TypeQ4_K, "q4/32", 0.98, true},
	}
	for _, c := range cases {
		t.Run(c.typ.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "model.gguf")
			if err := checkpoint.WriteGGUF(path, cfg, checkpoint.GGUFTypes{Matrix: c.typ, Embedding: c.typ}, tj, tc); err != nil {
				t.Fatal(err)
			}
			m, notes := importGGUF(t, path, hf.Options{})
			values, _ := importGGUF(t, path, hf.Options{Quantize: "none", DType: "float32"})
			st := compareLogits(t, values, m, cfg.Vocab)
			orig := compareLogits(t, original, m, cfg.Vocab)
			t.Logf("%s as %s: against the file's values %s; against the original checkpoint %s; blocks %d bytes (float32 %d); notes %q",
				c.typ, m.Manifest.Info.Quantization, st, orig, m.Manifest.TotalSize(), original.Manifest.TotalSize(), notes)
			if got := m.Manifest.Info.Quantization; got != c.quant {
				t.Errorf("quantization %q, want %q", got, c.quant)
			}
			if st.meanCos < c.cos {
				t.Errorf("mean logits cosine %.5f against the file's values, want >= %g", st.meanCos, c.cos)
			}
			said := slices.ContainsFunc(notes, func(n string) bool { return strings.Contains(n, c.typ.String()+" tensors dequantized") })
			if said != c.convert {
				t.Errorf("notes %q: saying %s tensors were converted: %v, want %v", notes, c.typ, said, c.convert)
			}
		})
	}
}

// TestGGUFRefuses: what the importer cannot run is refused by name.
func TestGGUFRefuses(t *testing.T) {
	cfg, tj, tc := ggufFamily(t, checkpoint.Qwen2)
	good := filepath.Join(t.TempDir(), "good.gguf")
	if err := checkpoint.WriteGGUF(good, cfg, checkpoint.GGUFTypes{Matrix: gguf.TypeF16, Embedding: gguf.TypeF16}, tj, tc); err != nil {
		t.Fatal(err)
	}
	// rewrite copies good with its metadata edited and one tensor's type
	// replaced (written raw, garbage of the right size).
	rewrite := func(t *testing.T, edit func(kv gguf.KV) (gguf.KV, bool), retype map[string]gguf.Type) string {
		f, err := gguf.Open(good)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		path := filepath.Join(t.TempDir(), "edited.gguf")
		w, err := gguf.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range f.Metadata().KVs() {
			if kv, keep := edit(kv); keep {
				if err := w.AddKV(kv.Key, kv.Value); err != nil {
					t.Fatal(err)
				}
			}
		}
		for _, ti := range f.Tensors() {
			typ := ti.Type
			if r, ok := retype[ti.Name]; ok {
				typ = r
			}
			if err := w.AddTensor(ti.Name, typ, ti.Dims...); err != nil {
				t.Fatal(err)
			}
		}
		for _, ti := range f.Tensors() {
			if r, ok := retype[ti.Name]; ok {
				n, err := r.RowBytes(ti.RowLen())
				if err != nil {
					t.Fatal(err)
				}
				if err := w.WriteRaw(make([]byte, n*ti.Rows())); err != nil {
					t.Fatal(err)
				}
				continue
			}
			raw := make([]byte, ti.Size)
			if err := f.ReadRawRows(ti, 0, int(ti.Rows()), raw); err != nil {
				t.Fatal(err)
			}
			if err := w.WriteRaw(raw); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		return path
	}
	keep := func(kv gguf.KV) (gguf.KV, bool) { return kv, true }
	cases := []struct {
		name string
		path func(t *testing.T) string
		want []string // in the error
	}{
		{"architecture", func(t *testing.T) string {
			return rewrite(t, func(kv gguf.KV) (gguf.KV, bool) {
				if kv.Key == "general.architecture" {
					kv.Value = "gemma2"
				}
				return kv, true
			}, nil)
		}, []string{`"gemma2"`, "llama, qwen2, qwen3"}},
		{"tensor type", func(t *testing.T) string {
			return rewrite(t, keep, map[string]gguf.Type{"blk.0.ffn_up.weight": gguf.TypeQ5_0})
		}, []string{"blk.0.ffn_up.weight", "Q5_0", "Q4_K"}},
		{"tokenizer model", func(t *testing.T) string {
			return rewrite(t, func(kv gguf.KV) (gguf.KV, bool) {
				if kv.Key == "tokenizer.ggml.model" {
					kv.Value = "bert"
				}
				return kv, true
			}, nil)
		}, []string{"bert"}},
		{"rope scaling", func(t *testing.T) string {
			return rewrite(t, func(kv gguf.KV) (gguf.KV, bool) {
				if kv.Key == "qwen2.rope.freq_base" {
					return gguf.KV{Key: "qwen2.rope.scaling.type", Type: gguf.ValueString, Value: "yarn"}, true
				}
				return kv, true
			}, nil)
		}, []string{"rope.scaling.type", "yarn"}},
		{"no tokenizer", func(t *testing.T) string {
			return rewrite(t, func(kv gguf.KV) (gguf.KV, bool) { return kv, !strings.HasPrefix(kv.Key, "tokenizer.") }, nil)
		}, []string{"tokenizer"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := hf.ImportGGUF(c.path(t), t.TempDir(), hf.Options{})
			if err == nil {
				t.Fatal("imported")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if c.name != "no tokenizer" && !errors.Is(err, hf.ErrUnsupported) && !strings.Contains(err.Error(), "unsupported") && !strings.Contains(err.Error(), "not supported") {
				t.Errorf("error %q: want it to say unsupported", err)
			}
		})
	}
}

// TestGGUFLlamaBiases: a Llama with attention biases and no rope scaling,
// whose query and key biases llama.cpp permutes as it permutes their
// weights' rows, imports from GGUF to exactly the Hugging Face import's
// blocks.
func TestGGUFLlamaBiases(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Llama)
	cfg.ExtraEOS, cfg.RopeScaling, cfg.AttentionBias = nil, nil, true
	cfg.BOS, cfg.EOS = 256, 257
	tj, tc := byteTokenizer(t)
	hfDir, path := writeBoth(t, cfg, checkpoint.GGUFTypes{Matrix: gguf.TypeF32, Embedding: gguf.TypeF32}, tj, tc)
	opts := hf.Options{Name: "same", DType: "float32"}
	fromGGUF, _ := importGGUF(t, path, opts)
	fromHF := importModel(t, hfDir, opts)
	for i, b := range fromGGUF.Manifest.Blocks {
		if b.CID != fromHF.Manifest.Blocks[i].CID {
			t.Errorf("block %d: %s, the Hugging Face import's %s", i, b.CID, fromHF.Manifest.Blocks[i].CID)
		}
	}
}
