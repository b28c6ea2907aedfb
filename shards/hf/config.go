package hf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// Architectures Import supports, as config.json's "architectures" names them.
const (
	ArchLlama   = "LlamaForCausalLM"
	ArchMistral = "MistralForCausalLM"
	ArchQwen2   = "Qwen2ForCausalLM"
	ArchQwen3   = "Qwen3ForCausalLM"
)

// Architectures lists the supported architectures.
var Architectures = []string{ArchLlama, ArchMistral, ArchQwen2, ArchQwen3}

// Errors of ReadConfig and Import, wrapped with the architecture or field
// concerned.
var (
	// ErrUnsupported is returned for an architecture, or a configuration
	// field value that changes the math, that Import does not implement.
	ErrUnsupported = errors.New("unsupported")
	// ErrBadConfig is returned for a config.json that is malformed or
	// inconsistent (missing sizes, head counts that do not divide).
	ErrBadConfig = errors.New("bad config.json")
)

// Config is what Import needs of config.json, defaults applied and checked.
type Config struct {
	Architecture string
	Name         string // _name_or_path, if set
	Hidden       int    // hidden_size
	Intermediate int    // intermediate_size
	Layers       int    // num_hidden_layers
	Heads        int    // num_attention_heads
	KVHeads      int    // num_key_value_heads (default: Heads)
	HeadDim      int    // head_dim (default: Hidden / Heads)
	Vocab        int    // vocab_size
	MaxPositions int    // max_position_embeddings
	RMSNormEps   float64
	RopeTheta    float64
	RopeType     string // "default" or "llama3"
	RopeScaling  map[string]any
	// RopeFactors, when set (RopeType "default"), divide the inverse
	// frequencies one by one: llama.cpp's rope_freqs, how a GGUF file
	// carries Llama 3.1's rope scaling.
	RopeFactors       []float64
	TieEmbeddings     bool // tie_word_embeddings
	AttentionBias     bool // biases on q, k, v (and o for Llama and Qwen3)
	OutputBias        bool // a bias on o_proj
	MLPBias           bool // biases on gate, up and down (Llama's mlp_bias)
	QKNorm            bool // Qwen3's per-head RMSNorm of queries and keys
	SlidingWindow     int  // Mistral's sliding_window, 0 if none
	EOS               []int64
	BOS               int64 // bos_token_id, -1 if none
	TorchDType        string
	raw               map[string]json.RawMessage
	slidingWindowNote string
}

// MaxContext is the longest sequence the imported model advertises:
// max_position_embeddings, or the sliding window when that is smaller (so
// that the full attention the blocks compute is exactly the model's).
func (c *Config) MaxContext() int {
	if c.SlidingWindow > 0 && c.SlidingWindow < c.MaxPositions {
		return c.SlidingWindow
	}
	return c.MaxPositions
}

// Notes are remarks on the import a caller may show: the context cut to the
// sliding window.
func (c *Config) Notes() []string {
	if c.slidingWindowNote != "" {
		return []string{c.slidingWindowNote}
	}
	return nil
}

// Fields that change the math of some Hugging Face decoder and that no
// supported architecture implements: present with anything but their
// neutral value, they are refused by name.
var refusedFields = map[string]any{
	"quantization_config":     nil,
	"attn_logit_softcapping":  nil,
	"final_logit_softcapping": nil,
	"logits_scaling":          1.0,
	"logit_scale":             1.0,
	"embedding_multiplier":    1.0,
	"residual_multiplier":     1.0,
	"attention_multiplier":    nil,
	"query_pre_attn_scalar":   nil,
	"use_qk_norm":             false,
	"partial_rotary_factor":   1.0,
	"rotary_pct":              1.0,
	"no_rope_layers":          nil,
	"moe_intermediate_size":   nil,
	"num_experts":             nil,
	"num_local_experts":       nil,
}

// ReadConfig reads and checks src/config.json: the architecture and every
// field that changes the math. A field Import does not implement is an
// error wrapping ErrUnsupported that names it.
func ReadConfig(src string) (*Config, error) {
	b, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		return nil, err
	}
	return parseConfig(b)
}

