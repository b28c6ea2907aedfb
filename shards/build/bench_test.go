package build_test

import (
	"fmt"
	"testing"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// BenchmarkDecodeStep times one KV-cached decode step (a 32-token past) of
// an 8-layer GPT through its 10 blocks, fused and one session per block,
// against full.onnx. `infermesh shard bench` gives the same figures for a
// model on disk, interleaved to resist noise; see BENCHMARKS.md.
func BenchmarkDecodeStep(b *testing.B) {
	for _, dim := range []int{256, 512} {
		m, err := build.GPT(build.GPTConfig{Layers: 8, Dim: dim, Seed: 1}, b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		fused, err := shards.OpenRuntime(shards.RuntimeConfig{})
		if err != nil {
			b.Fatal(err)
		}
		perBlock, err := shards.OpenRuntime(shards.RuntimeConfig{SessionPerBlock: true})
		if err != nil {
			b.Fatal(err)
		}
		n := len(m.Manifest.Blocks)
		for _, c := range []struct {
			name string
			load func() (*shards.Span, error)
		}{
			{"fused", func() (*shards.Span, error) { return fused.LoadSpan(m, 0, n) }},
			{"per-block", func() (*shards.Span, error) { return perBlock.LoadSpan(m, 0, n) }},
			{"whole", func() (*shards.Span, error) { return fused.LoadWhole(m) }},
		} {
			b.Run(fmt.Sprintf("%s/dim=%d", c.name, dim), func(b *testing.B) {
				span, err := c.load()
				if err != nil {
					b.Fatal(err)
				}
				defer span.Close()
				dec := m.Manifest.Decoder
				tokens := make([]int64, 33)
				for i := range tokens {
					tokens[i] = int64('a' + i%26)
				}
				b.ReportAllocs()
				for b.Loop() {
					b.StopTimer()
					sess := span.NewSession()
					if _, err := sess.Step(shards.StepInputs(dec, tokens[:32], 0)); err != nil {
						b.Fatal(err)
					}
					in := shards.StepInputs(dec, tokens, 32)
					b.StartTimer()
					if _, err := sess.Step(in); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					sess.Close()
					b.StartTimer()
				}
			})
		}
	}
}

// BenchmarkLoadBlock times loading one decoder block of a dim-512 GPT:
// reading it from the store, verifying its CID, parsing, and creating its
// onnxruntime session.
func BenchmarkLoadBlock(b *testing.B) {
	m, err := build.GPT(build.GPTConfig{Layers: 1, Dim: 512, Seed: 1}, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(m.Manifest.Blocks[1].Size)
	for b.Loop() {
		span, err := rt.LoadSpan(m, 1, 2)
		if err != nil {
			b.Fatal(err)
		}
		span.Close()
	}
}
