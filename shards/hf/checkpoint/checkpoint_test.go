package checkpoint

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards/safetensors"
)

var archs = []string{Llama, Mistral, Qwen2, Qwen3}

// write writes cfg into a fresh folder and opens its weights.
func write(tb testing.TB, cfg Config) (string, *safetensors.Checkpoint) {
	tb.Helper()
	dir := tb.TempDir()
	if err := Write(dir, cfg, []byte(`{"model":{}}`), nil); err != nil {
		tb.Fatal(err)
	}
	ck, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ck.Close() })
	return dir, ck
}

func readJSON(tb testing.TB, path string) map[string]any {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		tb.Fatal(err)
	}
	return m
}

// expectedNames spells out transformers' parameter names for a config,
// independently of tensors().
func expectedNames(c Config) []string {
	names := []string{"model.embed_tokens.weight", "model.norm.weight"}
	if !c.TieEmbeddings {
		names = append(names, "lm_head.weight")
	}
	for i := range c.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		for _, s := range []string{"q_proj", "k_proj", "v_proj", "o_proj"} {
			names = append(names, p+"self_attn."+s+".weight")
		}
		switch {
		case c.Architecture == Qwen2:
			names = append(names, p+"self_attn.q_proj.bias", p+"self_attn.k_proj.bias", p+"self_attn.v_proj.bias")
		case c.AttentionBias:
			names = append(names, p+"self_attn.q_proj.bias", p+"self_attn.k_proj.bias", p+"self_attn.v_proj.bias", p+"self_attn.o_proj.bias")
		}
		if c.Architecture == Qwen3 {
			names = append(names, p+"self_attn.q_norm.weight", p+"self_attn.k_norm.weight")
		}
		names = append(names, p+"mlp.gate_proj.weight", p+"mlp.up_proj.weight", p+"mlp.down_proj.weight",
			p+"input_layernorm.weight", p+"post_attention_layernorm.weight")
	}
	slices.Sort(names)
	return names
}

func TestTinyLayout(t *testing.T) {
	for _, arch := range archs {
		t.Run(arch, func(t *testing.T) {
			cfg := Tiny(arch)
			dir, ck := write(t, cfg)
			if got, want := ck.Names(), expectedNames(cfg); !reflect.DeepEqual(got, want) {
				t.Fatalf("names\n got %v\nwant %v", got, want)
			}
			hd := int64(cfg.headDim())
			h, q, kv := int64(cfg.Hidden), int64(cfg.Heads)*hd, int64(cfg.kvHeads())*hd
			shapes := map[string][]int64{
				"model.embed_tokens.weight":                      {320, h},
				"model.norm.weight":                              {h},
				"model.layers.1.self_attn.q_proj.weight":         {q, h},
				"model.layers.1.self_attn.k_proj.weight":         {kv, h},
				"model.layers.1.self_attn.v_proj.weight":         {kv, h},
				"model.layers.1.self_attn.o_proj.weight":         {h, q},
				"model.layers.1.mlp.gate_proj.weight":            {128, h},
				"model.layers.1.mlp.up_proj.weight":              {128, h},
				"model.layers.1.mlp.down_proj.weight":            {h, 128},
				"model.layers.1.input_layernorm.weight":          {h},
				"model.layers.1.post_attention_layernorm.weight": {h},
			}
			if arch == Qwen3 {
				shapes["model.layers.1.self_attn.q_norm.weight"] = []int64{hd}
				shapes["model.layers.1.self_attn.k_norm.weight"] = []int64{hd}
				if hd*int64(cfg.Heads) == h {
					t.Error("Tiny Qwen3's head_dim should differ from hidden/heads")
				}
			}
			if arch == Qwen2 {
				shapes["model.layers.1.self_attn.k_proj.bias"] = []int64{kv}
			}
			for name, want := range shapes {
				in, ok := ck.Info(name)
				if !ok || !reflect.DeepEqual(in.Shape, want) || in.DType != dtypes[cfg.DType] {
					t.Errorf("%s: %+v %v, want shape %v dtype %s", name, in, ok, want, dtypes[cfg.DType])
				}
			}
			if !reflect.DeepEqual(ck.Metadata(), map[string]string{"format": "pt"}) {
				t.Errorf("metadata %v", ck.Metadata())
			}
			conf := readJSON(t, filepath.Join(dir, "config.json"))
			for k, want := range map[string]any{
				"architectures": []any{arch}, "model_type": modelType[arch], "hidden_act": "silu",
				"hidden_size": 64.0, "intermediate_size": 128.0, "num_attention_heads": 4.0,
				"num_key_value_heads": 2.0, "vocab_size": 320.0, "torch_dtype": cfg.DType,
				"tie_word_embeddings": cfg.TieEmbeddings, "num_hidden_layers": float64(cfg.Layers),
			} {
				if !reflect.DeepEqual(conf[k], want) {
					t.Errorf("config.json %s = %v, want %v", k, conf[k], want)
				}
			}
			if _, has := conf["head_dim"]; has != (cfg.HeadDim != 0) {
				t.Errorf("config.json head_dim present = %v, HeadDim %d", has, cfg.HeadDim)
			}
			if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
				t.Error(err)
			}
			if _, err := os.Stat(filepath.Join(dir, "tokenizer_config.json")); !os.IsNotExist(err) {
				t.Errorf("tokenizer_config.json written though not given: %v", err)
			}
		})
	}
}