func parseConfig(b []byte) (*Config, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadConfig, err)
	}
	c := &Config{raw: raw, BOS: -1}
	var archs []string
	if err := c.get("architectures", &archs); err != nil {
		return nil, err
	}
	if len(archs) != 1 {
		return nil, fmt.Errorf("%w: architectures %q: want exactly one", ErrBadConfig, archs)
	}
	c.Architecture = archs[0]
	if !slices.Contains(Architectures, c.Architecture) {
		return nil, fmt.Errorf("architecture %s: %w (supported: %s)", c.Architecture, ErrUnsupported, strings.Join(Architectures, ", "))
	}
	unsupported := func(field string, v any, why string) error {
		return fmt.Errorf("%s: config field %s = %v: %w (%s)", c.Architecture, field, v, ErrUnsupported, why)
	}

	// Sizes.
	for _, f := range []struct {
		name string
		v    *int
	}{
		{"hidden_size", &c.Hidden}, {"intermediate_size", &c.Intermediate}, {"num_hidden_layers", &c.Layers},
		{"num_attention_heads", &c.Heads}, {"vocab_size", &c.Vocab}, {"max_position_embeddings", &c.MaxPositions},
	} {
		if err := c.require(f.name, f.v); err != nil {
			return nil, err
		}
		if *f.v <= 0 {
			return nil, fmt.Errorf("%w: %s = %d", ErrBadConfig, f.name, *f.v)
		}
	}
	c.KVHeads = c.Heads
	if err := c.getOpt("num_key_value_heads", &c.KVHeads); err != nil {
		return nil, err
	}
	if c.KVHeads <= 0 || c.Heads%c.KVHeads != 0 {
		return nil, fmt.Errorf("%w: num_attention_heads %d is not a multiple of num_key_value_heads %d", ErrBadConfig, c.Heads, c.KVHeads)
	}
	if err := c.getOpt("head_dim", &c.HeadDim); err != nil {
		return nil, err
	}
	if c.HeadDim == 0 {
		if c.Hidden%c.Heads != 0 {
			return nil, fmt.Errorf("%w: hidden_size %d is not a multiple of num_attention_heads %d and head_dim is not set", ErrBadConfig, c.Hidden, c.Heads)
		}
		c.HeadDim = c.Hidden / c.Heads
	}
	if c.HeadDim <= 0 || c.HeadDim%2 != 0 {
		return nil, fmt.Errorf("%w: head_dim %d: want a positive even number", ErrBadConfig, c.HeadDim)
	}
	if err := c.require("rms_norm_eps", &c.RMSNormEps); err != nil {
		return nil, err
	}
	if c.RMSNormEps <= 0 {
		return nil, fmt.Errorf("%w: rms_norm_eps %g", ErrBadConfig, c.RMSNormEps)
	}

	// Activation.
	act := "silu"
	if err := c.getOpt("hidden_act", &act); err != nil {
		return nil, err
	}
	if act != "silu" {
		return nil, unsupported("hidden_act", act, "only silu")
	}

	// Biases and norms.
	if err := c.getOpt("tie_word_embeddings", &c.TieEmbeddings); err != nil {
		return nil, err
	}
	switch c.Architecture {
	case ArchLlama:
		if err := c.getOpt("attention_bias", &c.AttentionBias); err != nil {
			return nil, err
		}
		c.OutputBias = c.AttentionBias
		if err := c.getOpt("mlp_bias", &c.MLPBias); err != nil {
			return nil, err
		}
	case ArchQwen3:
		if err := c.getOpt("attention_bias", &c.AttentionBias); err != nil {
			return nil, err
		}
		c.OutputBias = c.AttentionBias
		c.QKNorm = true
	case ArchQwen2:
		c.AttentionBias = true // q, k, v always; o never
	}
	for _, f := range []struct {
		name string
		ok   bool // the architecture has the switch
	}{{"attention_bias", c.Architecture == ArchLlama || c.Architecture == ArchQwen3}, {"mlp_bias", c.Architecture == ArchLlama}} {
		on := false
		if err := c.getOpt(f.name, &on); err != nil {
			return nil, err
		}
		if on && !f.ok {
			return nil, unsupported(f.name, true, "not part of "+c.Architecture)
		}
	}

	// Attention window.
	useSliding := false
	if err := c.getOpt("use_sliding_window", &useSliding); err != nil {
		return nil, err
	}
	switch c.Architecture {
	case ArchQwen2, ArchQwen3:
		if useSliding {
			return nil, unsupported("use_sliding_window", true, "sliding-window layers are not implemented")
		}
	case ArchMistral:
		var w *int
		if err := c.getOpt("sliding_window", &w); err != nil {
			return nil, err
		}
		if w != nil && *w > 0 {
			c.SlidingWindow = *w
			if *w < c.MaxPositions {
				c.slidingWindowNote = fmt.Sprintf("sliding_window %d is under max_position_embeddings %d: the model's context is cut to %d, where full attention is exact", *w, c.MaxPositions, *w)
			}
		}
	}
	var layerTypes []string
	if err := c.getOpt("layer_types", &layerTypes); err != nil {
		return nil, err
	}
	for i, t := range layerTypes {
		if t != "full_attention" && !(t == "sliding_attention" && c.Architecture == ArchMistral) {
			return nil, unsupported(fmt.Sprintf("layer_types[%d]", i), t, "only full_attention")
		}
	}

	// Rotary embedding: rope_theta and rope_scaling, or (newer
	// transformers) rope_parameters holding both.
	c.RopeTheta = 10000
	if err := c.getOpt("rope_theta", &c.RopeTheta); err != nil {
		return nil, err
	}
	scalingField := "rope_scaling"
	if err := c.getOpt("rope_scaling", &c.RopeScaling); err != nil {
		return nil, err
	}
	if _, ok := raw["rope_parameters"]; ok && c.RopeScaling == nil {
		scalingField = "rope_parameters"
		if err := c.getOpt("rope_parameters", &c.RopeScaling); err != nil {
			return nil, err
		}
		if t, ok := c.RopeScaling["rope_theta"].(float64); ok {
			c.RopeTheta = t
		}
	}
	if c.RopeTheta <= 0 {
		return nil, fmt.Errorf("%w: rope_theta %g", ErrBadConfig, c.RopeTheta)
	}
	c.RopeType = "default"
	if s := c.RopeScaling; s != nil {
		for _, k := range []string{"rope_type", "type"} {
			if v, ok := s[k].(string); ok {
				c.RopeType = v
				break
			}
		}
		switch c.RopeType {
		case "default":
		case "llama3":
			for _, k := range []string{"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} {
				if _, ok := s[k].(float64); !ok {
					return nil, fmt.Errorf("%w: %s.%s: want a number for rope type llama3", ErrBadConfig, scalingField, k)
				}
			}
			if s["low_freq_factor"].(float64) >= s["high_freq_factor"].(float64) {
				return nil, fmt.Errorf("%w: %s: low_freq_factor must be under high_freq_factor", ErrBadConfig, scalingField)
			}
		default:
			return nil, unsupported(scalingField+".rope_type", c.RopeType, "only default and llama3 rotary embeddings")
		}
		for _, k := range []string{"partial_rotary_factor", "attention_factor", "mscale", "mscale_all_dim"} {
			if v, ok := s[k]; ok && v != nil && v != 1.0 {
				return nil, unsupported(scalingField+"."+k, v, "not implemented")
			}
		}
	}

	// Anything else that changes the math.
	keys := make([]string, 0, len(refusedFields))
	for k := range refusedFields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v, ok := raw[k]
		if !ok || bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
			continue
		}
		var got any
		json.Unmarshal(v, &got)
		if neutral := refusedFields[k]; neutral != nil && got == neutral {
			continue
		}
		return nil, unsupported(k, string(v), "not implemented")
	}

	// Informational and token fields.
	c.getOpt("_name_or_path", &c.Name)
	if c.getOpt("torch_dtype", &c.TorchDType) != nil || c.TorchDType == "" {
		c.getOpt("dtype", &c.TorchDType)
	}
	if eos, err := tokenIDs(raw["eos_token_id"]); err == nil {
		c.EOS = eos
	}
	if bos, err := tokenIDs(raw["bos_token_id"]); err == nil && len(bos) == 1 {
		c.BOS = bos[0]
	}
	return c, nil
}

