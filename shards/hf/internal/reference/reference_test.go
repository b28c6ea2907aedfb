package reference

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/safetensors"
)

var archs = []string{checkpoint.Llama, checkpoint.Mistral, checkpoint.Qwen2, checkpoint.Qwen3}

// load writes cfg as a random checkpoint and loads it.
func load(tb testing.TB, cfg checkpoint.Config) *Model {
	tb.Helper()
	dir := tb.TempDir()
	if err := checkpoint.Write(dir, cfg, nil, nil); err != nil {
		tb.Fatal(err)
	}
	m, err := Load(dir)
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

func maxDiff(a, b [][]float64) float64 {
	var d float64
	for i := range a {
		for j := range a[i] {
			d = max(d, math.Abs(a[i][j]-b[i][j]))
		}
	}
	return d
}

func TestRopePositionZeroIsIdentity(t *testing.T) {
	x := []float64{0.3, -1.2, 2.5, 0.7, -0.1, 4}
	y := append([]float64(nil), x...)
	rope(y, 0, []float64{1, 0.1, 0.01})
	for i := range x {
		if x[i] != y[i] {
			t.Fatalf("rope at 0 changed %v to %v", x, y)
		}
	}
}

// TestRopeRotateHalf checks the pairing (x[i] with x[i+d/2]) and direction
// of the rotation, and that q·k depends only on the distance of positions.
func TestRopeRotateHalf(t *testing.T) {
	inv := []float64{0.5, 0.25}
	x := []float64{1, 0, 0, 0}
	rope(x, 3, inv)
	want := []float64{math.Cos(1.5), 0, math.Sin(1.5), 0}
	for i := range x {
		if math.Abs(x[i]-want[i]) > 1e-15 {
			t.Fatalf("rope((1,0,0,0), 3) = %v, want %v", x, want)
		}
	}
	q0, k0 := []float64{0.3, -1, 2, 0.5}, []float64{1, 0.2, -0.7, 1.1}
	dot := func(pq, pk int) float64 {
		q, k := append([]float64(nil), q0...), append([]float64(nil), k0...)
		rope(q, pq, inv)
		rope(k, pk, inv)
		return q[0]*k[0] + q[1]*k[1] + q[2]*k[2] + q[3]*k[3]
	}
	if a, b := dot(7, 4), dot(13, 10); math.Abs(a-b) > 1e-12 {
		t.Errorf("q·k at distance 3: %v vs %v", a, b)
	}
}

// TestLlama3InvFreq checks the llama3 rescaling against values derived by
// hand for Tiny(Llama): theta 10000, head_dim 16, factor 8, low 1, high 4,
// original context 64 (so wavelengths < 16 keep their frequency, > 64 are
// divided by 8, and the smooth factor s = (64/wavelen - 1)/3 blends between).
func TestLlama3InvFreq(t *testing.T) {
	m := load(t, checkpoint.Tiny(checkpoint.Llama))
	got := m.InvFreq()
	s1 := (32/(math.Pi*math.Sqrt(10)) - 1) / 3 // i=1: f = 10^-1/2, wavelen = 2π√10 ≈ 19.87
	s2 := (3.2/math.Pi - 1) / 3                // i=2: f = 0.1, wavelen = 20π ≈ 62.83
	want := []float64{
		1,                                  // i=0: wavelen 2π < 16
		1 / math.Sqrt(10) * (1 + 7*s1) / 8, // (1-s)·f/8 + s·f
		0.1 * (1 + 7*s2) / 8,               //
		math.Pow(10, -1.5) / 8,             // i=3: wavelen ≈ 198.7 > 64
		1e-2 / 8, math.Pow(10, -2.5) / 8, 1e-3 / 8, math.Pow(10, -3.5) / 8,
	}
	// The same numbers written out (computed once by hand/calculator).
	lit := []float64{1.0, 0.24438459943539834, 0.013042256043820465, 0.003952847075210474,
		0.00125, 0.00039528470752104737, 0.000125, 3.952847075210474e-05}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-15*want[i] || math.Abs(got[i]-lit[i]) > 1e-14*lit[i] {
			t.Errorf("inv_freq[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	// Without scaling: 1/theta^(2i/d).
	plain, err := ropeInvFreq(10000, 16, nil)
	if err != nil || plain[1] != 1/math.Pow(10000, 2.0/16) {
		t.Errorf("default inv_freq %v %v", plain, err)
	}
}

// writeTinyHand writes a 1-layer Llama with hidden 2, one head of dim 2,
// intermediate 1 and vocab 3, with weights simple enough to follow by hand.
func writeTinyHand(t *testing.T) string {
	dir := t.TempDir()
	conf := map[string]any{
		"architectures": []string{"LlamaForCausalLM"}, "model_type": "llama", "hidden_act": "silu",
		"hidden_size": 2, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
		"num_key_value_heads": 1, "vocab_size": 3, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
		"tie_word_embeddings": false, "rope_scaling": nil,
	}
	b, _ := json.Marshal(conf)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	id := []float32{1, 0, 0, 1}
	ts := []struct {
		name  string
		shape []int64
		v     []float32
	}{
		{"model.embed_tokens.weight", []int64{3, 2}, []float32{3, 4, 1, 0, 0, 2}},
		{"model.layers.0.self_attn.q_proj.weight", []int64{2, 2}, id},
		{"model.layers.0.self_attn.k_proj.weight", []int64{2, 2}, id},
		{"model.layers.0.self_attn.v_proj.weight", []int64{2, 2}, id},
		{"model.layers.0.self_attn.o_proj.weight", []int64{2, 2}, id},
		{"model.layers.0.mlp.gate_proj.weight", []int64{1, 2}, []float32{1, 1}},
		{"model.layers.0.mlp.up_proj.weight", []int64{1, 2}, []float32{1, 0}},
		{"model.layers.0.mlp.down_proj.weight", []int64{2, 1}, []float32{1, 0}},
		{"model.layers.0.input_layernorm.weight", []int64{2}, []float32{1, 1}},
		{"model.layers.0.post_attention_layernorm.weight", []int64{2}, []float32{1, 1}},
		{"model.norm.weight", []int64{2}, []float32{1, 1}},
		{"lm_head.weight", []int64{3, 2}, []float32{1, 0, 0, 1, 1, 1}},
	}
	infos := make([]safetensors.Info, len(ts))
	for i, x := range ts {
		infos[i] = safetensors.Info{Name: x.name, DType: "F32", Shape: x.shape}
	}
	w, err := safetensors.Create(filepath.Join(dir, "model.safetensors"), infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range ts {
		b := make([]byte, 4*len(x.v))
		for i, f := range x.v {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
		}
		if err := w.Write(x.name, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestHandComputed follows two tokens through writeTinyHand's model by hand.
// head_dim 2 gives one RoPE frequency, 1/10000^0 = 1: position p rotates
// (a, b) by p radians.
func TestHandComputed(t *testing.T) {
	m, err := Load(writeTinyHand(t))
	if err != nil {
		t.Fatal(err)
	}
	const eps = 1e-6
	norm := func(a, b float64) (float64, float64) {
		r := math.Sqrt((a*a+b*b)/2 + eps)
		return a / r, b / r
	}
	silu := func(x float64) float64 { return x / (1 + math.Exp(-x)) }
	// The MLP and the head, from the hidden state after attention.
	finish := func(h0, h1 float64) []float64 {
		m0, m1 := norm(h0, h1)
		h0 += silu(m0+m1) * m0 // gate (1,1), up (1,0), down (1,0)ᵀ
		f0, f1 := norm(h0, h1)
		return []float64{f0, f1, f0 + f1}
	}
	// Token 0 (embedding (3,4)) at position 0: a single key, so the
	// attention output is its value, the normed input.
	n00, n01 := norm(3, 4)
	want0 := finish(3+n00, 4+n01)
	// Token 2 (embedding (0,2)) at position 1: q and k are the normed input
	// rotated by 1 radian (k0 was not rotated: position 0).
	n10, n11 := norm(0, 2)
	q0, q1 := n10*math.Cos(1)-n11*math.Sin(1), n11*math.Cos(1)+n10*math.Sin(1)
	s0 := (q0*n00 + q1*n01) / math.Sqrt(2)
	s1 := (q0*q0 + q1*q1) / math.Sqrt(2)
	w0 := math.Exp(s0) / (math.Exp(s0) + math.Exp(s1))
	w1 := 1 - w0
	want1 := finish(0+w0*n00+w1*n10, 2+w0*n01+w1*n11)

	got, err := m.NewSession().Step([]int64{0, 2})
	if err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(got, [][]float64{want0, want1}); d > 1e-12 {
		t.Fatalf("logits %v, want %v %v (diff %g)", got, want0, want1, d)
	}
}

// TestCacheConsistency checks a prompt fed in one Step, one token at a time,
// and in uneven chunks gives the same logits, for each architecture.
func TestCacheConsistency(t *testing.T) {
	prompt := []int64{1, 17, 250, 3, 99, 42, 7, 300, 5, 64, 128}
	for _, arch := range archs {
		t.Run(arch, func(t *testing.T) {
			m := load(t, checkpoint.Tiny(arch))
			whole, err := m.NewSession().Step(prompt)
			if err != nil {
				t.Fatal(err)
			}
			if len(whole) != len(prompt) || len(whole[0]) != m.Vocab() || m.Vocab() != 320 {
				t.Fatalf("logits %dx%d", len(whole), len(whole[0]))
			}
			for _, chunks := range [][]int{{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, {4, 1, 6}, {10, 1}} {
				s := m.NewSession()
				var got [][]float64
				at := 0
				for _, n := range chunks {
					out, err := s.Step(prompt[at : at+n])
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, out...)
					at += n
				}
				if s.Len() != len(prompt) {
					t.Fatalf("cache holds %d positions", s.Len())
				}
				if d := maxDiff(whole, got); d > 1e-10 {
					t.Errorf("chunks %v: logits differ from one step by %g", chunks, d)
				}
			}
		})
	}
}

// TestLogitSpread checks random checkpoints give well spread logits and
// clear argmaxes: what lets the importer's float32 graphs agree with this
// reference on greedy tokens.
func TestLogitSpread(t *testing.T) {
	prompt := []int64{1, 17, 250, 3, 99, 42, 7, 300}
	for _, arch := range archs {
		m := load(t, checkpoint.Tiny(arch))
		out, err := m.NewSession().Step(prompt)
		if err != nil {
			t.Fatal(err)
		}
		minStd, minGap := math.Inf(1), math.Inf(1)
		for _, row := range out {
			var s, s2 float64
			top, second := math.Inf(-1), math.Inf(-1)
			for _, v := range row {
				s += v
				s2 += v * v
				if v > top {
					top, second = v, top
				} else if v > second {
					second = v
				}
			}
			n := float64(len(row))
			minStd = min(minStd, math.Sqrt(s2/n-(s/n)*(s/n)))
			minGap = min(minGap, top-second)
		}
		t.Logf("%s: smallest logit std %.2f, smallest top-2 gap %.4f", arch, minStd, minGap)
		if minStd < 1 || minGap < 1e-3 {
			t.Errorf("%s: logits not well spread: std %.3f, gap %.5f", arch, minStd, minGap)
		}
	}
}

// TestSlidingWindow checks Mistral's window on one layer: a query at
// position p sees keys at p-window+1..p only, so earlier tokens do not
// change its logits.
func TestSlidingWindow(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Mistral)
	cfg.Layers = 1
	cfg.SlidingWindow = 3
	m := load(t, cfg)
	a, _ := m.NewSession().Step([]int64{5, 6, 7, 8, 9})
	b, _ := m.NewSession().Step([]int64{100, 6, 7, 8, 9})
	for pos := range 5 {
		d := maxDiff(a[pos:pos+1], b[pos:pos+1])
		if pos >= 3 && d != 0 { // windows 1..3 and 2..4 exclude position 0
			t.Errorf("position %d sees position 0 through a window of 3 (diff %g)", pos, d)
		}
		if pos < 3 && d == 0 {
			t.Errorf("position %d does not see position 0", pos)
		}
	}
	// Without the window, position 4 sees position 0.
	cfg.SlidingWindow = 0
	m = load(t, cfg)
	a, _ = m.NewSession().Step([]int64{5, 6, 7, 8, 9})
	b, _ = m.NewSession().Step([]int64{100, 6, 7, 8, 9})
	if maxDiff(a[4:], b[4:]) == 0 {
		t.Error("no window, yet position 4 ignores position 0")
	}
}

func TestQwenSlidingLayers(t *testing.T) {
	dir := t.TempDir()
	write := func(extra string) (*params, error) {
		conf := `{"architectures":["Qwen2ForCausalLM"],"hidden_act":"silu","hidden_size":8,"intermediate_size":8,
			"num_hidden_layers":3,"num_attention_heads":2,"vocab_size":4,"rms_norm_eps":1e-6` + extra + `}`
		path := filepath.Join(dir, "config.json")
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		return readConfig(path)
	}
	for extra, want := range map[string]string{
		`,"sliding_window":4,"use_sliding_window":false,"max_window_layers":1`:                                                   "[0 0 0]",
		`,"sliding_window":4,"use_sliding_window":true,"max_window_layers":1`:                                                    "[0 4 4]",
		`,"sliding_window":4,"use_sliding_window":true,"layer_types":["sliding_attention","full_attention","sliding_attention"]`: "[4 0 4]",
		`,"sliding_window":4,"layer_types":["sliding_attention","full_attention","sliding_attention"]`:                           "[0 0 0]",
		`,"sliding_window":null,"use_sliding_window":true,"max_window_layers":0`:                                                 "[0 0 0]",
	} {
		p, err := write(extra)
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(p.window); got != want {
			t.Errorf("%s: windows %s, want %s", extra, got, want)
		}
	}
}

func TestRefusals(t *testing.T) {
	for name, c := range map[string]struct {
		mut  func(map[string]any)
		want string
	}{
		"yarn":   {func(m map[string]any) { m["rope_scaling"] = map[string]any{"rope_type": "yarn", "factor": 4.0} }, `"yarn" is not supported`},
		"arch":   {func(m map[string]any) { m["architectures"] = []string{"GPT2LMHeadModel"} }, "unsupported architecture"},
		"act":    {func(m map[string]any) { m["hidden_act"] = "gelu" }, "only silu"},
		"untied": {func(m map[string]any) { m["tie_word_embeddings"] = false }, `missing tensor "lm_head.weight"`},
		"bias": {func(m map[string]any) {
			m["architectures"] = []string{"LlamaForCausalLM"}
			m["attention_bias"] = true
		}, `missing tensor "model.layers.0.self_attn.o_proj.bias"`},
		"no bias":  {func(m map[string]any) { m["architectures"] = []string{"MistralForCausalLM"} }, `"model.layers.0.self_attn.k_proj.bias" is not used`},
		"head_dim": {func(m map[string]any) { m["head_dim"] = 8 }, "has shape"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := checkpoint.Write(dir, checkpoint.Tiny(checkpoint.Qwen2), nil, nil); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "config.json")
			b, _ := os.ReadFile(path)
			var conf map[string]any
			if err := json.Unmarshal(b, &conf); err != nil {
				t.Fatal(err)
			}
			c.mut(conf)
			b, _ = json.Marshal(conf)
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Load(dir)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Load: %v, want an error mentioning %s", err, c.want)
			}
		})
	}
	m := load(t, checkpoint.Tiny(checkpoint.Qwen2))
	if _, err := m.NewSession().Step([]int64{320}); err == nil {
		t.Error("token 320 of a 320-token vocabulary accepted")
	}
}

// TestSharded loads a sharded checkpoint to the same logits as a single file.
func TestSharded(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Qwen3)
	a, _ := load(t, cfg).NewSession().Step([]int64{1, 2, 3})
	cfg.Shards = 2
	b, _ := load(t, cfg).NewSession().Step([]int64{1, 2, 3})
	if maxDiff(a, b) != 0 {
		t.Error("sharded checkpoint gives other logits")
	}
}

func BenchmarkStepTiny(b *testing.B) {
	m := load(b, checkpoint.Tiny(checkpoint.Qwen3))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.NewSession().Step([]int64{1, 2, 3, 4, 5, 6, 7, 8}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestLlama32_1B runs the reference on Llama 3.2 1B's shapes when
// INFERMESH_REF_1B names a folder holding (or to hold) that checkpoint: a
// manual check of memory and speed at real size.
func TestLlama32_1B(t *testing.T) {
	dir := os.Getenv("INFERMESH_REF_1B")
	if dir == "" {
		t.Skip("set INFERMESH_REF_1B=folder to run Llama 3.2 1B's shapes")
	}
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		if err := checkpoint.Write(dir, checkpoint.Llama32_1B(), nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	m, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loaded in %v", time.Since(start))
	s := m.NewSession()
	start = time.Now()
	out, err := s.Step([]int64{128000, 9906, 11, 1917})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("4-token prompt in %v", time.Since(start))
	start = time.Now()
	if _, err := s.Step([]int64{argmax(out[3])}); err != nil {
		t.Fatal(err)
	}
	t.Logf("one decode step in %v", time.Since(start))
}

func argmax(v []float64) int64 {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return int64(best)
}

// TestParallelMul checks the row split of large matrices gives exactly the
// serial sums.
func TestParallelMul(t *testing.T) {
	const rows, cols = 1031, 1024 // rows × cols ≥ parallelMACs, rows not a multiple of the CPUs
	m := matrix{rows: rows, cols: cols, w: make([]float32, rows*cols)}
	for i := range m.w {
		m.w[i] = float32(math.Sin(float64(i)))
	}
	b := make([]float32, rows)
	for i := range b {
		b[i] = float32(i) / rows
	}
	xs := [][]float64{make([]float64, cols), make([]float64, cols)}
	for i := range cols {
		xs[0][i], xs[1][i] = math.Cos(float64(i)), float64(i%7)
	}
	got := m.mul(xs, b)
	for tk, x := range xs {
		for r := range rows {
			var acc float64
			for c := range cols {
				acc += float64(m.w[r*cols+c]) * x[c]
			}
			if acc += float64(b[r]); got[tk][r] != acc {
				t.Fatalf("row %d of input %d: %v, want %v", r, tk, got[tk][r], acc)
			}
		}
	}
}