// TestScales checks the weights' distributions roughly.
func TestScales(t *testing.T) {
	cfg := Tiny(Llama)
	_, ck := write(t, cfg)
	for name, want := range map[string][2]float64{
		"model.embed_tokens.weight":              {0, 1},
		"model.layers.0.self_attn.q_proj.weight": {0, 1 / 8.0},
		"model.layers.0.mlp.down_proj.weight":    {0, 1 / math.Sqrt(128)},
		"lm_head.weight":                         {0, 3 / 8.0},
		"model.layers.0.input_layernorm.weight":  {1, 0.1},
	} {
		v, err := ck.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		var s, s2 float64
		for _, x := range v {
			s += float64(x)
			s2 += float64(x) * float64(x)
		}
		mean := s / float64(len(v))
		std := math.Sqrt(s2/float64(len(v)) - mean*mean)
		tol := 4 * want[1] / math.Sqrt(float64(len(v))) * 2
		if math.Abs(mean-want[0]) > tol+1e-9 || math.Abs(std-want[1]) > 0.2*want[1] {
			t.Errorf("%s: mean %.4f std %.4f, want %v", name, mean, std, want)
		}
	}
}

func TestShardedMatchesSingle(t *testing.T) {
	cfg := Tiny(Qwen3)
	_, single := write(t, cfg)
	cfg.Shards = 3
	dir, sharded := write(t, cfg)
	for i := 1; i <= 3; i++ {
		if _, err := os.Stat(filepath.Join(dir, fmt.Sprintf("model-%05d-of-00003.safetensors", i))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, safetensors.SingleFile)); !os.IsNotExist(err) {
		t.Errorf("model.safetensors beside shards: %v", err)
	}
	idx := readJSON(t, filepath.Join(dir, safetensors.IndexFile))
	files := map[any]bool{}
	for _, f := range idx["weight_map"].(map[string]any) {
		files[f] = true
	}
	if len(files) != 3 {
		t.Errorf("index names %d files, want 3", len(files))
	}
	var total float64
	for _, name := range single.Names() {
		in, _ := single.Info(name)
		total += float64(in.Size)
	}
	if got := idx["metadata"].(map[string]any)["total_size"]; got != total {
		t.Errorf("total_size %v, want %v", got, total)
	}
	if !reflect.DeepEqual(single.Names(), sharded.Names()) {
		t.Fatal("names differ")
	}
	for _, name := range single.Names() {
		a, _ := single.Raw(name)
		b, _ := sharded.Raw(name)
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs between sharded and single", name)
		}
	}
}

