package hf_test

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
)

// bench1BEnv names the folder BenchmarkDecodeStepQuantized keeps its
// checkpoint of Llama 3.2 1B's shapes (2.5 GB, random bfloat16 weights) and
// its float32, q8 and q4 imports (about 6, 1.7 and 1.2 GB) in, written on
// the first run and reused after.
const bench1BEnv = "INFERMESH_BENCH_1B"

// BenchmarkDecodeStepQuantized measures a decode step of a model of Llama
// 3.2 1B's shapes imported as float32, q8 and q4 (block 32): after an
// 8-token prompt, 16 greedy steps per iteration, reported as ms/token of
// the steps alone; the parent logs the ratios. The spans run one session
// per block (2.5 GB of float32 blocks cannot be fused under protobuf's 2
// GiB), with onnxruntime's default threads; one precision is loaded at a
// time. Set INFERMESH_BENCH_1B=folder to run it; -benchtime 1x is enough.
func BenchmarkDecodeStepQuantized(b *testing.B) {
	dir := os.Getenv(bench1BEnv)
	if dir == "" {
		b.Skipf("set %s=folder to benchmark quantized decode steps of Llama 3.2 1B's shapes (12 GB of files)", bench1BEnv)
	}
	ckpt := filepath.Join(dir, "ckpt")
	if _, err := os.Stat(filepath.Join(ckpt, "config.json")); err != nil {
		b.Logf("writing %s", ckpt)
		if err := checkpoint.Write(ckpt, checkpoint.Llama32_1B(), tokenizerJSON, tokenizerConfigJSON); err != nil {
			b.Fatal(err)
		}
	}
	const prompt, steps = 8, 16
	msPerToken := map[string]float64{}
	for _, p := range []struct{ name, quant string }{{"f32", ""}, {"q8", "q8"}, {"q4", "q4"}} {
		b.Run(p.name, func(b *testing.B) {
			out := filepath.Join(dir, p.name)
			m, err := shards.OpenModel(out)
			if err != nil {
				start := time.Now()
				if m, err = hf.Import(ckpt, out, hf.Options{DType: "float32", Quantize: p.quant}); err != nil {
					b.Fatal(err)
				}
				b.Logf("imported %s in %s", p.name, time.Since(start).Round(time.Second))
			}
			rt, err := shards.OpenRuntime(shards.RuntimeConfig{SessionPerBlock: true})
			if err != nil {
				b.Skip(err)
			}
			span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
			if err != nil {
				b.Fatal(err)
			}
			defer func() {
				span.Close()
				runtime.GC()
			}()
			tokens := make([]int64, prompt)
			for i := range tokens {
				tokens[i] = int64(1000 + 37*i)
			}
			var decode time.Duration
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				sess := span.NewSession()
				toks, fed := append([]int64(nil), tokens...), 0
				for step := range steps + 1 {
					t0 := time.Now()
					outs, err := sess.Step(shards.StepInputs(m.Manifest.Decoder, toks, fed))
					if err != nil {
						b.Fatal(err)
					}
					if step > 0 {
						decode += time.Since(t0)
					}
					r := rows(b, outs["logits"])
					fed = len(toks)
					toks = append(toks, argmax(r[len(r)-1]))
				}
				sess.Close()
			}
			ms := float64(decode.Microseconds()) / 1e3 / float64(b.N*steps)
			msPerToken[p.name] = ms
			b.ReportMetric(ms, "ms/token")
			b.ReportMetric(float64(m.Manifest.TotalSize())/1e6, "MB-blocks")
		})
	}
	if f, ok := msPerToken["f32"]; ok && msPerToken["q8"] > 0 && msPerToken["q4"] > 0 {
		b.Logf("decode step: f32 %.1f ms, q8 %.1f ms (%.2fx of f32), q4 %.1f ms (%.2fx of f32)",
			f, msPerToken["q8"], msPerToken["q8"]/f, msPerToken["q4"], msPerToken["q4"]/f)
	}
}
