package hf

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// Kind is the manifest kind of an imported model.
const Kind = "hf"

// Options tune Import. The zero value imports with the checkpoint's
// precision, unquantized, one decoder layer per block.
type Options struct {
	// DType is the element type blocks store weights in: "float32",
	// "float16", or "" (or "auto"): float16 for float16 and bfloat16
	// checkpoints, float32 for float32 ones. Activations are float32
	// either way; float16 weights are cast in the graph. With Quantize,
	// it is the type of the weights left unquantized (norms, biases).
	DType string
	// Quantize stores the projections, the language-model head and the
	// embedding table quantized: "q8" (8 bits per weight) or "q4" (4
	// bits for the projections; the embedding and the head keep 8 unless
	// a QuantizedSource holds them at 4), plus a float32 scale per
	// QuantBlock weights; "" or "none": not quantized. See quant.go for
	// the layout. The blocks then use onnxruntime's com.microsoft
	// MatMulNBits and GatherBlockQuantized.
	Quantize string
	// QuantBlock is the quantization's block size, 32 or 128; 0 means 32.
	// It must divide the input size of every quantized weight.
	QuantBlock int
	// LayersPerBlock is how many decoder layers each block holds; 0 means 1.
	LayersPerBlock int
	// Name is the model's name in the manifest; "" means the last element
	// of Config.Name (_name_or_path), else, for Import, the folder's name,
	// else "model".
	Name string
	// Progress, if set, is called as weights are written, after each chunk
	// of up to a megabyte.
	Progress func(Progress)
}

// Progress reports an import under way.
type Progress struct {
	Done, Total   int64  // bytes of weights written, and in all
	Block, Blocks int    // the block being written (0-based), and how many
	Tensor        string // the checkpoint tensor being written
}

