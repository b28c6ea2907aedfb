package gguf

import (
	"strconv"
	"strings"
)

// llama.cpp names the tensors of the Llama, Mistral and Qwen decoders
// otherwise than Hugging Face checkpoints do; HFName and Name translate.
var (
	// whole tensors: GGUF name, Hugging Face name
	modelTensors = [][2]string{
		{"token_embd.weight", "model.embed_tokens.weight"},
		{"output_norm.weight", "model.norm.weight"},
		{"output.weight", "lm_head.weight"},
	}
	// parts of decoder layer N: "blk.N." + GGUF part, "model.layers.N." +
	// Hugging Face part, each followed by ".weight" or ".bias"
	layerParts = [][2]string{
		{"attn_norm", "input_layernorm"},
		{"ffn_norm", "post_attention_layernorm"},
		{"attn_q", "self_attn.q_proj"},
		{"attn_k", "self_attn.k_proj"},
		{"attn_v", "self_attn.v_proj"},
		{"attn_output", "self_attn.o_proj"},
		{"attn_q_norm", "self_attn.q_norm"},
		{"attn_k_norm", "self_attn.k_norm"},
		{"ffn_gate", "mlp.gate_proj"},
		{"ffn_up", "mlp.up_proj"},
		{"ffn_down", "mlp.down_proj"},
	}
)

// HFName is the Hugging Face name of a llama.cpp decoder tensor
// ("blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight"); false
// for a name it does not know.
func HFName(name string) (string, bool) {
	return translate(name, 0, "blk.", "model.layers.")
}

// Name is llama.cpp's name of a Hugging Face decoder tensor, HFName's
// inverse.
func Name(hfName string) (string, bool) {
	return translate(hfName, 1, "model.layers.", "blk.")
}

// translate maps name from column from of the tables to the other one.
func translate(name string, from int, layerPrefix, toPrefix string) (string, bool) {
	to := 1 - from
	for _, t := range modelTensors {
		if name == t[from] {
			return t[to], true
		}
	}
	rest, ok := strings.CutPrefix(name, layerPrefix)
	if !ok {
		return "", false
	}
	layer, field, _ := strings.Cut(rest, ".")
	if _, err := strconv.Atoi(layer); err != nil {
		return "", false
	}
	for _, p := range layerParts {
		part, ok := strings.CutPrefix(field, p[from]+".")
		if ok && (part == "weight" || part == "bias") {
			return toPrefix + layer + "." + p[to] + "." + part, true
		}
	}
	return "", false
}
