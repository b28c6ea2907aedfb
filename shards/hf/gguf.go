package hf

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/gguf"
	"github.com/infermesh/infermesh/shards/gguf/vocab"
)

// GGUF import: a llama.cpp model file read as a Source of Hugging Face
// tensors, its metadata turned into the config.json transformers would
// have written (so that parseConfig checks it as it checks any), and its
// tokenizer metadata into tokenizer files (package vocab).

// ggufArchs maps GGUF's general.architecture to the Hugging Face
// architecture it is imported as. llama.cpp writes Mistral models as
// "llama" too.
var ggufArchs = map[string]string{
	"llama": ArchLlama,
	"qwen2": ArchQwen2,
	"qwen3": ArchQwen3,
}

// GGUFTypes are the tensor types a GGUF import reads.
var GGUFTypes = []gguf.Type{gguf.TypeF32, gguf.TypeF16, gguf.TypeBF16, gguf.TypeQ8_0, gguf.TypeQ4_0, gguf.TypeQ4_K, gguf.TypeQ5_K, gguf.TypeQ6_K}

// ggufSource presents a GGUF file's tensors under their Hugging Face names
// and shapes. llama.cpp's converter permutes the rows of the query and key
// projections of "llama" models (for its interleaved rotary embedding);
// the source undoes that, row by row, so quantized rows stay as they are.
type ggufSource struct {
	f       *gguf.File
	names   []string                    // Hugging Face names, in file order
	tensors map[string]*gguf.TensorInfo // by Hugging Face name
	// permuted: the query and key weights (rows) and biases (elements)
	// llama.cpp interleaved
	permuted map[string]bool
	headDim  int
	rowBuf   []float32
	rawBuf   []byte
}

func newGGUFSource(f *gguf.File, cfg *Config) (*ggufSource, error) {
	s := &ggufSource{f: f, tensors: map[string]*gguf.TensorInfo{}, permuted: map[string]bool{}, headDim: cfg.HeadDim}
	for _, t := range f.Tensors() {
		if t.Name == "rope_freqs.weight" {
			continue // read into the config (ggufConfig)
		}
		n, ok := gguf.HFName(t.Name)
		if !ok {
			return nil, fmt.Errorf("gguf: tensor %s is not part of a %s model this importer knows", t.Name, cfg.Architecture)
		}
		if !slices.Contains(GGUFTypes, t.Type) {
			return nil, fmt.Errorf("gguf: tensor %s: type %v: %w (supported: %s)", t.Name, t.Type, ErrUnsupported, typeNames(GGUFTypes))
		}
		s.names = append(s.names, n)
		s.tensors[n] = t
		if cfg.Architecture == ArchLlama && (strings.Contains(n, ".q_proj.") || strings.Contains(n, ".k_proj.")) {
			s.permuted[n] = true
		}
	}
	return s, nil
}

func typeNames(ts []gguf.Type) string {
	var s []string
	for _, t := range ts {
		s = append(s, t.String())
	}
	return strings.Join(s, ", ")
}

func (s *ggufSource) Names() []string { return s.names }

func (s *ggufSource) Shape(name string) ([]int64, bool) {
	t, ok := s.tensors[name]
	if !ok {
		return nil, false
	}
	return t.Shape(), true
}

func (s *ggufSource) DType(name string) (protocol.DType, bool) {
	t, ok := s.tensors[name]
	if !ok {
		return 0, false
	}
	switch t.Type {
	case gguf.TypeF32:
		return protocol.Float32, true
	case gguf.TypeBF16:
		return protocol.BFloat16, true
	}
	return protocol.Float16, true // F16, and the quantized types' float16 scales
}

// fileRow is the row of the file that holds row r of the Hugging Face
// tensor. llama.cpp wrote each head's rows [a·half + b] (a in {0, 1}, b
// under half = head_dim/2) at [2b + a].
func (s *ggufSource) fileRow(name string, r int64) int64 {
	if !s.permuted[name] {
		return r
	}
	hd := int64(s.headDim)
	head, in := r/hd, r%hd
	a, b := in/(hd/2), in%(hd/2)
	return head*hd + 2*b + a
}

