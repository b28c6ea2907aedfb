package hf_test

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/safetensors"
)

// bigEnv runs TestImportMemory, which writes a 2.5 GB checkpoint.
const bigEnv = "INFERMESH_HF_BIG"

// TestImportMemory imports a checkpoint of Llama 3.2 1B's shapes in
// bfloat16 (2.5 GB; weights are not random, only their shapes matter) and
// checks the process's peak RSS stays under 1.5 GiB: weights stream from
// the checkpoint into the blocks. Set INFERMESH_HF_BIG=1 to run it.
func TestImportMemory(t *testing.T) {
	if os.Getenv(bigEnv) == "" {
		t.Skipf("set %s=1 to import a checkpoint of Llama 3.2 1B's shapes (2.5 GB)", bigEnv)
	}
	src := t.TempDir()
	writeLlama32Shapes(t, src)
	start := time.Now()
	var last hf.Progress
	m, err := hf.Import(src, t.TempDir(), hf.Options{Progress: func(p hf.Progress) { last = p }})
	if err != nil {
		t.Fatal(err)
	}
	peak := peakRSS(t)
	t.Logf("imported %d blocks, %d bytes of weights, %d parameters in %s; peak RSS %.0f MiB",
		len(m.Manifest.Blocks), last.Done, m.Manifest.Info.Parameters, time.Since(start).Round(time.Millisecond), float64(peak)/(1<<20))
	if last.Done != last.Total || m.Manifest.Info.Parameters != 1235814400 {
		t.Fatalf("progress %d of %d, %d parameters", last.Done, last.Total, m.Manifest.Info.Parameters)
	}
	if peak > 1536<<20 {
		t.Fatalf("peak RSS %d MiB, want under 1536", peak>>20)
	}
}

// peakRSS is the process's peak resident set (VmHWM).
func peakRSS(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Skip("no VmHWM")
	return 0
}

func writeLlama32Shapes(t *testing.T, dir string) {
	const hidden, inter, layers, heads, kv, vocab = 2048, 8192, 16, 32, 8, 128256
	cfg := map[string]any{
		"architectures": []string{hf.ArchLlama}, "hidden_size": hidden, "intermediate_size": inter,
		"num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64,
		"vocab_size": vocab, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
		"rope_scaling": map[string]any{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
		"hidden_act":   "silu", "tie_word_embeddings": true, "torch_dtype": "bfloat16", "eos_token_id": 128001,
	}
	b, _ := json.Marshal(cfg)
	os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644)
	os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte("{}"), 0o644)
	var infos []safetensors.Info
	add := func(name string, shape ...int64) {
		infos = append(infos, safetensors.Info{Name: name, DType: "BF16", Shape: shape})
	}
	add("model.embed_tokens.weight", vocab, hidden)
	for i := range layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		add(p+"input_layernorm.weight", hidden)
		add(p+"self_attn.q_proj.weight", heads*64, hidden)
		add(p+"self_attn.k_proj.weight", kv*64, hidden)
		add(p+"self_attn.v_proj.weight", kv*64, hidden)
		add(p+"self_attn.o_proj.weight", hidden, heads*64)
		add(p+"post_attention_layernorm.weight", hidden)
		add(p+"mlp.gate_proj.weight", inter, hidden)
		add(p+"mlp.up_proj.weight", inter, hidden)
		add(p+"mlp.down_proj.weight", hidden, inter)
	}
	add("model.norm.weight", hidden)
	w, err := safetensors.Create(filepath.Join(dir, "model.safetensors"), infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A pattern of small bfloat16 values, repeated.
	pattern := make([]byte, 1<<16)
	r := rand.New(rand.NewPCG(1, 1))
	for i := 0; i < len(pattern); i += 2 {
		binary.LittleEndian.PutUint16(pattern[i:], safetensors.Float32ToBF16(float32(r.NormFloat64()*0.02)))
	}
	for _, in := range infos {
		if err := w.WriteFrom(in.Name, bufio.NewReader(&repeat{pattern: pattern, left: in.NumElements() * 2})); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

type repeat struct {
	pattern []byte
	off     int
	left    int64
}

func (r *repeat) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.left)]
	n := copy(p, r.pattern[r.off:])
	r.off = (r.off + n) % len(r.pattern)
	r.left -= int64(n)
	return n, nil
}
