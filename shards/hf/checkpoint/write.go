package checkpoint

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"

	"github.com/infermesh/infermesh/shards/safetensors"
)

// dtypes maps torch_dtype to the safetensors dtype.
var dtypes = map[string]string{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

// tensor is one weight to write: its name, shape ([out, in] for a
// projection) and distribution.
type tensor struct {
	name      string
	shape     []int64
	mean, std float64
}

// Tensors lists the checkpoint's tensor names and shapes in transformers'
// state-dict order (the order shards are filled in).
func (c Config) Tensors() ([]safetensors.Info, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	ts := c.tensors()
	infos := make([]safetensors.Info, len(ts))
	for i, t := range ts {
		infos[i] = c.info(t)
	}
	return infos, nil
}

func (c Config) info(t tensor) safetensors.Info {
	es, _ := safetensors.ElemSize(dtypes[c.DType])
	n := es
	for _, d := range t.shape {
		n *= d
	}
	return safetensors.Info{Name: t.name, DType: dtypes[c.DType], Shape: slices.Clone(t.shape), Size: n}
}

func (c Config) tensors() []tensor {
	h, hd, in := int64(c.Hidden), int64(c.headDim()), int64(c.Intermediate)
	q, kv := int64(c.Heads)*hd, int64(c.kvHeads())*hd
	proj := func(name string, out, in int64) tensor {
		return tensor{name: name, shape: []int64{out, in}, std: 1 / math.Sqrt(float64(in))}
	}
	bias := func(name string, n int64) tensor { return tensor{name: name, shape: []int64{n}, std: 0.1} }
	norm := func(name string, n int64) tensor { return tensor{name: name, shape: []int64{n}, mean: 1, std: 0.1} }

	ts := []tensor{{name: "model.embed_tokens.weight", shape: []int64{int64(c.Vocab), h}, std: 1}}
	for i := range c.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		for _, x := range []struct {
			n   string
			out int64
		}{{"q", q}, {"k", kv}, {"v", kv}} {
			ts = append(ts, proj(p+"self_attn."+x.n+"_proj.weight", x.out, h))
			if c.qkvBias() {
				ts = append(ts, bias(p+"self_attn."+x.n+"_proj.bias", x.out))
			}
		}
		ts = append(ts, proj(p+"self_attn.o_proj.weight", h, q))
		if c.oBias() {
			ts = append(ts, bias(p+"self_attn.o_proj.bias", h))
		}
		if c.Architecture == Qwen3 {
			ts = append(ts, norm(p+"self_attn.q_norm.weight", hd), norm(p+"self_attn.k_norm.weight", hd))
		}
		ts = append(ts,
			proj(p+"mlp.gate_proj.weight", in, h),
			proj(p+"mlp.up_proj.weight", in, h),
			proj(p+"mlp.down_proj.weight", h, in),
			norm(p+"input_layernorm.weight", h),
			norm(p+"post_attention_layernorm.weight", h))
	}
	ts = append(ts, norm("model.norm.weight", h))
	if !c.TieEmbeddings {
		ts = append(ts, tensor{name: "lm_head.weight", shape: []int64{int64(c.Vocab), h}, std: 3 / math.Sqrt(float64(h))})
	}
	return ts
}

// Write writes a random-weight checkpoint of cfg into dir (created if
// needed): config.json, generation_config.json, tokenizer.json and
// tokenizer_config.json when given (non-nil), and the safetensors weights.
// The same config (seed included) always gives the same bytes.
func Write(dir string, cfg Config, tokenizerJSON, tokenizerConfigJSON []byte) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	conf, err := cfg.configJSON()
	if err != nil {
		return err
	}
	gen, err := cfg.generationConfigJSON()
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
	}{{"config.json", conf}, {"generation_config.json", gen}, {"tokenizer.json", tokenizerJSON}, {"tokenizer_config.json", tokenizerConfigJSON}}
	for _, f := range files {
		if f.data == nil {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, 0o644); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	groups, err := shard(cfg, cfg.tensors())
	if err != nil {
		return err
	}
	if err := removeWeights(dir); err != nil {
		return err
	}
	if len(groups) == 1 {
		return writeFile(filepath.Join(dir, safetensors.SingleFile), cfg, groups[0])
	}
	weightMap := map[string]string{}
	var total int64
	for i, g := range groups {
		name := fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(groups))
		if err := writeFile(filepath.Join(dir, name), cfg, g); err != nil {
			return err
		}
		for _, t := range g {
			weightMap[t.name] = name
			total += cfg.info(t).Size
		}
	}
	index, err := marshalPy(map[string]any{
		"metadata":   map[string]any{"total_size": total},
		"weight_map": weightMap,
	})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, safetensors.IndexFile), index, 0o644); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

