package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/infermesh/infermesh/shards/gguf"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/text"
)

// shardCheckpoint writes a random-weight Hugging Face checkpoint: what the
// demo, the benches and anyone without real weights import.
func shardCheckpoint(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard checkpoint", "--out DIR [--preset tiny|llama3.2-1b] [flags]",
		"Writes a Hugging Face model folder with random weights (config.json, safetensors, generation_config.json,\n"+
			"and the tokenizer files of --tokenizer): something to import with `infermesh shard import` where no\n"+
			"real weights are at hand. Flags other than --preset override the preset's shapes.")
	out := fs.String("out", "", "output folder (required)")
	preset := fs.String("preset", "tiny", "shapes: tiny, or llama3.2-1b (Llama 3.2 1B's config)")
	arch := fs.String("arch", checkpoint.Llama, "tiny: architecture (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)")
	tokenizer := fs.String("tokenizer", "", "folder with tokenizer.json and tokenizer_config.json to copy (vocabulary size and bos/eos follow the tokenizer's unless --vocab)")
	layers := fs.Int("layers", 0, "decoder layers")
	hidden := fs.Int("hidden", 0, "hidden size")
	vocab := fs.Int("vocab", 0, "vocabulary size")
	dtype := fs.String("dtype", "", "float32, bfloat16 or float16")
	shardCount := fs.Int("shards", 0, "safetensors files (0 or 1: model.safetensors)")
	seed := fs.Int64("seed", 1, "weight seed")
	ggufType := fs.String("gguf", "", "write one GGUF file at --out instead, as llama.cpp's converter lays the model out, its\n"+
		"projections and embedding of this type (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K; norms stay F32); needs --tokenizer")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	if *out == "" {
		fs.Usage()
		return errUsage
	}
	var cfg checkpoint.Config
	switch *preset {
	case "tiny":
		cfg = checkpoint.Tiny(*arch)
	case "llama3.2-1b":
		cfg = checkpoint.Llama32_1B()
	default:
		return fmt.Errorf("--preset %q: want tiny or llama3.2-1b", *preset)
	}
	var tokJSON, tokCfg []byte
	if *tokenizer != "" {
		var err error
		if tokJSON, err = os.ReadFile(filepath.Join(*tokenizer, "tokenizer.json")); err != nil {
			return err
		}
		if tokCfg, err = os.ReadFile(filepath.Join(*tokenizer, "tokenizer_config.json")); err != nil {
			return err
		}
	}
	set := func(dst *int, v int) {
		if v > 0 {
			*dst = v
		}
	}
	if tokJSON != nil && *vocab == 0 {
		tok, err := text.Load(tokJSON, tokCfg)
		if err != nil {
			return fmt.Errorf("--tokenizer %s: %w", *tokenizer, err)
		}
		cfg.Vocab = max(cfg.Vocab, tok.VocabSize())
		// The special tokens are the tokenizer's, not the preset's.
		if bos, ok := tok.BOS(); ok {
			if id, ok := tok.TokenID(bos); ok {
				cfg.BOS = id
			}
		}
		if eos, ok := tok.EOS(); ok {
			if id, ok := tok.TokenID(eos); ok && id != cfg.EOS {
				cfg.EOS, cfg.ExtraEOS = id, nil
			}
		}
	}
	set(&cfg.Layers, *layers)
	set(&cfg.Vocab, *vocab)
	set(&cfg.Shards, *shardCount)
	if *hidden > 0 {
		cfg.Hidden, cfg.Intermediate, cfg.HeadDim = *hidden, 4**hidden, 0
	}
	if *dtype != "" {
		cfg.DType = *dtype
	}
	cfg.Seed = *seed
	start := time.Now()
	if *ggufType != "" {
		var typ gguf.Type
		for _, t := range hf.GGUFTypes {
			if strings.EqualFold(t.String(), *ggufType) {
				typ = t
			}
		}
		if typ.String() != strings.ToUpper(*ggufType) {
			return fmt.Errorf("--gguf %q: want one of %s", *ggufType, ggufTypeNames())
		}
		if tokJSON == nil {
			return fmt.Errorf("--gguf: a GGUF file carries its tokenizer: give --tokenizer")
		}
		if err := checkpoint.WriteGGUF(*out, cfg, checkpoint.GGUFTypes{Matrix: typ, Embedding: typ}, tokJSON, tokCfg); err != nil {
			return err
		}
		e.printf("wrote a random-weight %s GGUF file (%d layers, hidden %d, vocabulary %d, %s) in %s: %s\n",
			cfg.Architecture, cfg.Layers, cfg.Hidden, cfg.Vocab, typ, time.Since(start).Round(time.Millisecond), *out)
		return nil
	}
	if err := checkpoint.Write(*out, cfg, tokJSON, tokCfg); err != nil {
		return err
	}
	e.printf("wrote a random-weight %s checkpoint (%d layers, hidden %d, vocabulary %d, %s) in %s: %s\n",
		cfg.Architecture, cfg.Layers, cfg.Hidden, cfg.Vocab, cfg.DType, time.Since(start).Round(time.Millisecond), *out)
	return nil
}