func (s *ggufSource) ReadFloat32(name string, off int64, dst []float32) error {
	t, ok := s.tensors[name]
	if !ok {
		return fmt.Errorf("gguf: no tensor %s", name)
	}
	if off < 0 || off+int64(len(dst)) > t.Elements() {
		return fmt.Errorf("gguf: tensor %s: elements [%d,%d) of %d", name, off, off+int64(len(dst)), t.Elements())
	}
	if s.permuted[name] && len(t.Dims) == 1 {
		// A bias: its elements were interleaved as a weight's rows were.
		all, err := s.f.ReadTensor(t)
		if err != nil {
			return err
		}
		for i := range dst {
			dst[i] = all[s.fileRow(name, off+int64(i))]
		}
		return nil
	}
	rowLen := t.RowLen()
	if int64(cap(s.rowBuf)) < rowLen {
		s.rowBuf = make([]float32, rowLen)
	}
	row := s.rowBuf[:rowLen]
	for len(dst) > 0 {
		r, in := off/rowLen, off%rowLen
		n := min(int64(len(dst)), rowLen-in)
		if !s.permuted[name] && in == 0 && n == rowLen {
			// Whole rows in file order: read as many as fit at once.
			rows := int64(len(dst)) / rowLen
			if err := s.f.ReadRows(t, int(r), int(rows), dst[:rows*rowLen]); err != nil {
				return err
			}
			dst, off = dst[rows*rowLen:], off+rows*rowLen
			continue
		}
		if err := s.f.ReadRows(t, int(s.fileRow(name, r)), 1, row); err != nil {
			return err
		}
		copy(dst[:n], row[in:in+n])
		dst, off = dst[n:], off+n
	}
	return nil
}

// Quantized reports Q4_0 and Q8_0 matrices, which are held exactly in the
// layout Import writes with blocks of 32.
func (s *ggufSource) Quantized(name string) (Quantization, bool) {
	t, ok := s.tensors[name]
	if !ok || len(t.Dims) != 2 {
		return Quantization{}, false
	}
	switch t.Type {
	case gguf.TypeQ4_0:
		return Quantization{Bits: 4, Block: 32}, true
	case gguf.TypeQ8_0:
		return Quantization{Bits: 8, Block: 32}, true
	}
	return Quantization{}, false
}

// GGUF's block layouts: a float16 d, then 32 quants.
const (
	q40Bytes = 2 + 16
	q80Bytes = 2 + 32
)

func (s *ggufSource) ReadQuantizedRows(name string, row0, n int, packed []byte, scales []float32) error {
	q, ok := s.Quantized(name)
	if !ok {
		return fmt.Errorf("gguf: tensor %s is not Q4_0 or Q8_0", name)
	}
	t := s.tensors[name]
	k := int(t.RowLen())
	blocks := k / 32
	rowBytes := int(t.RowBytes())
	if len(packed) != n*q.rowBytes(k) || len(scales) != n*blocks {
		return fmt.Errorf("gguf: tensor %s: %d rows want %d packed bytes and %d scales, got %d and %d", name, n, n*q.rowBytes(k), n*blocks, len(packed), len(scales))
	}
	if cap(s.rawBuf) < rowBytes {
		s.rawBuf = make([]byte, rowBytes)
	}
	raw := s.rawBuf[:rowBytes]
	for i := range n {
		if err := s.f.ReadRawRows(t, int(s.fileRow(name, int64(row0+i))), 1, raw); err != nil {
			return err
		}
		out := packed[i*q.rowBytes(k) : (i+1)*q.rowBytes(k)]
		sc := scales[i*blocks : (i+1)*blocks]
		for b := range blocks {
			if q.Bits == 8 {
				blk := raw[b*q80Bytes : (b+1)*q80Bytes]
				sc[b] = gguf.F16ToFloat32(uint16(blk[0]) | uint16(blk[1])<<8)
				for j, v := range blk[2:] {
					out[b*32+j] = byte(int8(v)) + 128 // q+128: the default zero point
				}
				continue
			}
			blk := raw[b*q40Bytes : (b+1)*q40Bytes]
			sc[b] = gguf.F16ToFloat32(uint16(blk[0]) | uint16(blk[1])<<8)
			// Q4_0 holds element j in the low nibble of byte j and element
			// j+16 in its high nibble; ours pairs elements 2j and 2j+1.
			var e [32]byte
			for j, v := range blk[2:] {
				e[j], e[j+16] = v&0xf, v>>4
			}
			for j := range 16 {
				out[b*16+j] = e[2*j] | e[2*j+1]<<4
			}
		}
	}
	return nil
}

