package checkpoint

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strings"

	"github.com/infermesh/infermesh/shards/gguf"
	"github.com/infermesh/infermesh/shards/gguf/vocab"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// GGUFTypes are the tensor types WriteGGUF stores: Matrix for the
// projections, Embedding for the token embedding and the untied LM head,
// and float32 for norms, biases and rope_freqs (as llama.cpp's quantize
// keeps them).
type GGUFTypes struct {
	Matrix, Embedding gguf.Type
}

// ggufArch is general.architecture for each architecture: llama.cpp's
// converter writes Mistral models as "llama".
var ggufArch = map[string]string{Llama: "llama", Mistral: "llama", Qwen2: "qwen2", Qwen3: "qwen3"}

// ggufPre is tokenizer.ggml.pre of each architecture's byte-level BPE
// tokenizer (what the converter finds for Llama 3's and Qwen's).
var ggufPre = map[string]string{Llama: "llama-bpe", Mistral: "llama-bpe", Qwen2: "qwen2", Qwen3: "qwen2"}

// WriteGGUF writes the checkpoint Write would write for cfg as one GGUF
// file, as llama.cpp's convert_hf_to_gguf.py lays a model out: its
// tensor names, dimensions in ggml order, the rows of the query and key
// projections of "llama" models permuted for its interleaved rotary
// embedding, Llama 3.1's rope scaling as a rope_freqs tensor, the
// tokenizer (tokenizerJSON and tokenizerConfigJSON, which must be given)
// as tokenizer.ggml.* metadata. The weights are the same values as
// Write's (rounded to cfg.DType), then stored as types says.
func WriteGGUF(path string, cfg Config, types GGUFTypes, tokenizerJSON, tokenizerConfigJSON []byte) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	if tokenizerJSON == nil || tokenizerConfigJSON == nil {
		return fmt.Errorf("checkpoint: a GGUF file carries its tokenizer: give tokenizer.json and tokenizer_config.json")
	}
	arch := ggufArch[cfg.Architecture]
	v, err := vocab.FromHF(tokenizerJSON, tokenizerConfigJSON, ggufPre[cfg.Architecture])
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if len(v.Tokens) > cfg.Vocab {
		return fmt.Errorf("checkpoint: the tokenizer has %d tokens, the model's vocabulary %d", len(v.Tokens), cfg.Vocab)
	}
	w, err := gguf.Create(path)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	fail := func(err error) error {
		w.Close()
		return fmt.Errorf("checkpoint: %w", err)
	}
	hd := cfg.headDim()
	kvs := []struct {
		k string
		v any
	}{
		{"general.architecture", arch},
		{"general.name", fmt.Sprintf("random-%s", strings.ToLower(cfg.Architecture))},
		{"general.file_type", uint32(1)},
		{arch + ".context_length", uint32(cfg.MaxPositions)},
		{arch + ".embedding_length", uint32(cfg.Hidden)},
		{arch + ".block_count", uint32(cfg.Layers)},
		{arch + ".feed_forward_length", uint32(cfg.Intermediate)},
		{arch + ".attention.head_count", uint32(cfg.Heads)},
		{arch + ".attention.head_count_kv", uint32(cfg.kvHeads())},
		{arch + ".attention.key_length", uint32(hd)},
		{arch + ".attention.value_length", uint32(hd)},
		{arch + ".rope.dimension_count", uint32(hd)},
		{arch + ".rope.freq_base", float32(cfg.RopeTheta)},
		{arch + ".attention.layer_norm_rms_epsilon", float32(cfg.RMSNormEps)},
		{arch + ".vocab_size", uint32(cfg.Vocab)},
		{"tokenizer.ggml.model", v.Model},
		{"tokenizer.ggml.pre", v.Pre},
		{"tokenizer.ggml.tokens", padTokens(v.Tokens, cfg.Vocab)},
		{"tokenizer.ggml.token_type", padTypes(v.Types, cfg.Vocab)},
	}
	if v.Scores != nil {
		kvs = append(kvs, struct {
			k string
			v any
		}{"tokenizer.ggml.scores", append(v.Scores, make([]float32, cfg.Vocab-len(v.Scores))...)})
	}
	if v.Merges != nil {
		kvs = append(kvs, struct {
			k string
			v any
		}{"tokenizer.ggml.merges", v.Merges})
	}
	for _, kv := range kvs {
		if err := w.AddKV(kv.k, kv.v); err != nil {
			return fail(err)
		}
	}
	for _, id := range []struct {
		k string
		v int64
	}{{"bos_token_id", cfg.BOS}, {"eos_token_id", cfg.EOS}, {"unknown_token_id", v.UNK}, {"padding_token_id", v.PAD}} {
		if id.v >= 0 {
			if err := w.AddKV("tokenizer.ggml."+id.k, uint32(id.v)); err != nil {
				return fail(err)
			}
		}
	}
	for _, b := range []struct {
		k string
		v *bool
	}{{"add_bos_token", v.AddBOS}, {"add_eos_token", v.AddEOS}} {
		if b.v != nil {
			if err := w.AddKV("tokenizer.ggml."+b.k, *b.v); err != nil {
				return fail(err)
			}
		}
	}
	if v.ChatTemplate != "" {
		if err := w.AddKV("tokenizer.chat_template", v.ChatTemplate); err != nil {
			return fail(err)
		}
	}

	// Tensors: declared first, then written in the same order.
	type out struct {
		t       tensor
		name    string
		typ     gguf.Type
		permute int // heads whose rows the converter interleaves; 0: none
	}
	var outs []out
	for _, t := range cfg.tensors() {
		name, ok := gguf.Name(t.name)
		if !ok {
			return fail(fmt.Errorf("no GGUF name for %s", t.name))
		}
		o := out{t: t, name: name, typ: gguf.TypeF32}
		switch {
		case len(t.shape) == 2 && (name == "token_embd.weight" || name == "output.weight"):
			o.typ = types.Embedding
		case len(t.shape) == 2:
			o.typ = types.Matrix
		}
		if arch == "llama" {
			switch {
			case strings.Contains(t.name, ".q_proj."):
				o.permute = cfg.Heads
			case strings.Contains(t.name, ".k_proj."):
				o.permute = cfg.kvHeads()
			}
		}
		outs = append(outs, o)
	}
	var ropeFreqs []float32
	if rt, _ := cfg.RopeScaling["rope_type"].(string); rt == "llama3" {
		ropeFreqs = llama3RopeFactors(cfg)
		if err := w.AddTensor("rope_freqs.weight", gguf.TypeF32, int64(len(ropeFreqs))); err != nil {
			return fail(err)
		}
	}
	for _, o := range outs {
		dims := make([]int64, len(o.t.shape))
		for i, d := range o.t.shape {
			dims[len(dims)-1-i] = d
		}
		if err := w.AddTensor(o.name, o.typ, dims...); err != nil {
			return fail(fmt.Errorf("%s: %w", o.name, err))
		}
	}
	if ropeFreqs != nil {
		if err := w.WriteRows(ropeFreqs); err != nil {
			return fail(err)
		}
	}
	for _, o := range outs {
		if err := writeGGUFTensor(w, cfg, o.t, o.permute, hd); err != nil {
			return fail(fmt.Errorf("%s: %w", o.name, err))
		}
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

// writeGGUFTensor generates t's values as Write does (rounded to
// cfg.DType) and writes them, a head's rows at a time when they are
// permuted.
func writeGGUFTensor(w *gguf.Writer, cfg Config, t tensor, heads, headDim int) error {
	h := fnv.New64a()
	h.Write([]byte(t.name))
	rng := rand.New(rand.NewPCG(uint64(cfg.Seed), h.Sum64()))
	rowLen := t.shape[len(t.shape)-1]
	rows := int64(1)
	for _, d := range t.shape[:len(t.shape)-1] {
		rows *= d
	}
	group := int64(1) // rows generated before they are written
	if heads > 0 && len(t.shape) == 2 {
		group = int64(headDim)
	}
	if group == 1 {
		group = max(1, min(rows, (1<<16)/rowLen))
	}
	buf := make([]float32, group*rowLen)
	perm := make([]float32, group*rowLen)
	for r := int64(0); r < rows; r += group {
		n := min(group, rows-r)
		x := buf[:n*rowLen]
		for i := range x {
			x[i] = roundTo(cfg.DType, float32(t.mean+t.std*rng.NormFloat64()))
		}
		if heads > 0 && len(t.shape) == 1 {
			// A bias: its elements are permuted as a weight's rows.
			half := int64(headDim / 2)
			for e := range rowLen {
				h, in := e/int64(headDim), e%int64(headDim)
				a, b := in/half, in%half
				perm[h*int64(headDim)+2*b+a] = x[e]
			}
			x = perm[:rowLen]
		} else if heads > 0 {
			// The converter's permute: row a·half+b of a head goes to 2b+a.
			half := int64(headDim / 2)
			for in := range int64(headDim) {
				a, b := in/half, in%half
				copy(perm[(2*b+a)*rowLen:(2*b+a+1)*rowLen], x[in*rowLen:(in+1)*rowLen])
			}
			x = perm[:n*rowLen]
		}
		if err := w.WriteRows(x); err != nil {
			return err
		}
	}
	return nil
}

// roundTo rounds v to the checkpoint's dtype, as Write stores it.
func roundTo(dtype string, v float32) float32 {
	switch dtype {
	case "bfloat16":
		return safetensors.BF16ToFloat32(safetensors.Float32ToBF16(v))
	case "float16":
		h, _ := safetensors.Float32ToF16(v)
		return safetensors.F16ToFloat32(h)
	}
	return v
}

// llama3RopeFactors are the per-frequency divisors llama.cpp stores as
// rope_freqs for Llama 3.1's rope scaling: what the llama3 rope type
// divides each inverse frequency by.
func llama3RopeFactors(cfg Config) []float32 {
	s := cfg.RopeScaling
	num := func(k string) float64 {
		switch v := s[k].(type) {
		case float64:
			return v
		case int:
			return float64(v)
		}
		return 0
	}
	factor, low, high, old := num("factor"), num("low_freq_factor"), num("high_freq_factor"), num("original_max_position_embeddings")
	hd := cfg.headDim()
	out := make([]float32, hd/2)
	for i := range out {
		freq := 1 / math.Pow(cfg.RopeTheta, float64(2*i)/float64(hd))
		wavelen := 2 * math.Pi / freq
		switch {
		case wavelen < old/high:
			out[i] = 1
		case wavelen > old/low:
			out[i] = float32(factor)
		default:
			smooth := (old/wavelen - low) / (high - low)
			out[i] = float32(1 / ((1-smooth)/factor + smooth))
		}
	}
	return out
}

func padTokens(toks []string, n int) []string {
	out := append([]string(nil), toks...)
	for i := len(toks); i < n; i++ {
		out = append(out, fmt.Sprintf("[PAD%d]", i))
	}
	return out
}

func padTypes(types []int32, n int) []int32 {
	out := append([]int32(nil), types...)
	for len(out) < n {
		out = append(out, vocab.TypeUnused)
	}
	return out
}
