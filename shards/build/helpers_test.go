package build_test

import (
	"math/rand/v2"
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

func openRuntime(tb testing.TB) *shards.Runtime {
	tb.Helper()
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{})
	if err != nil {
		tb.Fatal(err)
	}
	return rt
}

func loadSpan(tb testing.TB, rt *shards.Runtime, m *shards.Model, start, end int) *shards.Span {
	tb.Helper()
	s, err := rt.LoadSpan(m, start, end)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func loadWhole(tb testing.TB, rt *shards.Runtime, m *shards.Model) *shards.Span {
	tb.Helper()
	s, err := rt.LoadWhole(m)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func newSession(tb testing.TB, r shards.Runner) shards.Session {
	tb.Helper()
	s := r.NewSession()
	tb.Cleanup(func() { s.Close() })
	return s
}

func run(tb testing.TB, r shards.Runner, in shards.Tensors) shards.Tensors {
	tb.Helper()
	out, err := r.Run(in)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// chainBlocks runs every block of m as its own one-block span, feeding each
// the tensors it reads from the model inputs and earlier blocks' outputs —
// the way a chain of peers would. It returns the model outputs.
func chainBlocks(tb testing.TB, rt *shards.Runtime, m *shards.Model, in shards.Tensors) shards.Tensors {
	tb.Helper()
	pool := shards.Tensors{}
	for k, v := range in {
		pool[k] = v
	}
	for i := range m.Manifest.Blocks {
		span := loadSpan(tb, rt, m, i, i+1)
		send := shards.Tensors{}
		for _, t := range span.Inputs() {
			send[t.Name] = pool[t.Name]
		}
		for k, v := range run(tb, span, send) {
			pool[k] = v
		}
	}
	out := shards.Tensors{}
	for _, t := range m.Manifest.Outputs {
		out[t.Name] = pool[t.Name]
	}
	return out
}

// requireClose fails unless every tensor named in want is in got, of the
// same shape, within tol.
func requireClose(tb testing.TB, what string, got, want shards.Tensors, tol float64) {
	tb.Helper()
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			tb.Fatalf("%s: no output %q", what, name)
		}
		d, err := protocol.MaxAbsDiff(g, w)
		if err != nil {
			tb.Fatalf("%s: %s: %v", what, name, err)
		}
		if d > tol {
			tb.Fatalf("%s: %s differs by %g (tolerance %g)", what, name, d, tol)
		}
		tb.Logf("%s: %s %v max abs diff %.3g", what, name, g.Shape, d)
	}
}

func randomFloats(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return v
}

func names(ts []shards.TensorSpec) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Name
	}
	return out
}