func TestDeterministic(t *testing.T) {
	cfg := Tiny(Mistral)
	cfg.Shards = 2
	a, b, c := t.TempDir(), t.TempDir(), t.TempDir()
	for _, d := range []string{a, b} {
		if err := Write(d, cfg, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	cfg.Seed++
	if err := Write(c, cfg, nil, nil); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(a)
	if len(entries) != 5 { // config, generation_config, 2 shards, index
		t.Errorf("%d files: %v", len(entries), entries)
	}
	for _, e := range entries {
		x, _ := os.ReadFile(filepath.Join(a, e.Name()))
		y, _ := os.ReadFile(filepath.Join(b, e.Name()))
		z, _ := os.ReadFile(filepath.Join(c, e.Name()))
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between two writes", e.Name())
		}
		if strings.HasSuffix(e.Name(), ".safetensors") && bytes.Equal(x, z) {
			t.Errorf("%s is the same under another seed", e.Name())
		}
	}
}

// TestLlama32_1B checks the preset's config.json against Llama 3.2 1B's and
// its parameter count and file size against the real model's (1,235,814,400
// parameters; Meta's model.safetensors is 2,471,645,608 bytes, header
// included), without writing 2.5 GB.
func TestLlama32_1B(t *testing.T) {
	cfg := Llama32_1B()
	infos, err := cfg.Tensors()
	if err != nil {
		t.Fatal(err)
	}
	var params int64
	for _, in := range infos {
		params += in.NumElements()
	}
	if params != 1235814400 {
		t.Errorf("%d parameters, want 1235814400", params)
	}
	slices.SortFunc(infos, func(a, b safetensors.Info) int { return strings.Compare(a.Name, b.Name) })
	hdr, err := safetensors.EncodeHeader(infos, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	if size := int64(len(hdr)) + 2*params; size != 2471645608 {
		t.Errorf("model.safetensors would be %d bytes, want 2471645608", size)
	}
	got, err := cfg.configJSON()
	if err != nil {
		t.Fatal(err)
	}
	want := `{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [
    128001,
    128008,
    128009
  ],
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "` + transformersVersion + `",
  "use_cache": true,
  "vocab_size": 128256
}
`
	if string(got) != want {
		t.Errorf("config.json\n%s\nwant\n%s", got, want)
	}
	gen, _ := cfg.generationConfigJSON()
	var g map[string]any
	if err := json.Unmarshal(gen, &g); err != nil || !reflect.DeepEqual(g["eos_token_id"], []any{128001.0, 128008.0, 128009.0}) || g["bos_token_id"] != 128000.0 {
		t.Errorf("generation_config.json %s", gen)
	}
}

func TestPyFloat(t *testing.T) {
	for v, want := range map[float64]string{
		0: "0.0", 0.02: "0.02", 1e-5: "1e-05", 1e-6: "1e-06", 500000: "500000.0", 1e6: "1000000.0",
		32: "32.0", 0.0001: "0.0001", 1e16: "1e+16", 1.5e-7: "1.5e-07", -2.5: "-2.5",
	} {
		got, err := pyFloat(v).MarshalJSON()
		if err != nil || string(got) != want {
			t.Errorf("pyFloat(%g) = %s, %v; want %s", v, got, err, want)
		}
	}
}

func TestInvalid(t *testing.T) {
	for name, mut := range map[string]func(*Config){
		"arch":            func(c *Config) { c.Architecture = "GPT2LMHeadModel" },
		"heads":           func(c *Config) { c.Heads = 3 },
		"kv heads":        func(c *Config) { c.KVHeads = 3 },
		"odd head dim":    func(c *Config) { c.HeadDim = 15 },
		"dtype":           func(c *Config) { c.DType = "int8" },
		"mistral bias":    func(c *Config) { c.Architecture = Mistral; c.AttentionBias = true },
		"too many shards": func(c *Config) { c.Shards = 1000 },
		"zero vocab":      func(c *Config) { c.Vocab = 0 },
	} {
		cfg := Tiny(Llama)
		mut(&cfg)
		if err := Write(t.TempDir(), cfg, nil, nil); err == nil {
			t.Errorf("%s: Write succeeded", name)
		}
	}
}

func TestBiasFlags(t *testing.T) {
	cfg := Tiny(Llama)
	cfg.AttentionBias = true
	cfg.TieEmbeddings = true
	_, ck := write(t, cfg)
	if got, want := ck.Names(), expectedNames(cfg); !reflect.DeepEqual(got, want) {
		t.Fatalf("names\n got %v\nwant %v", got, want)
	}
	if _, ok := ck.Info("model.layers.0.self_attn.o_proj.bias"); !ok {
		t.Error("Llama attention_bias: no o_proj bias")
	}
}

// TestRewrite checks writing over an earlier checkpoint of another sharding
// leaves only the new weights.
func TestRewrite(t *testing.T) {
	dir := t.TempDir()
	cfg := Tiny(Llama)
	cfg.Shards = 3
	if err := Write(dir, cfg, nil, nil); err != nil {
		t.Fatal(err)
	}
	cfg.Shards = 1
	cfg.Seed = 7
	if err := Write(dir, cfg, nil, nil); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"config.json", "generation_config.json", "model.safetensors"}; !reflect.DeepEqual(names, want) {
		t.Errorf("files %v, want %v", names, want)
	}
}