// Check completes and checks a Config, as ImportFrom does before using it.
// ReadConfig's configs pass unchanged; a Config built by hand (from a GGUF
// file's metadata) must set:
//
//   - Architecture, one of Architectures, and the switches it implies, as
//     ReadConfig sets them: Qwen2 has AttentionBias (q/k/v) and never
//     OutputBias; Qwen3 has QKNorm, which no other has; Mistral has no
//     biases; only Llama may have MLPBias;
//   - Hidden, Intermediate, Layers, Heads, Vocab, MaxPositions (positive),
//     KVHeads and HeadDim (0: Heads, and Hidden/Heads), RMSNormEps and
//     RopeTheta (positive);
//   - RopeType "" or "default", or "llama3" with RopeScaling holding the
//     float64s factor, low_freq_factor, high_freq_factor and
//     original_max_position_embeddings;
//   - TieEmbeddings, EOS (the end tokens, unless generation_config.json
//     is given), SlidingWindow (Mistral's, 0 if none), and optionally Name.
//
// Check fills KVHeads, HeadDim and RopeType when zero; other fields are only
// checked. An error wraps ErrBadConfig or ErrUnsupported.
func (c *Config) Check() error {
	if !slices.Contains(Architectures, c.Architecture) {
		return fmt.Errorf("architecture %q: %w (supported: %s)", c.Architecture, ErrUnsupported, strings.Join(Architectures, ", "))
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrBadConfig, c.Architecture, fmt.Sprintf(format, args...))
	}
	if c.Hidden <= 0 || c.Intermediate <= 0 || c.Layers <= 0 || c.Heads <= 0 || c.Vocab <= 0 || c.MaxPositions <= 0 || c.KVHeads < 0 || c.HeadDim < 0 {
		return bad("sizes must be positive (hidden %d, intermediate %d, layers %d, heads %d, KV heads %d, head dim %d, vocab %d, max positions %d)",
			c.Hidden, c.Intermediate, c.Layers, c.Heads, c.KVHeads, c.HeadDim, c.Vocab, c.MaxPositions)
	}
	if c.KVHeads == 0 {
		c.KVHeads = c.Heads
	}
	if c.Heads%c.KVHeads != 0 {
		return bad("%d heads are not a multiple of %d KV heads", c.Heads, c.KVHeads)
	}
	if c.HeadDim == 0 {
		if c.Hidden%c.Heads != 0 {
			return bad("hidden size %d is not a multiple of %d heads and the head dim is not set", c.Hidden, c.Heads)
		}
		c.HeadDim = c.Hidden / c.Heads
	}
	if c.HeadDim%2 != 0 {
		return bad("head dim %d: want an even number", c.HeadDim)
	}
	if !(c.RMSNormEps > 0) || !(c.RopeTheta > 0) {
		return bad("rms_norm_eps %g and rope_theta %g must be positive", c.RMSNormEps, c.RopeTheta)
	}
	if c.SlidingWindow < 0 || (c.SlidingWindow > 0 && c.Architecture != ArchMistral) {
		return bad("sliding window %d: only Mistral's is implemented", c.SlidingWindow)
	}
	switch c.RopeType {
	case "":
		c.RopeType = "default"
	case "default":
	case "llama3":
		for _, k := range []string{"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} {
			if _, ok := c.RopeScaling[k].(float64); !ok {
				return bad("rope scaling %s: want a float64 for rope type llama3", k)
			}
		}
		if c.RopeScaling["low_freq_factor"].(float64) >= c.RopeScaling["high_freq_factor"].(float64) {
			return bad("rope scaling: low_freq_factor must be under high_freq_factor")
		}
	default:
		return fmt.Errorf("%s: rope type %q: %w (only default and llama3)", c.Architecture, c.RopeType, ErrUnsupported)
	}
	if c.RopeFactors != nil {
		if c.RopeType != "default" || len(c.RopeFactors) != c.HeadDim/2 {
			return bad("%d rope factors with rope type %s: want head_dim/2 = %d with the default type", len(c.RopeFactors), c.RopeType, c.HeadDim/2)
		}
		for i, f := range c.RopeFactors {
			if !(f > 0) || math.IsInf(f, 0) {
				return bad("rope factor %d is %g", i, f)
			}
		}
	}
	switch {
	case c.QKNorm != (c.Architecture == ArchQwen3):
		return bad("QKNorm %v: Qwen3 has it, no other does", c.QKNorm)
	case c.Architecture == ArchQwen2 && (!c.AttentionBias || c.OutputBias):
		return bad("Qwen2 has q/k/v biases (AttentionBias) and no o_proj bias (OutputBias)")
	case c.Architecture == ArchMistral && (c.AttentionBias || c.OutputBias):
		return bad("Mistral has no attention biases")
	case c.MLPBias && c.Architecture != ArchLlama:
		return bad("only Llama may have MLP biases")
	}
	return nil
}