// ggufConfig builds the config.json transformers would have written for
// the model, from the file's metadata, and parses it. Fields GGUF cannot
// express that would change the math are refused by name.
func ggufConfig(f *gguf.File) (*Config, []byte, error) {
	md := f.Metadata()
	arch, err := md.String("general.architecture")
	if err != nil {
		return nil, nil, err
	}
	hfArch, ok := ggufArchs[arch]
	if !ok {
		names := make([]string, 0, len(ggufArchs))
		for k := range ggufArchs {
			names = append(names, k)
		}
		slices.Sort(names)
		return nil, nil, fmt.Errorf("gguf: architecture %q: %w (supported: %s)", arch, ErrUnsupported, strings.Join(names, ", "))
	}
	cfg := map[string]any{"architectures": []string{hfArch}, "hidden_act": "silu"}
	key := func(k string) string { return arch + "." + k }
	uints := []struct{ gguf, hf string }{
		{"embedding_length", "hidden_size"}, {"feed_forward_length", "intermediate_size"},
		{"block_count", "num_hidden_layers"}, {"attention.head_count", "num_attention_heads"},
		{"context_length", "max_position_embeddings"},
	}
	for _, u := range uints {
		v, err := md.Uint(key(u.gguf))
		if err != nil {
			return nil, nil, err
		}
		cfg[u.hf] = v
	}
	for _, u := range []struct{ gguf, hf string }{{"attention.head_count_kv", "num_key_value_heads"}, {"attention.key_length", "head_dim"}} {
		if v, err := md.Uint(key(u.gguf)); err == nil {
			cfg[u.hf] = v
		} else if !errors.Is(err, gguf.ErrNoKey) {
			return nil, nil, err
		}
	}
	if v, err := md.Uint(key("attention.value_length")); err == nil {
		if kl, ok := cfg["head_dim"].(uint64); ok && v != kl {
			return nil, nil, fmt.Errorf("gguf: %s %d differs from the key length %d: %w", key("attention.value_length"), v, kl, ErrUnsupported)
		}
	}
	eps, err := md.Float(key("attention.layer_norm_rms_epsilon"))
	if err != nil {
		return nil, nil, err
	}
	cfg["rms_norm_eps"] = shortest(eps)
	cfg["rope_theta"] = 10000.0
	if v, err := md.Float(key("rope.freq_base")); err == nil {
		cfg["rope_theta"] = shortest(v)
	} else if !errors.Is(err, gguf.ErrNoKey) {
		return nil, nil, err
	}
	if t, err := md.String(key("rope.scaling.type")); err == nil && t != "none" {
		return nil, nil, fmt.Errorf("gguf: %s = %q: %w (only unscaled rotary embeddings, or llama3's rope_freqs)", key("rope.scaling.type"), t, ErrUnsupported)
	}
	for _, k := range []string{"expert_count", "attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping"} {
		if kv, ok := md.Lookup(key(k)); ok {
			return nil, nil, fmt.Errorf("gguf: %s = %v: %w", kv.Key, kv.Value, ErrUnsupported)
		}
	}
	vocabSize := int64(0)
	if v, err := md.Uint(key("vocab_size")); err == nil {
		vocabSize = int64(v)
	} else if toks, err := md.Strings("tokenizer.ggml.tokens"); err == nil {
		vocabSize = int64(len(toks))
	}
	if t, ok := f.Tensor("token_embd.weight"); ok && len(t.Dims) == 2 {
		vocabSize = t.Dims[1]
	}
	cfg["vocab_size"] = vocabSize
	_, hasOutput := f.Tensor("output.weight")
	cfg["tie_word_embeddings"] = !hasOutput
	if _, ok := f.Tensor("blk.0.attn_q.bias"); ok && hfArch != ArchQwen2 {
		cfg["attention_bias"] = true
	}
	if _, ok := f.Tensor("blk.0.ffn_up.bias"); ok && hfArch == ArchLlama {
		cfg["mlp_bias"] = true
	}
	if id, err := md.Uint("tokenizer.ggml.bos_token_id"); err == nil {
		cfg["bos_token_id"] = id
	}
	if id, err := md.Uint("tokenizer.ggml.eos_token_id"); err == nil {
		cfg["eos_token_id"] = id
	}
	if name, err := md.String("general.name"); err == nil {
		cfg["_name_or_path"] = name
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		return nil, nil, err
	}
	c, err := parseConfig(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("gguf: %w", err)
	}
	if n, err := md.Uint(key("rope.dimension_count")); err == nil && int(n) != c.HeadDim {
		return nil, nil, fmt.Errorf("gguf: %s = %d under head_dim %d (partial rotary embedding): %w", key("rope.dimension_count"), n, c.HeadDim, ErrUnsupported)
	}
	// Llama 3.1's rotary scaling travels as a tensor of per-frequency
	// divisors, which is what the llama3 rope type computes.
	if t, ok := f.Tensor("rope_freqs.weight"); ok {
		if t.Elements() != int64(c.HeadDim/2) {
			return nil, nil, fmt.Errorf("gguf: rope_freqs.weight has %d values, want head_dim/2 = %d", t.Elements(), c.HeadDim/2)
		}
		factors, err := f.ReadTensor(t)
		if err != nil {
			return nil, nil, err
		}
		c.RopeFactors = make([]float64, len(factors))
		for i, v := range factors {
			if !(v > 0) || math.IsInf(float64(v), 0) {
				return nil, nil, fmt.Errorf("gguf: rope_freqs.weight[%d] = %g", i, v)
			}
			c.RopeFactors[i] = float64(v)
		}
	}
	return c, raw, nil
}

