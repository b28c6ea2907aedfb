package hf

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// Kind is the manifest kind of an imported model.
const Kind = "hf"

// Options tune Import. The zero value imports with the checkpoint's
// precision, one decoder layer per block.
type Options struct {
	// DType is the element type blocks store weights in: "float32",
	// "float16", or "" (or "auto"): float16 for float16 and bfloat16
	// checkpoints, float32 for float32 ones. Activations are float32
	// either way; float16 weights are cast in the graph.
	DType string
	// LayersPerBlock is how many decoder layers each block holds; 0 means 1.
	LayersPerBlock int
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
// holds one chunk of one tensor and one block's graph at a time.
func Import(src, out string, opts Options) (*shards.Model, error) {
	cfg, err := ReadConfig(src)
	if err != nil {
		return nil, err
	}
	perBlock := opts.LayersPerBlock
	if perBlock == 0 {
		perBlock = 1
	}
	if perBlock < 0 {
		return nil, fmt.Errorf("hf: layers per block %d", perBlock)
	}
	if _, err := os.Stat(filepath.Join(src, "tokenizer.json")); err != nil {
		return nil, fmt.Errorf("hf: the model's tokenizer: %w", err)
	}
	ckpt, err := safetensors.OpenCheckpoint(src)
	if err != nil {
		return nil, err
	}
	defer ckpt.Close()
	dtype, err := chooseDType(opts.DType, ckpt)
	if err != nil {
		return nil, err
	}

	// First pass: every block's graph, to check the checkpoint holds each
	// weight with the shape the config implies and nothing else, and to
	// count the bytes.
	plans := cfg.plan(perBlock)
	used := map[string]bool{}
	var total int64
	for _, p := range plans {
		g := newGraph("", dtype)
		p.emit(g)
		for _, w := range g.weights {
			info, ok := ckpt.Info(w.tensor)
			if !ok {
				return nil, fmt.Errorf("hf: %s: checkpoint has no tensor %s", cfg.Architecture, w.tensor)
			}
			if !sameShape(info.Shape, w.shape) {
				return nil, fmt.Errorf("hf: tensor %s has shape %v, config.json implies %v", w.tensor, info.Shape, w.shape)
			}
			used[w.tensor] = true
			total += w.bytes()
		}
	}
	var params int64
	for _, name := range ckpt.Names() {
		info, _ := ckpt.Info(name)
		switch {
		case used[name]:
			params += info.NumElements()
		case strings.HasSuffix(name, ".rotary_emb.inv_freq"): // recomputed from the config
		case name == "lm_head.weight" && cfg.TieEmbeddings: // a copy of the embedding
		default:
			return nil, fmt.Errorf("hf: %s: checkpoint tensor %s is not part of the model config.json describes (a bias, norm or layer it does not declare?)", cfg.Architecture, name)
		}
	}

	st, err := shards.OpenFileStore(filepath.Join(out, shards.BlocksDir))
	if err != nil {
		return nil, err
	}
	inputs, outputs := cfg.modelIO()
	m := &shards.Manifest{
		Format:  shards.ManifestFormat,
		Name:    modelName(src, cfg),
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
		},
		Info: &shards.ModelInfo{Architecture: cfg.Architecture, Parameters: params, DType: dtype.String()},
	}
	if m.Decoder.EOS, err = eosTokens(src, cfg); err != nil {
		return nil, err
	}
	for _, name := range modelFiles {
		data, err := os.ReadFile(filepath.Join(src, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		c, err := st.Put(shards.CodecBlock, data)
		if err != nil {
			return nil, err
		}
		m.Files = append(m.Files, shards.FileSpec{Name: name, CID: c.String(), Size: int64(len(data))})
	}

	// Second pass: write the blocks.
	prog := Progress{Total: total, Blocks: len(plans)}
	bw := &blockWriter{store: st, ckpt: ckpt}
	if opts.Progress != nil {
		bw.progress = func(n int64, tensor string) {
			prog.Done += n
			prog.Tensor = tensor
			opts.Progress(prog)
		}
	}
	for i, p := range plans {
		prog.Block = i
		g := newGraph(fmt.Sprintf("%s/block%d", m.Name, i), dtype)
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

// chooseDType resolves Options.DType against the checkpoint's precision
// (that of its embedding table).
func chooseDType(want string, ckpt *safetensors.Checkpoint) (protocol.DType, error) {
	switch want {
	case "float32":
		return protocol.Float32, nil
	case "float16":
		return protocol.Float16, nil
	case "", "auto":
		info, ok := ckpt.Info("model.embed_tokens.weight")
		if !ok {
			return 0, errors.New("hf: checkpoint has no tensor model.embed_tokens.weight")
		}
		switch info.DType {
		case "F32":
			return protocol.Float32, nil
		case "F16", "BF16":
			return protocol.Float16, nil
		}
		return 0, fmt.Errorf("hf: model.embed_tokens.weight is %s: %w (want F32, F16 or BF16)", info.DType, ErrUnsupported)
	}
	return 0, fmt.Errorf("hf: dtype %q: want auto, float32 or float16", want)
}

// modelName is the last element of config.json's _name_or_path, else the
// folder's name.
func modelName(src string, cfg *Config) string {
	if n := strings.TrimRight(cfg.Name, "/"); n != "" {
		return n[strings.LastIndex(n, "/")+1:]
	}
	if abs, err := filepath.Abs(src); err == nil {
		return filepath.Base(abs)
	}
	return filepath.Base(src)
}

// eosTokens reads generation_config.json's eos_token_id (a token or a
// list), falling back to config.json's.
func eosTokens(src string, cfg *Config) ([]int64, error) {
	b, err := os.ReadFile(filepath.Join(src, "generation_config.json"))
	if err == nil {
		gen, err := parseRaw(b)
		if err != nil {
			return nil, fmt.Errorf("hf: generation_config.json: %w", err)
		}
		if eos, err := tokenIDs(gen["eos_token_id"]); err == nil {
			return checkTokens(eos, cfg.Vocab)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return checkTokens(cfg.EOS, cfg.Vocab)
}

func checkTokens(ids []int64, vocab int) ([]int64, error) {
	for _, id := range ids {
		if id < 0 || id >= int64(vocab) {
			return nil, fmt.Errorf("hf: eos token %d outside the vocabulary [0,%d)", id, vocab)
		}
	}
	return ids, nil
}