// Files copied from the checkpoint folder into the store, when present, and
// named in the manifest's Files.
var modelFiles = []string{"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "chat_template.jinja"}

// Import reads the Hugging Face model folder src and writes the model
// directory out (manifest.json and blocks/, as shards.WriteModel's layout).
// Weights are streamed from the checkpoint into the block files: memory
// holds one chunk of one tensor and one block's graph at a time (and a
// quantized tensor's scales, see blockWriter). It is ImportFrom with the
// folder's config.json, safetensors weights and files.
func Import(src, out string, opts Options) (*shards.Model, error) {
	cfg, err := ReadConfig(src)
	if err != nil {
		return nil, err
	}
	if _, err := ParseQuantization(opts.Quantize, opts.QuantBlock); err != nil {
		return nil, fmt.Errorf("hf: %w", err)
	}
	if _, err := os.Stat(filepath.Join(src, "tokenizer.json")); err != nil {
		return nil, fmt.Errorf("hf: the model's tokenizer: %w", err)
	}
	files := map[string][]byte{}
	for _, name := range modelFiles {
		data, err := os.ReadFile(filepath.Join(src, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		files[name] = data
	}
	ckpt, err := safetensors.OpenCheckpoint(src)
	if err != nil {
		return nil, err
	}
	defer ckpt.Close()
	if opts.Name == "" {
		opts.Name = modelName(src, cfg)
	}
	return ImportFrom(SafetensorsSource(ckpt), cfg, files, out, opts)
}

// ImportFrom writes the model directory out from weights read from src,
// the model cfg describes (ReadConfig's, or one built by hand: see
// Config.Check, which ImportFrom calls), and files: the model's other files
// by name, of which tokenizer.json is required and tokenizer_config.json,
// generation_config.json (its eos_token_id overrides cfg.EOS),
// config.json and chat_template.jinja are copied into the store and named
// in the manifest when present (in that order; any other name after them,
// sorted). Every tensor src holds must be one the model uses.
func ImportFrom(src Source, cfg *Config, files map[string][]byte, out string, opts Options) (*shards.Model, error) {
	if err := cfg.Check(); err != nil {
		return nil, err
	}
	quant, err := ParseQuantization(opts.Quantize, opts.QuantBlock)
	if err != nil {
		return nil, fmt.Errorf("hf: %w", err)
	}
	perBlock := opts.LayersPerBlock
	if perBlock == 0 {
		perBlock = 1
	}
	if perBlock < 0 {
		return nil, fmt.Errorf("hf: layers per block %d", perBlock)
	}
	if _, ok := files["tokenizer.json"]; !ok {
		return nil, fmt.Errorf("hf: the model's tokenizer: no tokenizer.json: %w", fs.ErrNotExist)
	}
	dtype, err := chooseDType(opts.DType, src)
	if err != nil {
		return nil, err
	}

	// First pass: every block's graph, to check the source holds each
	// weight with the shape the config implies and nothing else, that the
	// quantization's block divides each quantized weight's input size, and
	// to count the bytes.
	plans := cfg.plan(perBlock)
	head := "lm_head.weight"
	if cfg.TieEmbeddings {
		head = "model.embed_tokens.weight"
	}
	ends := quant.ends(src, "model.embed_tokens.weight", head)
	used := map[string]bool{}
	var total int64
	for _, p := range plans {
		g := newGraph("", dtype, quant)
		g.quantOf = ends
		p.emit(g)
		for _, w := range g.weights {
			shape, ok := src.Shape(w.tensor)
			if !ok {
				return nil, fmt.Errorf("hf: %s: checkpoint has no tensor %s", cfg.Architecture, w.tensor)
			}
			if !sameShape(shape, w.shape) {
				return nil, fmt.Errorf("hf: tensor %s has shape %v, config.json implies %v", w.tensor, shape, w.shape)
			}
			if w.part == packedWeight && w.shape[1]%int64(w.quant.Block) != 0 {
				return nil, fmt.Errorf("hf: %w: block size %d does not divide the input size %d of %s (try --quant-block 32)", ErrBadQuantization, w.quant.Block, w.shape[1], w.tensor)
			}
			used[w.tensor] = true
			total += w.bytes()
		}
	}
	var params int64
	for _, name := range src.Names() {
		shape, _ := src.Shape(name)
		switch {
		case used[name]:
			params += protocol.NumElements(shape)
		case strings.HasSuffix(name, ".rotary_emb.inv_freq"): // recomputed from the config
		case name == "lm_head.weight" && cfg.TieEmbeddings: // a copy of the embedding
		default:
			return nil, fmt.Errorf("hf: %s: checkpoint tensor %s is not part of the model config.json describes (a bias, norm or layer it does not declare?)", cfg.Architecture, name)
		}
	}
	eos := cfg.EOS
	if b, ok := files["generation_config.json"]; ok {
		gen, err := parseRaw(b)
		if err != nil {
			return nil, fmt.Errorf("hf: generation_config.json: %w", err)
		}
		if ids, err := tokenIDs(gen["eos_token_id"]); err == nil {
			eos = ids
		}
	}
	if eos, err = checkTokens(eos, cfg.Vocab); err != nil {
		return nil, err
	}

	st, err := shards.OpenFileStore(filepath.Join(out, shards.BlocksDir))
	if err != nil {
		return nil, err
	}
	name := opts.Name
	if name == "" {
		name = modelName("", cfg)
	}
	inputs, outputs := cfg.modelIO()
	m := &shards.Manifest{
		Format:  shards.ManifestFormat,
		Name:    name,
		Kind:    Kind,
		Inputs:  inputs,
		Outputs: outputs,
		Blocks:  make([]shards.BlockSpec, len(plans)),
		Decoder: &shards.DecoderSpec{
			Tokenizer:     shards.TokenizerHF,
			InputIDs:      inputIDs,
			PositionIDs:   positionIDs,
			AttentionMask: attentionMask,
			Logits:        logitsName,
			Vocab:         cfg.Vocab,
			MaxContext:    cfg.MaxContext(),
			EOS:           eos,
		},
		Info: &shards.ModelInfo{Architecture: cfg.Architecture, Parameters: params, DType: dtype.String(), Quantization: quant.String()},
	}
	names := slices.Clone(modelFiles)
	var extra []string
	for n := range files {
		if !slices.Contains(modelFiles, n) {
			extra = append(extra, n)
		}
	}
	slices.Sort(extra)
	for _, n := range append(names, extra...) {
		data, ok := files[n]
		if !ok {
			continue
		}
		c, err := st.Put(shards.CodecBlock, data)
		if err != nil {
			return nil, err
		}
		m.Files = append(m.Files, shards.FileSpec{Name: n, CID: c.String(), Size: int64(len(data))})
	}

	// Second pass: write the blocks.
	prog := Progress{Total: total, Blocks: len(plans)}
	bw := &blockWriter{store: st, src: src}
	if opts.Progress != nil {
		bw.progress = func(n int64, tensor string) {
			prog.Done += n
			prog.Tensor = tensor
			opts.Progress(prog)
		}
	}
	for i, p := range plans {
		prog.Block = i
		g := newGraph(fmt.Sprintf("%s/block%d", m.Name, i), dtype, quant)
		g.quantOf = ends
		for _, t := range p.spec.Inputs {
			g.Input(t)
		}
		p.emit(g)
		for _, t := range p.spec.Outputs {
			g.Output(t)
		}
		c, size, err := bw.write(g)
		if err != nil {
			return nil, fmt.Errorf("hf: block %d: %w", i, err)
		}
		m.Blocks[i] = p.spec
		m.Blocks[i].CID, m.Blocks[i].Size = c.String(), size
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	enc, err := m.Encode()
	if err != nil {
		return nil, err
	}
	tmp := filepath.Join(out, shards.ManifestFile+".tmp")
	if err := os.WriteFile(tmp, enc, 0o644); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, filepath.Join(out, shards.ManifestFile)); err != nil {
		return nil, err
	}
	return shards.OpenModel(out)
}

// chooseDType resolves Options.DType against the source's precision
// (that of its embedding table).
func chooseDType(want string, src Source) (protocol.DType, error) {
	switch want {
	case "float32":
		return protocol.Float32, nil
	case "float16":
		return protocol.Float16, nil
	case "", "auto":
		if _, ok := src.Shape("model.embed_tokens.weight"); !ok {
			return 0, errors.New("hf: checkpoint has no tensor model.embed_tokens.weight")
		}
		switch dt, _ := src.DType("model.embed_tokens.weight"); dt {
		case protocol.Float32:
			return protocol.Float32, nil
		case protocol.Float16, protocol.BFloat16:
			return protocol.Float16, nil
		}
		return 0, fmt.Errorf("hf: model.embed_tokens.weight: %w element type (want F32, F16 or BF16)", ErrUnsupported)
	}
	return 0, fmt.Errorf("hf: dtype %q: want auto, float32 or float16", want)
}

// modelName is the last element of config.json's _name_or_path, else the
// folder src's name, else "model".
func modelName(src string, cfg *Config) string {
	if n := strings.TrimRight(cfg.Name, "/"); n != "" {
		return n[strings.LastIndex(n, "/")+1:]
	}
	if src == "" {
		return "model"
	}
	if abs, err := filepath.Abs(src); err == nil {
		return filepath.Base(abs)
	}
	return filepath.Base(src)
}

func checkTokens(ids []int64, vocab int) ([]int64, error) {
	for _, id := range ids {
		if id < 0 || id >= int64(vocab) {
			return nil, fmt.Errorf("hf: eos token %d outside the vocabulary [0,%d)", id, vocab)
		}
	}
	return ids, nil
}