// shortest is the float32 metadata value v as the decimal a converter
// wrote it from (1e-05, not 9.999999747378752e-06): the shortest decimal
// that rounds to the same float32.
func shortest(v float64) float64 {
	d, err := strconv.ParseFloat(strconv.FormatFloat(v, 'g', -1, 32), 64)
	if err != nil {
		return v
	}
	return d
}

// ggufFiles are the tokenizer and generation files of the model, made from
// the file's tokenizer metadata.
func ggufFiles(f *gguf.File, cfg *Config) (map[string][]byte, error) {
	v, err := ggufVocab(f.Metadata())
	if err != nil {
		return nil, err
	}
	tok, tokCfg, err := vocab.Convert(v)
	if err != nil {
		return nil, fmt.Errorf("gguf: tokenizer: %w", err)
	}
	gen := map[string]any{}
	if cfg.BOS >= 0 {
		gen["bos_token_id"] = cfg.BOS
	}
	if len(cfg.EOS) == 1 {
		gen["eos_token_id"] = cfg.EOS[0]
	}
	genJSON, err := json.Marshal(gen)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{"tokenizer.json": tok, "tokenizer_config.json": tokCfg, "generation_config.json": genJSON}, nil
}

// ggufVocab reads the tokenizer.ggml.* keys and the chat templates.
func ggufVocab(md *gguf.Metadata) (*vocab.Vocab, error) {
	v := &vocab.Vocab{BOS: vocab.None, EOS: vocab.None, UNK: vocab.None, PAD: vocab.None}
	var err error
	if v.Model, err = md.String("tokenizer.ggml.model"); err != nil {
		return nil, fmt.Errorf("gguf: the file has no tokenizer: %w", err)
	}
	opt := func(err error) error {
		if errors.Is(err, gguf.ErrNoKey) {
			return nil
		}
		return err
	}
	if v.Pre, err = md.String("tokenizer.ggml.pre"); opt(err) != nil {
		return nil, err
	}
	if v.Tokens, err = md.Strings("tokenizer.ggml.tokens"); err != nil {
		return nil, err
	}
	if types, err := md.Ints("tokenizer.ggml.token_type"); err == nil {
		v.Types = make([]int32, len(types))
		for i, t := range types {
			v.Types[i] = int32(t)
		}
	} else if opt(err) != nil {
		return nil, err
	}
	if scores, err := md.Floats("tokenizer.ggml.scores"); err == nil {
		v.Scores = make([]float32, len(scores))
		for i, s := range scores {
			v.Scores[i] = float32(s)
		}
	} else if opt(err) != nil {
		return nil, err
	}
	if v.Merges, err = md.Strings("tokenizer.ggml.merges"); opt(err) != nil {
		return nil, err
	}
	for _, id := range []struct {
		key string
		dst *int64
	}{{"bos_token_id", &v.BOS}, {"eos_token_id", &v.EOS}, {"unknown_token_id", &v.UNK}, {"padding_token_id", &v.PAD}} {
		if n, err := md.Uint("tokenizer.ggml." + id.key); err == nil {
			*id.dst = int64(n)
		} else if opt(err) != nil {
			return nil, err
		}
	}
	for _, b := range []struct {
		key string
		dst **bool
	}{{"add_bos_token", &v.AddBOS}, {"add_eos_token", &v.AddEOS}, {"add_space_prefix", &v.AddSpacePrefix}} {
		if x, err := md.Bool("tokenizer.ggml." + b.key); err == nil {
			*b.dst = &x
		} else if opt(err) != nil {
			return nil, err
		}
	}
	if v.ChatTemplate, err = md.String("tokenizer.chat_template"); opt(err) != nil {
		return nil, err
	}
	for _, kv := range md.KVs() {
		if name, ok := strings.CutPrefix(kv.Key, "tokenizer.chat_template."); ok {
			s, ok := kv.Value.(string)
			if !ok {
				return nil, fmt.Errorf("gguf: %s is not a string", kv.Key)
			}
			if v.ChatTemplates == nil {
				v.ChatTemplates = map[string]string{}
			}
			v.ChatTemplates[name] = s
		}
	}
	return v, nil
}