// removeWeights removes the weight files of an earlier checkpoint in dir, so
// a stale index or single file cannot shadow the new weights.
func removeWeights(dir string) error {
	shards, err := filepath.Glob(filepath.Join(dir, "model-*-of-*.safetensors"))
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	for _, name := range append(shards, filepath.Join(dir, safetensors.SingleFile), filepath.Join(dir, safetensors.IndexFile)) {
		if err := os.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	return nil
}

// shard splits ts, in order, into cfg.Shards groups of about equal bytes.
func shard(cfg Config, ts []tensor) ([][]tensor, error) {
	n := max(cfg.Shards, 1)
	if n > len(ts) {
		return nil, fmt.Errorf("checkpoint: %d shards for %d tensors", n, len(ts))
	}
	var total int64
	for _, t := range ts {
		total += cfg.info(t).Size
	}
	groups := make([][]tensor, 0, n)
	var cur []tensor
	var done int64
	for i, t := range ts {
		cur = append(cur, t)
		done += cfg.info(t).Size
		left := len(ts) - i - 1     // tensors not yet placed
		need := n - len(groups) - 1 // groups still to start after this one
		full := done*int64(n) >= total*int64(len(groups)+1)
		if need > 0 && (left == need || full && left >= need) {
			groups = append(groups, cur)
			cur = nil
		}
	}
	return append(groups, cur), nil
}

// writeFile writes one safetensors file holding ts, sorted by name as the
// safetensors library does, each tensor generated as it is written.
func writeFile(path string, cfg Config, ts []tensor) error {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, func(a, b tensor) int {
		if a.name < b.name {
			return -1
		}
		if a.name > b.name {
			return 1
		}
		return 0
	})
	infos := make([]safetensors.Info, len(ts))
	for i, t := range ts {
		infos[i] = cfg.info(t)
	}
	w, err := safetensors.Create(path, infos, map[string]string{"format": "pt"})
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	for i, t := range ts {
		if err := w.WriteFrom(t.name, newGauss(cfg, t, infos[i])); err != nil {
			w.Close()
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

// gauss streams a tensor's seeded Gaussian values, encoded in the dtype.
type gauss struct {
	rng       *rand.Rand
	mean, std float64
	dtype     string
	left      int64 // elements not yet generated
	buf       []byte
	pending   []byte // generated, not yet read
}

// chunkElems is the number of elements generated at a time.
const chunkElems = 16 << 10

func newGauss(cfg Config, t tensor, in safetensors.Info) *gauss {
	h := fnv.New64a()
	h.Write([]byte(t.name))
	return &gauss{
		rng:   rand.New(rand.NewPCG(uint64(cfg.Seed), h.Sum64())),
		mean:  t.mean,
		std:   t.std,
		dtype: in.DType,
		left:  in.NumElements(),
	}
}

func (g *gauss) Read(p []byte) (int, error) {
	if len(g.pending) == 0 {
		if g.left == 0 {
			return 0, io.EOF
		}
		g.fill()
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

func (g *gauss) fill() {
	n := min(g.left, chunkElems)
	g.left -= n
	es := 2
	if g.dtype == "F32" {
		es = 4
	}
	if cap(g.buf) < int(n)*es {
		g.buf = make([]byte, chunkElems*es)
	}
	b := g.buf[:int(n)*es]
	for i := range int(n) {
		v := float32(g.mean + g.std*g.rng.NormFloat64())
		switch g.dtype {
		case "F32":
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
		case "BF16":
			binary.LittleEndian.PutUint16(b[2*i:], safetensors.Float32ToBF16(v))
		case "F16":
			h, _ := safetensors.Float32ToF16(v) // |v| is far below 65504 at these scales
			binary.LittleEndian.PutUint16(b[2*i:], h)
		}
	}
	g.pending = b
}
