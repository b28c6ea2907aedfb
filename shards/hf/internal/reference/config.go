package reference

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
)

// config is the part of config.json the reference reads.
type config struct {
	Architectures       []string       `json:"architectures"`
	ModelType           string         `json:"model_type"`
	HiddenSize          int            `json:"hidden_size"`
	IntermediateSize    int            `json:"intermediate_size"`
	NumHiddenLayers     int            `json:"num_hidden_layers"`
	NumAttentionHeads   int            `json:"num_attention_heads"`
	NumKeyValueHeads    *int           `json:"num_key_value_heads"`
	HeadDim             *int           `json:"head_dim"`
	VocabSize           int            `json:"vocab_size"`
	RMSNormEps          float64        `json:"rms_norm_eps"`
	RopeTheta           *float64       `json:"rope_theta"`
	RopeScaling         map[string]any `json:"rope_scaling"`
	PartialRotaryFactor *float64       `json:"partial_rotary_factor"`
	TieWordEmbeddings   *bool          `json:"tie_word_embeddings"`
	AttentionBias       bool           `json:"attention_bias"`
	MLPBias             bool           `json:"mlp_bias"`
	HiddenAct           string         `json:"hidden_act"`
	SlidingWindow       *int           `json:"sliding_window"`
	UseSlidingWindow    bool           `json:"use_sliding_window"`
	MaxWindowLayers     *int           `json:"max_window_layers"`
	LayerTypes          []string       `json:"layer_types"`
}

// arch is what the forward pass needs to know of an architecture.
type arch struct {
	qkvBias, oBias bool // biases on q/k/v and on o_proj
	qkNorm         bool // Qwen3's per-head q_norm, k_norm
}

// params are the resolved hyperparameters.
type params struct {
	arch
	name                         string
	hidden, inter, layers, heads int
	kvHeads, headDim, vocab      int
	eps, theta                   float64
	invFreq                      []float64 // head_dim/2 RoPE inverse frequencies
	tied, mlpBias                bool
	window                       []int // per layer: the sliding window, 0 = none
}

func readConfig(path string) (*params, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reference: %w", err)
	}
	var c config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("reference: %s: %w", path, err)
	}
	if len(c.Architectures) != 1 {
		return nil, fmt.Errorf("reference: %s: architectures %v: want exactly one", path, c.Architectures)
	}
	p := &params{name: c.Architectures[0]}
	bad := func(format string, args ...any) (*params, error) {
		return nil, fmt.Errorf("reference: %s (%s): %s", path, p.name, fmt.Sprintf(format, args...))
	}
	tiedDefault := false // Llama, Mistral, Qwen2 and Qwen3 configs default to untied
	switch p.name {
	case "LlamaForCausalLM":
		p.qkvBias, p.oBias = c.AttentionBias, c.AttentionBias
		p.mlpBias = c.MLPBias
	case "MistralForCausalLM":
	case "Qwen2ForCausalLM":
		p.qkvBias = true
	case "Qwen3ForCausalLM":
		p.qkvBias, p.oBias = c.AttentionBias, c.AttentionBias
		p.qkNorm = true
	default:
		return bad("unsupported architecture")
	}
	if c.HiddenAct != "silu" {
		return bad("hidden_act %q: only silu", c.HiddenAct)
	}
	p.hidden, p.inter, p.layers, p.heads, p.vocab = c.HiddenSize, c.IntermediateSize, c.NumHiddenLayers, c.NumAttentionHeads, c.VocabSize
	if p.hidden <= 0 || p.inter <= 0 || p.layers <= 0 || p.heads <= 0 || p.vocab <= 0 {
		return bad("non-positive sizes")
	}
	p.kvHeads = p.heads
	if c.NumKeyValueHeads != nil {
		p.kvHeads = *c.NumKeyValueHeads
	}
	if p.kvHeads <= 0 || p.heads%p.kvHeads != 0 {
		return bad("%d heads over %d KV heads", p.heads, p.kvHeads)
	}
	if c.HeadDim != nil {
		p.headDim = *c.HeadDim
	} else {
		if p.hidden%p.heads != 0 {
			return bad("hidden_size %d not divisible by %d heads", p.hidden, p.heads)
		}
		p.headDim = p.hidden / p.heads
	}
	if p.headDim <= 0 || p.headDim%2 != 0 {
		return bad("head_dim %d", p.headDim)
	}
	if c.PartialRotaryFactor != nil && *c.PartialRotaryFactor != 1 {
		return bad("partial_rotary_factor %v is not supported", *c.PartialRotaryFactor)
	}
	p.eps = c.RMSNormEps
	if p.eps <= 0 {
		return bad("rms_norm_eps %v", p.eps)
	}
	p.theta = 10000
	if c.RopeTheta != nil {
		p.theta = *c.RopeTheta
	}
	p.tied = tiedDefault
	if c.TieWordEmbeddings != nil {
		p.tied = *c.TieWordEmbeddings
	}
	if p.invFreq, err = ropeInvFreq(p.theta, p.headDim, c.RopeScaling); err != nil {
		return bad("%v", err)
	}
	// Sliding windows per layer.
	p.window = make([]int, p.layers)
	w := 0
	if c.SlidingWindow != nil {
		w = *c.SlidingWindow
	}
	isQwen := p.name == "Qwen2ForCausalLM" || p.name == "Qwen3ForCausalLM"
	switch {
	case w <= 0:
	case p.name == "MistralForCausalLM":
		for i := range p.window {
			p.window[i] = w
		}
	case !isQwen || !c.UseSlidingWindow:
		// transformers' Qwen configs drop sliding_window unless
		// use_sliding_window is set; Llama has none.
	case c.LayerTypes != nil:
		if len(c.LayerTypes) != p.layers {
			return bad("layer_types has %d entries for %d layers", len(c.LayerTypes), p.layers)
		}
		for i, t := range c.LayerTypes {
			switch t {
			case "full_attention":
			case "sliding_attention":
				p.window[i] = w
			default:
				return bad("layer type %q", t)
			}
		}
	default:
		from := p.layers
		if c.MaxWindowLayers != nil {
			from = *c.MaxWindowLayers
		}
		for i := max(from, 0); i < p.layers; i++ {
			p.window[i] = w
		}
	}
	return p, nil
}