// ImportGGUF imports a llama.cpp GGUF file of the Llama (and Mistral),
// Qwen2 or Qwen3 architecture: its metadata becomes the model's config,
// its tokenizer metadata the tokenizer files, its tensors the blocks'
// weights. Q4_0 and Q8_0 tensors keep their bits (with opts.Quantize ""
// the import takes the quantization most of the file's projection weights
// have); other tensors are dequantized and, when the import quantizes,
// quantized again: Notes (returned even on success) say which.
func ImportGGUF(path, out string, opts Options) (*shards.Model, []string, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	cfg, configJSON, err := ggufConfig(f)
	if err != nil {
		return nil, nil, err
	}
	src, err := newGGUFSource(f, cfg)
	if err != nil {
		return nil, nil, err
	}
	files, err := ggufFiles(f, cfg)
	if err != nil {
		return nil, nil, err
	}
	files["config.json"] = configJSON
	notes := cfg.Notes()
	if opts.Quantize == "" {
		opts.Quantize, opts.QuantBlock = src.defaultQuantization()
		if opts.Quantize != "none" {
			notes = append(notes, fmt.Sprintf("quantization %s/%d, as most of the file's projection weights (--quantize to choose another)", opts.Quantize, opts.QuantBlock))
		}
	}
	quant, err := ParseQuantization(opts.Quantize, opts.QuantBlock)
	if err != nil {
		return nil, notes, fmt.Errorf("hf: %w", err)
	}
	notes = append(notes, src.conversions(quant)...)
	if opts.Name == "" {
		opts.Name = cfg.Name
	}
	m, err := ImportFrom(src, cfg, files, out, opts)
	return m, notes, err
}

// projection reports whether a Hugging Face tensor name is a projection's
// weight matrix (what the import quantizes, besides the embedding and
// head).
func projection(name string) bool {
	return strings.HasPrefix(name, "model.layers.") && strings.HasSuffix(name, "_proj.weight")
}

// defaultQuantization is the --quantize the file's projection weights
// suggest: what most of their elements are stored as, Q4_0 and Q4_K as
// q4, Q8_0, Q5_K and Q6_K as q8, float types as none.
func (s *ggufSource) defaultQuantization() (string, int) {
	count := map[string]int64{}
	for _, n := range s.names {
		if !projection(n) {
			continue
		}
		t := s.tensors[n]
		switch t.Type {
		case gguf.TypeQ4_0, gguf.TypeQ4_K:
			count["q4"] += t.Elements()
		case gguf.TypeQ8_0, gguf.TypeQ5_K, gguf.TypeQ6_K:
			count["q8"] += t.Elements()
		default:
			count["none"] += t.Elements()
		}
	}
	best := "none"
	for _, q := range []string{"q8", "q4"} {
		if count[q] > count[best] {
			best = q
		}
	}
	return best, DefaultQuantBlock
}

// conversions say which tensors an import with quant stores otherwise than
// the file holds them, by GGUF type: the K-quants, dequantized and
// quantized again, and the lossless types widened or quantized.
func (s *ggufSource) conversions(quant Quantization) []string {
	byType := map[gguf.Type]int{}
	for _, n := range s.names {
		t := s.tensors[n]
		if len(t.Dims) != 2 {
			continue // norms and biases: stored as float
		}
		if q, ok := s.Quantized(n); ok && q == quant {
			continue // copied as they are
		}
		if t.Type == gguf.TypeF32 || t.Type == gguf.TypeF16 || t.Type == gguf.TypeBF16 {
			if !quant.On() {
				continue
			}
		}
		byType[t.Type]++
	}
	var notes []string
	for _, typ := range GGUFTypes {
		n := byType[typ]
		if n == 0 {
			continue
		}
		to := "float weights"
		switch {
		case quant.Bits == 4:
			to = quant.String() + " (the embedding and head at 8 bits)"
		case quant.On():
			to = quant.String()
		}
		notes = append(notes, fmt.Sprintf("%d %s tensors dequantized and stored as %s", n, typ, to))
	}
	return notes
}
