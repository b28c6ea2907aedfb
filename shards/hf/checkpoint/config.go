package checkpoint

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Architectures Write knows, as config.json's "architectures" names them.
const (
	Llama   = "LlamaForCausalLM"
	Mistral = "MistralForCausalLM"
	Qwen2   = "Qwen2ForCausalLM"
	Qwen3   = "Qwen3ForCausalLM"
)

// modelType maps an architecture to config.json's "model_type".
var modelType = map[string]string{Llama: "llama", Mistral: "mistral", Qwen2: "qwen2", Qwen3: "qwen3"}

// transformersVersion is what config.json claims wrote it.
const transformersVersion = "4.51.3"

// Config describes a checkpoint to write.
type Config struct {
	Architecture string // Llama, Mistral, Qwen2 or Qwen3 ("LlamaForCausalLM", ...)
	Hidden       int    // hidden_size
	Intermediate int    // intermediate_size (the MLP's width)
	Layers       int    // num_hidden_layers
	Heads        int    // num_attention_heads
	KVHeads      int    // num_key_value_heads; 0 = Heads
	HeadDim      int    // head_dim; 0 = Hidden/Heads and not written to config.json (Qwen3 and Llama 3.2 write it)
	Vocab        int    // vocab_size
	MaxPositions int    // max_position_embeddings
	RopeTheta    float64
	RMSNormEps   float64
	// RopeScaling is config.json's rope_scaling, e.g. Llama 3.1/3.2's
	// {"rope_type": "llama3", "factor": 32.0, ...}; nil = none (null). Go
	// float64 values are written as Python writes floats (32.0), ints as ints.
	RopeScaling   map[string]any
	TieEmbeddings bool // tie_word_embeddings: no lm_head.weight
	// AttentionBias is attention_bias: biases on q, k, v and o (Llama,
	// Qwen3). Qwen2 always has q/k/v biases and no o bias, whatever this
	// says; Mistral has none and refuses it.
	AttentionBias bool
	DType         string  // "float32", "bfloat16" or "float16": torch_dtype and the tensors' dtype
	Shards        int     // 0 or 1: model.safetensors; n > 1: n shards and model.safetensors.index.json
	BOS, EOS      int64   // bos_token_id, eos_token_id
	ExtraEOS      []int64 // more end tokens: eos_token_id becomes the list [EOS, ExtraEOS...]
	// SlidingWindow is sliding_window; 0 = null. Mistral applies it; Qwen2
	// and Qwen3 write it with use_sliding_window false.
	SlidingWindow int
	Seed          int64 // the weights' seed
}

// Tiny returns small shapes of arch for tests: hidden 64, intermediate 128,
// 4 heads over 2 KV heads (grouped-query attention), vocab 320. Each
// architecture varies something: Llama is float32, untied, with llama3 rope
// scaling whose three frequency bands all occur (original_max_position 64);
// Mistral is float16 with a sliding window; Qwen2 is bfloat16, tied, with its
// q/k/v biases; Qwen3 is bfloat16, tied, 3 layers, head_dim 32 (not 64/4).
// It panics on an unknown architecture.
func Tiny(arch string) Config {
	c := Config{
		Architecture: arch, Hidden: 64, Intermediate: 128, Layers: 2, Heads: 4, KVHeads: 2,
		Vocab: 320, MaxPositions: 512, RopeTheta: 10000, RMSNormEps: 1e-5,
		BOS: 1, EOS: 2, Seed: 1,
	}
	switch arch {
	case Llama:
		c.DType = "float32"
		c.RopeScaling = map[string]any{
			"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
			"original_max_position_embeddings": 64,
		}
		c.ExtraEOS = []int64{3}
	case Mistral:
		c.DType = "float16"
		c.SlidingWindow = 4096
	case Qwen2:
		c.DType = "bfloat16"
		c.TieEmbeddings = true
		c.RopeTheta = 1e6
		c.RMSNormEps = 1e-6
	case Qwen3:
		c.DType = "bfloat16"
		c.TieEmbeddings = true
		c.Layers = 3
		c.HeadDim = 32
		c.RopeTheta = 1e6
		c.RMSNormEps = 1e-6
	default:
		panic("checkpoint.Tiny: unknown architecture " + arch)
	}
	return c
}

// Llama32_1B returns the shapes of Llama 3.2 1B (its config.json's values;
// the weights are random).
func Llama32_1B() Config {
	return Config{
		Architecture: Llama, Hidden: 2048, Intermediate: 8192, Layers: 16, Heads: 32, KVHeads: 8, HeadDim: 64,
		Vocab: 128256, MaxPositions: 131072, RopeTheta: 500000, RMSNormEps: 1e-5,
		RopeScaling: map[string]any{
			"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
			"original_max_position_embeddings": 8192,
		},
		TieEmbeddings: true, DType: "bfloat16",
		BOS: 128000, EOS: 128001, ExtraEOS: []int64{128008, 128009},
		Seed: 1,
	}
}

// headDim is the effective head dimension.
func (c Config) headDim() int {
	if c.HeadDim != 0 {
		return c.HeadDim
	}
	return c.Hidden / c.Heads
}

func (c Config) kvHeads() int {
	if c.KVHeads != 0 {
		return c.KVHeads
	}
	return c.Heads
}

// qkvBias reports biases on q/k/v, oBias on o_proj.
func (c Config) qkvBias() bool { return c.Architecture == Qwen2 || c.AttentionBias }
func (c Config) oBias() bool   { return c.Architecture != Qwen2 && c.AttentionBias }

