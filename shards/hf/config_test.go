package hf

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
)

func baseConfig(arch string) map[string]any {
	return map[string]any{
		"architectures": []string{arch}, "hidden_size": 64, "intermediate_size": 128,
		"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
		"max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
		"eos_token_id": []int{2, 3}, "bos_token_id": 1,
	}
}

func parse(t *testing.T, m map[string]any) (*Config, error) {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return parseConfig(b)
}

func TestReadConfigArchitectures(t *testing.T) {
	for _, arch := range Architectures {
		c, err := parse(t, baseConfig(arch))
		if err != nil {
			t.Fatalf("%s: %v", arch, err)
		}
		if c.HeadDim != 16 || c.KVHeads != 2 || c.MaxContext() != 256 || len(c.EOS) != 2 || c.BOS != 1 {
			t.Fatalf("%s: %+v", arch, c)
		}
		if want := arch == ArchQwen2; c.AttentionBias != want {
			t.Fatalf("%s: attention bias %v", arch, c.AttentionBias)
		}
		if want := arch == ArchQwen3; c.QKNorm != want {
			t.Fatalf("%s: q/k norm %v", arch, c.QKNorm)
		}
	}
	m := baseConfig(ArchQwen3)
	m["head_dim"] = 32
	if c, err := parse(t, m); err != nil || c.HeadDim != 32 {
		t.Fatalf("explicit head_dim: %v, %v", c, err)
	}
}

// TestReadConfigRefuses checks that what changes the math and is not
// implemented is refused, naming the field or architecture.
func TestReadConfigRefuses(t *testing.T) {
	cases := []struct {
		name  string
		arch  string
		set   map[string]any
		names string // the error must contain this
		bad   bool   // ErrBadConfig rather than ErrUnsupported
	}{
		{"architecture", "GPT2LMHeadModel", nil, "GPT2LMHeadModel", false},
		{"rope yarn", ArchQwen2, map[string]any{"rope_scaling": map[string]any{"type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type = yarn", false},
		{"rope linear", ArchLlama, map[string]any{"rope_scaling": map[string]any{"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = linear", false},
		{"rope dynamic in rope_parameters", ArchLlama, map[string]any{"rope_parameters": map[string]any{"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_parameters.rope_type = dynamic", false},
		{"gelu", ArchLlama, map[string]any{"hidden_act": "gelu"}, "hidden_act", false},
		{"partial rotary", ArchLlama, map[string]any{"partial_rotary_factor": 0.5}, "partial_rotary_factor", false},
		{"qwen2 sliding", ArchQwen2, map[string]any{"use_sliding_window": true}, "use_sliding_window", false},
		{"qwen3 sliding layers", ArchQwen3, map[string]any{"layer_types": []string{"full_attention", "sliding_attention"}}, "layer_types[1]", false},
		{"mistral bias", ArchMistral, map[string]any{"attention_bias": true}, "attention_bias", false},
		{"quantized", ArchLlama, map[string]any{"quantization_config": map[string]any{"bits": 4}}, "quantization_config", false},
		{"softcapping", ArchLlama, map[string]any{"final_logit_softcapping": 30.0}, "final_logit_softcapping", false},
		{"heads", ArchLlama, map[string]any{"num_key_value_heads": 3}, "num_key_value_heads", true},
		{"missing eps", ArchLlama, map[string]any{"rms_norm_eps": nil}, "rms_norm_eps", true},
		{"llama3 without factor", ArchLlama, map[string]any{"rope_scaling": map[string]any{"rope_type": "llama3"}}, "rope_scaling.factor", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := baseConfig(tc.arch)
			for k, v := range tc.set {
				if v == nil {
					delete(m, k)
				} else {
					m[k] = v
				}
			}
			_, err := parse(t, m)
			want := ErrUnsupported
			if tc.bad {
				want = ErrBadConfig
			}
			if !errors.Is(err, want) || !strings.Contains(err.Error(), tc.names) {
				t.Fatalf("got %v, want %v naming %q", err, want, tc.names)
			}
			t.Log(err)
		})
	}
}

func TestReadConfigAccepts(t *testing.T) {
	m := baseConfig(ArchLlama)
	m["rope_scaling"] = map[string]any{"rope_type": "default"}
	m["partial_rotary_factor"] = 1.0
	m["attention_bias"] = true
	m["mlp_bias"] = true
	m["tie_word_embeddings"] = true
	c, err := parse(t, m)
	if err != nil {
		t.Fatal(err)
	}
	if !c.AttentionBias || !c.OutputBias || !c.MLPBias || !c.TieEmbeddings || c.RopeType != "default" {
		t.Fatalf("%+v", c)
	}

	// Mistral: a sliding window under the context cuts the context.
	m = baseConfig(ArchMistral)
	m["sliding_window"] = 64
	if c, err = parse(t, m); err != nil {
		t.Fatal(err)
	}
	if c.MaxContext() != 64 || len(c.Notes()) != 1 {
		t.Fatalf("context %d, notes %q", c.MaxContext(), c.Notes())
	}
	m["sliding_window"] = nil
	if c, err = parse(t, m); err != nil || c.MaxContext() != 256 || c.Notes() != nil {
		t.Fatalf("no window: %v, %v", c, err)
	}
}

// TestInvFreqLlama3 checks the llama3 rope scaling on Llama 3.2's
// parameters: high frequencies kept, low ones divided by the factor, the
// band between interpolated smoothly.
func TestInvFreqLlama3(t *testing.T) {
	m := baseConfig(ArchLlama)
	m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"] = 2048, 32, 8
	m["rope_theta"] = 500000.0
	m["rope_scaling"] = map[string]any{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
	c, err := parse(t, m)
	if err != nil {
		t.Fatal(err)
	}
	got := c.InvFreq()
	if len(got) != 32 {
		t.Fatalf("%d frequencies", len(got))
	}
	c.RopeType = "default"
	base := c.InvFreq()
	kept, scaled, between := 0, 0, 0
	for i := range got {
		wavelen := 2 * math.Pi / base[i]
		switch {
		case wavelen < 8192/4.0:
			kept++
			if got[i] != base[i] {
				t.Fatalf("frequency %d (wavelength %g) changed", i, wavelen)
			}
		case wavelen > 8192:
			scaled++
			if math.Abs(got[i]-base[i]/32) > 1e-18 {
				t.Fatalf("frequency %d: %g, want %g", i, got[i], base[i]/32)
			}
		default:
			between++
			if !(got[i] < base[i] && got[i] > base[i]/32) {
				t.Fatalf("frequency %d: %g not between %g and %g", i, got[i], base[i]/32, base[i])
			}
		}
		if i > 0 && got[i] >= got[i-1] {
			t.Fatalf("frequencies not decreasing at %d", i)
		}
	}
	if kept == 0 || scaled == 0 || between == 0 {
		t.Fatalf("kept %d, scaled %d, between %d: want each band used", kept, scaled, between)
	}
	if math.Abs(base[1]-1/math.Pow(500000, 2.0/64)) > 1e-18 {
		t.Fatalf("base frequency %g", base[1])
	}
}