// get decodes a required field.
func (c *Config) get(name string, v any) error {
	r, ok := c.raw[name]
	if !ok {
		return fmt.Errorf("%w: no field %s", ErrBadConfig, name)
	}
	if err := json.Unmarshal(r, v); err != nil {
		return fmt.Errorf("%w: field %s: %v", ErrBadConfig, name, err)
	}
	return nil
}

func (c *Config) require(name string, v any) error {
	r, ok := c.raw[name]
	if !ok || bytes.Equal(bytes.TrimSpace(r), []byte("null")) {
		return fmt.Errorf("%w: %s: no field %s", ErrBadConfig, c.Architecture, name)
	}
	return c.get(name, v)
}

// getOpt decodes an optional field, leaving v as it is when the field is
// absent or null.
func (c *Config) getOpt(name string, v any) error {
	r, ok := c.raw[name]
	if !ok || bytes.Equal(bytes.TrimSpace(r), []byte("null")) {
		return nil
	}
	return c.get(name, v)
}

// tokenIDs decodes a token ID or a list of them (eos_token_id's two forms).
func tokenIDs(r json.RawMessage) ([]int64, error) {
	if len(r) == 0 || bytes.Equal(bytes.TrimSpace(r), []byte("null")) {
		return nil, errors.New("absent")
	}
	var one int64
	if err := json.Unmarshal(r, &one); err == nil {
		return []int64{one}, nil
	}
	var many []int64
	if err := json.Unmarshal(r, &many); err != nil {
		return nil, err
	}
	return many, nil
}

