package hf_test

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/safetensors"
)

func writeSmoke(t *testing.T, dir string) {
	cfg := map[string]any{
		"architectures": []string{"LlamaForCausalLM"}, "hidden_size": 64, "intermediate_size": 96,
		"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
		"max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
		"eos_token_id": 2,
	}
	b, _ := json.Marshal(cfg)
	os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644)
	os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte("{}"), 0o644)
	var infos []safetensors.Info
	add := func(name string, shape ...int64) {
		infos = append(infos, safetensors.Info{Name: name, DType: "F32", Shape: shape})
	}
	add("model.embed_tokens.weight", 300, 64)
	for i := range 2 {
		p := "model.layers." + string(rune('0'+i)) + "."
		add(p+"input_layernorm.weight", 64)
		add(p+"self_attn.q_proj.weight", 64, 64)
		add(p+"self_attn.k_proj.weight", 32, 64)
		add(p+"self_attn.v_proj.weight", 32, 64)
		add(p+"self_attn.o_proj.weight", 64, 64)
		add(p+"post_attention_layernorm.weight", 64)
		add(p+"mlp.gate_proj.weight", 96, 64)
		add(p+"mlp.up_proj.weight", 96, 64)
		add(p+"mlp.down_proj.weight", 64, 96)
	}
	add("model.norm.weight", 64)
	add("lm_head.weight", 300, 64)
	w, err := safetensors.Create(filepath.Join(dir, "model.safetensors"), infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for _, in := range infos {
		n := int(protocol.NumElements(in.Shape))
		data := make([]byte, 4*n)
		for i := range n {
			v := float32(r.NormFloat64() * 0.1)
			if len(in.Shape) == 1 {
				v += 1
			}
			binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
		}
		if err := w.Write(in.Name, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestSmoke(t *testing.T) {
	src := t.TempDir()
	writeSmoke(t, src)
	m, err := hf.Import(src, t.TempDir(), hf.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()
	sess := span.NewSession()
	toks := []int64{1, 5, 7, 9}
	in := shards.StepInputs(m.Manifest.Decoder, toks, 0)
	out, err := sess.Step(in)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(out["logits"].Shape)
}