// validate checks the config describes a model Write can lay out.
func (c Config) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("checkpoint: %s config: %s", c.Architecture, fmt.Sprintf(format, args...))
	}
	if _, ok := modelType[c.Architecture]; !ok {
		return fmt.Errorf("checkpoint: unknown architecture %q", c.Architecture)
	}
	if c.Hidden <= 0 || c.Intermediate <= 0 || c.Layers <= 0 || c.Heads <= 0 || c.KVHeads < 0 || c.HeadDim < 0 || c.Vocab <= 0 || c.MaxPositions <= 0 {
		return bad("sizes must be positive: %+v", c)
	}
	if c.HeadDim == 0 && c.Hidden%c.Heads != 0 {
		return bad("hidden %d is not a multiple of %d heads (set HeadDim)", c.Hidden, c.Heads)
	}
	if c.headDim()%2 != 0 {
		return bad("head_dim %d must be even for rotary embeddings", c.headDim())
	}
	if c.Heads%c.kvHeads() != 0 {
		return bad("%d heads are not a multiple of %d KV heads", c.Heads, c.kvHeads())
	}
	if c.RopeTheta <= 0 || c.RMSNormEps <= 0 {
		return bad("rope_theta and rms_norm_eps must be positive")
	}
	if _, ok := dtypes[c.DType]; !ok {
		return bad("dtype %q: want float32, bfloat16 or float16", c.DType)
	}
	if c.Architecture == Mistral && c.AttentionBias {
		return bad("Mistral has no attention biases")
	}
	if c.Shards < 0 || c.SlidingWindow < 0 {
		return bad("negative Shards or SlidingWindow")
	}
	return nil
}

// configJSON returns config.json as transformers writes it: indented by 2,
// keys sorted, floats as Python prints them, a final newline.
func (c Config) configJSON() ([]byte, error) {
	m := map[string]any{
		"architectures":           []string{c.Architecture},
		"attention_dropout":       pyFloat(0),
		"bos_token_id":            c.BOS,
		"eos_token_id":            c.eosValue(),
		"hidden_act":              "silu",
		"hidden_size":             c.Hidden,
		"initializer_range":       pyFloat(0.02),
		"intermediate_size":       c.Intermediate,
		"max_position_embeddings": c.MaxPositions,
		"model_type":              modelType[c.Architecture],
		"num_attention_heads":     c.Heads,
		"num_hidden_layers":       c.Layers,
		"num_key_value_heads":     c.kvHeads(),
		"rms_norm_eps":            pyFloat(c.RMSNormEps),
		"rope_scaling":            nil,
		"rope_theta":              pyFloat(c.RopeTheta),
		"tie_word_embeddings":     c.TieEmbeddings,
		"torch_dtype":             c.DType,
		"transformers_version":    transformersVersion,
		"use_cache":               true,
		"vocab_size":              c.Vocab,
	}
	if c.RopeScaling != nil {
		rs := make(map[string]any, len(c.RopeScaling))
		for k, v := range c.RopeScaling {
			if f, ok := v.(float64); ok {
				v = pyFloat(f)
			}
			rs[k] = v
		}
		m["rope_scaling"] = rs
	}
	if c.HeadDim != 0 {
		m["head_dim"] = c.HeadDim
	}
	var window any // null
	if c.SlidingWindow > 0 {
		window = c.SlidingWindow
	}
	switch c.Architecture {
	case Llama:
		m["attention_bias"] = c.AttentionBias
		m["mlp_bias"] = false
		m["pretraining_tp"] = 1
	case Mistral:
		m["sliding_window"] = window
	case Qwen2:
		m["max_window_layers"] = c.Layers
		m["use_sliding_window"] = false
		m["sliding_window"] = window
	case Qwen3:
		m["attention_bias"] = c.AttentionBias
		m["max_window_layers"] = c.Layers
		m["use_sliding_window"] = false
		m["sliding_window"] = window
	}
	return marshalPy(m)
}

func (c Config) eosValue() any {
	if len(c.ExtraEOS) == 0 {
		return c.EOS
	}
	return append([]int64{c.EOS}, c.ExtraEOS...)
}

// generationConfigJSON returns generation_config.json as transformers
// writes it for a model's defaults.
func (c Config) generationConfigJSON() ([]byte, error) {
	return marshalPy(map[string]any{
		"_from_model_config":   true,
		"bos_token_id":         c.BOS,
		"eos_token_id":         c.eosValue(),
		"transformers_version": transformersVersion,
	})
}

// marshalPy is json.dumps(v, indent=2, sort_keys=True) plus a newline.
func marshalPy(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// pyFloat marshals as Python's repr of a float: 500000.0, 1e-05, 0.02.
type pyFloat float64

func (f pyFloat) MarshalJSON() ([]byte, error) {
	v := float64(f)
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil, fmt.Errorf("checkpoint: %v in config.json", v)
	}
	// Shortest round-trip digits and decimal exponent.
	e := strconv.FormatFloat(v, 'e', -1, 64) // d.ddde±XX
	mant, expStr, _ := strings.Cut(e, "e")
	exp, _ := strconv.Atoi(expStr)
	if exp < -4 || exp >= 16 {
		sign := "+"
		if exp < 0 {
			sign, exp = "-", -exp
		}
		return fmt.Appendf(nil, "%se%s%02d", mant, sign, exp), nil
	}
	s := strconv.FormatFloat(v, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return []byte(s), nil
}
