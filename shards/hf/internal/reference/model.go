package reference

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/infermesh/infermesh/shards/safetensors"
)

// Model is a loaded checkpoint. It is safe for concurrent use: each Session
// holds its own cache.
type Model struct {
	p      *params
	embed  matrix // [vocab, hidden]
	layers []layer
	norm   []float32
	head   matrix // lm_head, or embed when tied
}

// matrix is a row-major [rows, cols] weight, HF's [out_features, in_features].
type matrix struct {
	rows, cols int
	w          []float32
}

// linear is a projection with an optional bias.
type linear struct {
	m matrix
	b []float32 // nil when the layer has none
}

type layer struct {
	q, k, v, o       linear
	qNorm, kNorm     []float32 // Qwen3
	gate, up, down   linear
	inNorm, postNorm []float32
}

// Load reads the Hugging Face model folder dir: config.json and the
// safetensors weights (model.safetensors or a sharded index).
func Load(dir string) (*Model, error) {
	p, err := readConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	ck, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		return nil, err
	}
	defer ck.Close()
	l := loader{ck: ck, used: map[string]bool{}}
	m := &Model{p: p}
	h, q, kv := p.hidden, p.heads*p.headDim, p.kvHeads*p.headDim
	m.embed = l.matrix("model.embed_tokens.weight", p.vocab, h)
	for i := range p.layers {
		pre := fmt.Sprintf("model.layers.%d.", i)
		var ly layer
		ly.q = l.linear(pre+"self_attn.q_proj", q, h, p.qkvBias)
		ly.k = l.linear(pre+"self_attn.k_proj", kv, h, p.qkvBias)
		ly.v = l.linear(pre+"self_attn.v_proj", kv, h, p.qkvBias)
		ly.o = l.linear(pre+"self_attn.o_proj", h, q, p.oBias)
		if p.qkNorm {
			ly.qNorm = l.vector(pre+"self_attn.q_norm.weight", p.headDim)
			ly.kNorm = l.vector(pre+"self_attn.k_norm.weight", p.headDim)
		}
		ly.gate = l.linear(pre+"mlp.gate_proj", p.inter, h, p.mlpBias)
		ly.up = l.linear(pre+"mlp.up_proj", p.inter, h, p.mlpBias)
		ly.down = l.linear(pre+"mlp.down_proj", h, p.inter, p.mlpBias)
		ly.inNorm = l.vector(pre+"input_layernorm.weight", h)
		ly.postNorm = l.vector(pre+"post_attention_layernorm.weight", h)
		m.layers = append(m.layers, ly)
	}
	m.norm = l.vector("model.norm.weight", h)
	if p.tied {
		m.head = m.embed
		l.used["lm_head.weight"] = true // transformers ignores a saved copy
	} else {
		m.head = l.matrix("lm_head.weight", p.vocab, h)
	}
	if l.err != nil {
		return nil, l.err
	}
	// Tensors nobody reads mean the config and the weights disagree (old
	// conversions carry RoPE's inv_freq buffers, which are recomputed).
	for _, name := range ck.Names() {
		if !l.used[name] && !strings.HasSuffix(name, ".rotary_emb.inv_freq") {
			return nil, fmt.Errorf("reference: %s: tensor %q is not used by %s as configured", dir, name, p.name)
		}
	}
	return m, nil
}

// loader reads weights, keeping the first error.
type loader struct {
	ck   *safetensors.Checkpoint
	used map[string]bool
	err  error
}

func (l *loader) read(name string, shape ...int) []float32 {
	if l.err != nil {
		return nil
	}
	l.used[name] = true
	in, ok := l.ck.Info(name)
	if !ok {
		l.err = fmt.Errorf("reference: missing tensor %q", name)
		return nil
	}
	want := make([]int64, len(shape))
	for i, d := range shape {
		want[i] = int64(d)
	}
	if !slices.Equal(in.Shape, want) {
		l.err = fmt.Errorf("reference: tensor %q has shape %v, want %v", name, in.Shape, want)
		return nil
	}
	v, err := l.ck.Float32(name)
	if err != nil {
		l.err = fmt.Errorf("reference: %w", err)
	}
	return v
}

func (l *loader) matrix(name string, rows, cols int) matrix {
	return matrix{rows: rows, cols: cols, w: l.read(name, rows, cols)}
}

func (l *loader) vector(name string, n int) []float32 { return l.read(name, n) }

func (l *loader) linear(prefix string, out, in int, bias bool) linear {
	lin := linear{m: l.matrix(prefix+".weight", out, in)}
	if bias {
		lin.b = l.vector(prefix+".bias", out)
	}
	return lin
}

// Vocab returns the vocabulary size (the length of each logits row).
func (m *Model) Vocab() int { return m.p.vocab }

// Architecture returns config.json's architecture, e.g. "LlamaForCausalLM".
func (m *Model) Architecture() string { return m.p.name }

// InvFreq returns the RoPE inverse frequencies (head_dim/2 of them), after
// any rope scaling.
func (m *Model) InvFreq() []float64 { return slices.Clone(m.p.invFreq) }
