package gguf_test

import (
	"testing"

	"github.com/infermesh/infermesh/shards/gguf"
)

func TestNames(t *testing.T) {
	for _, c := range [][2]string{
		{"token_embd.weight", "model.embed_tokens.weight"},
		{"output.weight", "lm_head.weight"},
		{"blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"},
		{"blk.12.attn_q.bias", "model.layers.12.self_attn.q_proj.bias"},
		{"blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight"},
		{"blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"},
		{"blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"},
	} {
		if got, ok := gguf.HFName(c[0]); !ok || got != c[1] {
			t.Errorf("HFName(%q) = %q, %v; want %q", c[0], got, ok, c[1])
		}
		if got, ok := gguf.Name(c[1]); !ok || got != c[0] {
			t.Errorf("Name(%q) = %q, %v; want %q", c[1], got, ok, c[0])
		}
	}
	for _, bad := range []string{"rope_freqs.weight", "blk.x.attn_q.weight", "blk.0.attn_q.scale", "blk.0.attn_qkv.weight", "model.layers.0.self_attn.q_proj"} {
		if got, ok := gguf.HFName(bad); ok {
			t.Errorf("HFName(%q) = %q", bad, got)
		}
		if got, ok := gguf.Name(bad); ok {
			t.Errorf("Name(%q) = %q", bad, got)
		}
	}
}