// InvFreq returns RoPE's inverse frequencies, head_dim/2 of them, computed
// in float64 as Hugging Face's rope initialisation functions do (default
// and llama3).
func (c *Config) InvFreq() []float64 {
	half := c.HeadDim / 2
	inv := make([]float64, half)
	for i := range inv {
		inv[i] = 1 / math.Pow(c.RopeTheta, float64(2*i)/float64(c.HeadDim))
	}
	if c.RopeFactors != nil {
		for i, f := range c.RopeFactors {
			inv[i] /= f
		}
		return inv
	}
	if c.RopeType != "llama3" {
		return inv
	}
	s := c.RopeScaling
	factor := s["factor"].(float64)
	low, high := s["low_freq_factor"].(float64), s["high_freq_factor"].(float64)
	old := s["original_max_position_embeddings"].(float64)
	lowWavelen, highWavelen := old/low, old/high
	for i, f := range inv {
		wavelen := 2 * math.Pi / f
		switch {
		case wavelen < highWavelen: // high frequency: kept
		case wavelen > lowWavelen: // low frequency: scaled
			inv[i] = f / factor
		default: // in between: interpolated
			smooth := (old/wavelen - low) / (high - low)
			inv[i] = (1-smooth)*f/factor + smooth*f
		}
	}
	return inv
}

func parseRaw(b []byte) (map[string]json.RawMessage, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, err
	}
	return raw, nil
}
