package node

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

func openRuntime(t testing.TB) *shards.Runtime {
	t.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

func buildGPT(t testing.TB, cfg build.GPTConfig) *shards.Model {
	t.Helper()
	m, err := build.GPT(cfg, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// checkFigures checks one positive, sane figure per block.
func checkFigures(t *testing.T, got []float64, n int) {
	t.Helper()
	if len(got) != n {
		t.Fatalf("%d figures, want %d: %v", len(got), n, got)
	}
	for i, us := range got {
		if !(us > 0) || us > 1e6 {
			t.Errorf("block %d: %g µs", i, us)
		}
	}
}

func TestMeasureBlocksGPT(t *testing.T) {
	rt := openRuntime(t)
	m := buildGPT(t, build.GPTConfig{Layers: 2, Dim: 64, Seed: 1}) // embed, 2 decoders, head
	for _, c := range []struct{ start, end int }{{0, 4}, {1, 3}, {3, 4}, {2, 3}} {
		t0 := time.Now()
		got, err := MeasureBlocks(context.Background(), rt, m, c.start, c.end, 3)
		if err != nil {
			t.Fatalf("[%d,%d): %v", c.start, c.end, err)
		}
		t.Logf("[%d,%d): %.1f µs in %v", c.start, c.end, got, time.Since(t0))
		checkFigures(t, got, c.end-c.start)
	}
}

func TestMeasureBlocksMLP(t *testing.T) {
	rt := openRuntime(t)
	m, err := build.MLP(build.MLPConfig{Layers: 3, Dim: 64, Seed: 1}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ start, end int }{{0, 3}, {1, 3}, {2, 3}} {
		got, err := MeasureBlocks(context.Background(), rt, m, c.start, c.end, 5)
		if err != nil {
			t.Fatalf("[%d,%d): %v", c.start, c.end, err)
		}
		t.Logf("[%d,%d): %.1f µs", c.start, c.end, got)
		checkFigures(t, got, c.end-c.start)
	}
}

func TestMeasureBlocksShortContext(t *testing.T) {
	rt := openRuntime(t)
	// 6 positions: the prompt shrinks to 6 - (1 warm-up + 3 rounds) = 2
	// tokens; 6 rounds cannot fit at all.
	m := buildGPT(t, build.GPTConfig{Layers: 1, Dim: 32, Heads: 2, Context: 6, Seed: 1})
	got, err := MeasureBlocks(context.Background(), rt, m, 0, 3, 3)
	if err != nil {
		t.Fatal(err)
	}
	checkFigures(t, got, 3)
	if _, err := MeasureBlocks(context.Background(), rt, m, 0, 3, 6); err == nil {
		t.Error("6 decode steps in a context of 6: no error")
	}
}

func TestMeasureBlocksBadArguments(t *testing.T) {
	rt := openRuntime(t)
	m := buildGPT(t, build.GPTConfig{Layers: 1, Dim: 32, Heads: 2, Seed: 1}) // 3 blocks
	for _, c := range []struct{ start, end, rounds int }{
		{-1, 2, 1}, {0, 4, 1}, {2, 2, 1}, {2, 1, 1}, {3, 4, 1}, {0, 3, 0}, {0, 3, -1},
	} {
		if got, err := MeasureBlocks(context.Background(), rt, m, c.start, c.end, c.rounds); err == nil {
			t.Errorf("[%d,%d) %d rounds: %v, no error", c.start, c.end, c.rounds, got)
		}
	}
	if _, err := MeasureBlocks(context.Background(), rt, nil, 0, 1, 1); err == nil {
		t.Error("nil model: no error")
	}
}

func TestMeasureBlocksCancelled(t *testing.T) {
	rt := openRuntime(t)
	m := buildGPT(t, build.GPTConfig{Layers: 2, Dim: 32, Heads: 2, Seed: 1})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := MeasureBlocks(ctx, rt, m, 0, 4, 3); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: %v, want context.Canceled", err)
	}
	// A deadline that passes while it runs: it stops with that error, not
	// after measuring everything.
	ctx, cancel = context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	time.Sleep(time.Millisecond)
	if _, err := MeasureBlocks(ctx, rt, m, 0, 4, 3); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("expired context: %v, want context.DeadlineExceeded", err)
	}
}

// TestMeasureBlocksGrowsWithDim compares a decoder block of a dim-512 GPT
// with one of a dim-64 GPT: 64 times the weights must take longer. The gap
// is wide enough (well over 5x here) not to flake under load.
func TestMeasureBlocksGrowsWithDim(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a dim-512 model")
	}
	rt := openRuntime(t)
	small := buildGPT(t, build.GPTConfig{Layers: 1, Dim: 64, Seed: 1})
	big := buildGPT(t, build.GPTConfig{Layers: 1, Dim: 512, Seed: 1})
	s, err := MeasureBlocks(context.Background(), rt, small, 1, 2, 5)
	if err != nil {
		t.Fatal(err)
	}
	b, err := MeasureBlocks(context.Background(), rt, big, 1, 2, 5)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("decoder block: dim 64 %.1f µs, dim 512 %.1f µs", s[0], b[0])
	if !(b[0] > s[0]) {
		t.Errorf("dim-512 decoder block %.1f µs is not slower than dim-64 %.1f µs", b[0], s[0])
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []time.Duration
		want time.Duration
	}{
		{nil, 0},
		{[]time.Duration{5}, 5},
		{[]time.Duration{9, 1, 5}, 5},
		{[]time.Duration{4, 1, 3, 2}, 2}, // (2+3)/2 truncated
		{[]time.Duration{100, 1, 2, 3, 1000}, 3},
	} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// BenchmarkMeasureBlocks times what a node spends at start-up measuring a
// whole 8-layer, dim-256 GPT (10 blocks) with 5 rounds, and reports the
// figures' sum (the decode step of the whole chain, hand-offs excluded).
func BenchmarkMeasureBlocks(b *testing.B) {
	rt := openRuntime(b)
	m := buildGPT(b, build.GPTConfig{Layers: 8, Dim: 256, Seed: 1})
	n := len(m.Manifest.Blocks)
	var sum float64
	for b.Loop() {
		got, err := MeasureBlocks(context.Background(), rt, m, 0, n, 5)
		if err != nil {
			b.Fatal(err)
		}
		sum = 0
		for _, us := range got {
			sum += us
		}
	}
	b.ReportMetric(sum, "µs-sum")
}
