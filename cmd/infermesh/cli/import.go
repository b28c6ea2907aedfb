package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
)

// ggufTypeNames lists the GGUF tensor types the importer reads.
func ggufTypeNames() string {
	var s []string
	for _, t := range hf.GGUFTypes {
		s = append(s, t.String())
	}
	return strings.Join(s, ", ")
}

func shardImport(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard import", "SRC --out DIR [flags]",
		"Imports a Hugging Face checkpoint folder (config.json, safetensors weights, tokenizer files) or a\n"+
			"llama.cpp GGUF file (metadata, tokenizer and chat template inside) as blocks: one for the embedding,\n"+
			"one per decoder layer (or --layers-per-block), one for the head.\n"+
			"Supported: "+strings.Join(hf.Architectures, ", ")+"; GGUF architectures llama (and Mistral), qwen2, qwen3\n"+
			"with tensors "+ggufTypeNames()+" (Q4_0 and Q8_0 keep their bits; K-quants are re-quantized).")
	out := fs.String("out", "", "output model directory (required)")
	dtype := fs.String("dtype", "auto", "weights in the blocks: auto (float16 for f16/bf16 checkpoints, float32 for f32), float32 or float16")
	perBlock := fs.Int("layers-per-block", 1, "decoder layers per block")
	quantize := fs.String("quantize", "", "store the projections, head and embedding quantized: none, q8 (8-bit weights, ~3.5x smaller than float32)\n"+
		"or q4 (4-bit projections, 8-bit embedding and head, ~5x smaller); a float32 scale per --quant-block weights.\n"+
		"Blocks then use onnxruntime's com.microsoft MatMulNBits and GatherBlockQuantized.\n"+
		"Default: none for a checkpoint folder; for a GGUF file, what most of its projection weights are")
	quantBlock := fs.Int("quant-block", hf.DefaultQuantBlock, "weights per quantization scale: 32 or 128 (must divide the hidden and MLP sizes)")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	if *out == "" {
		fs.Usage()
		return errUsage
	}
	if _, err := hf.ParseQuantization(*quantize, *quantBlock); err != nil {
		return err
	}
	opts := hf.Options{DType: *dtype, Quantize: *quantize, QuantBlock: *quantBlock, LayersPerBlock: *perBlock}
	gguf := false
	if st, err := os.Stat(pos[0]); err == nil && st.Mode().IsRegular() {
		gguf = true // a file, not a checkpoint folder: GGUF's reader says if it is not one
	} else if err != nil {
		return err
	}
	if !gguf {
		cfg, err := hf.ReadConfig(pos[0])
		if err != nil {
			return err
		}
		for _, n := range cfg.Notes() {
			fmt.Fprintf(e.stderr, "note: %s\n", n)
		}
	}
	bar := newImportBar(e.stderr)
	opts.Progress = bar.update
	start := time.Now()
	var m *shards.Model
	if gguf {
		var notes []string
		m, notes, err = hf.ImportGGUF(pos[0], *out, opts)
		bar.finish()
		for _, n := range notes {
			fmt.Fprintf(e.stderr, "note: %s\n", n)
		}
	} else {
		m, err = hf.Import(pos[0], *out, opts)
		bar.finish()
	}
	if err != nil {
		return err
	}
	info := m.Manifest.Info
	weights := info.DType
	if info.Quantization != "" {
		weights = "quantized " + info.Quantization + ", other weights " + info.DType
	}
	e.printf("imported %s (%s, %s parameters, %s) as model %s in %s\n  %d blocks, %s, in %s\n",
		m.Manifest.Name, info.Architecture, humanCount(info.Parameters), weights, m.ID,
		time.Since(start).Round(time.Millisecond), len(m.Manifest.Blocks), humanBytes(m.Manifest.TotalSize()), m.Dir)
	if rss := peakRSS(); rss > 0 {
		e.printf("  peak memory %s\n", humanBytes(rss))
	}
	return nil
}

// importBar draws an import's progress on stderr: one redrawn line on a
// terminal, at most a few times a second; a plain line every few seconds
// otherwise.
type importBar struct {
	w     io.Writer
	tty   bool
	start time.Time
	last  time.Time
	p     hf.Progress
	drawn bool
}

const (
	importBarEvery   = 200 * time.Millisecond // least time between redraws on a terminal
	importLinesEvery = 5 * time.Second        // least time between lines otherwise
)

func newImportBar(w io.Writer) *importBar {
	now := time.Now()
	return &importBar{w: w, tty: isTerminal(w), start: now, last: now}
}

func (b *importBar) update(p hf.Progress) {
	b.p = p
	every := importLinesEvery
	if b.tty {
		every = importBarEvery
	}
	if now := time.Now(); now.Sub(b.last) >= every {
		b.last = now
		b.draw()
	}
}

func (b *importBar) draw() {
	p := b.p
	pct := 100.0
	if p.Total > 0 {
		pct = 100 * float64(p.Done) / float64(p.Total)
	}
	rate := float64(p.Done) / 1e6 / max(time.Since(b.start).Seconds(), 1e-3)
	line := fmt.Sprintf("%5.1f%%  %s / %s  %.0f MB/s  block %d/%d", pct, humanBytes(p.Done), humanBytes(p.Total), rate, p.Block+1, p.Blocks)
	if !b.tty {
		fmt.Fprintln(b.w, line)
		return
	}
	const width = 30
	fill := int(pct / 100 * width)
	fmt.Fprintf(b.w, "\r[%s%s] %s\x1b[K", strings.Repeat("=", fill), strings.Repeat(" ", width-fill), line)
	b.drawn = true
}

// finish draws the final state and ends the line.
func (b *importBar) finish() {
	if b.p.Blocks == 0 {
		return
	}
	b.draw()
	if b.tty {
		fmt.Fprintln(b.w)
	}
}

// humanCount writes a parameter count as people do: 1.24B, 135M, 583K.
func humanCount(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.2fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1fK", float64(n)/1e3)
	}
	return fmt.Sprint(n)
}