// ropeInvFreq returns RoPE's inverse frequencies for a head of dim d:
// 1/theta^(2i/d), rescaled by rope_scaling "llama3".
func ropeInvFreq(theta float64, d int, scaling map[string]any) ([]float64, error) {
	inv := make([]float64, d/2)
	for i := range inv {
		inv[i] = 1 / math.Pow(theta, float64(2*i)/float64(d))
	}
	if scaling == nil {
		return inv, nil
	}
	typ, _ := scaling["rope_type"].(string)
	if typ == "" {
		typ, _ = scaling["type"].(string) // the older key
	}
	switch typ {
	case "default":
		return inv, nil
	case "llama3":
	default:
		return nil, fmt.Errorf("rope_scaling type %q is not supported (default and llama3 are)", typ)
	}
	num := func(key string) (float64, error) {
		v, ok := scaling[key].(float64)
		if !ok {
			return 0, fmt.Errorf("rope_scaling %s missing or not a number", key)
		}
		return v, nil
	}
	var factor, low, high, orig float64
	var err error
	for _, f := range []struct {
		key string
		dst *float64
	}{{"factor", &factor}, {"low_freq_factor", &low}, {"high_freq_factor", &high}, {"original_max_position_embeddings", &orig}} {
		if *f.dst, err = num(f.key); err != nil {
			return nil, err
		}
	}
	if high <= low || factor <= 0 || low <= 0 {
		return nil, fmt.Errorf("rope_scaling llama3: factor %v, low_freq_factor %v, high_freq_factor %v", factor, low, high)
	}
	return llama3InvFreq(inv, factor, low, high, orig), nil
}

// llama3InvFreq applies Llama 3.1's frequency-dependent scaling: wavelengths
// below orig/high keep their frequency, above orig/low are divided by
// factor, and between the two blend smoothly.
func llama3InvFreq(inv []float64, factor, low, high, orig float64) []float64 {
	lowWavelen, highWavelen := orig/low, orig/high
	out := make([]float64, len(inv))
	for i, f := range inv {
		wavelen := 2 * math.Pi / f
		switch {
		case wavelen < highWavelen:
			out[i] = f
		case wavelen > lowWavelen:
			out[i] = f / factor
		default:
			s := (orig/wavelen - low) / (high - low)
			out[i] = (1-s)*f/factor + s*f
		}
	}
	return out
}
