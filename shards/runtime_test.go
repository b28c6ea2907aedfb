package shards_test

import (
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/internal/onnxtest"
)

func TestSpanRunAndSession(t *testing.T) {
	rt := openRuntime(t)
	model := tinyModel(t, t.TempDir())
	span, err := rt.LoadSpan(model, 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()

	x := protocol.NewTensor([]int64{1, 2}, []float32{3, 4})
	out, err := span.Run(shards.Tensors{"x": x})
	if err != nil {
		t.Fatal(err)
	}
	z, _ := protocol.View[float32](out["z"])
	if !slices.Equal(z, []float32{8, 6}) {
		t.Fatalf("z = %v, want [8 6]", z)
	}

	if rows, _ := protocol.View[int64](out["rows"]); !slices.Equal(rows, []int64{1, 2}) {
		t.Fatalf("a single pass starts from empty state: rows = %v, want [1 2]", rows)
	}

	// A session carries s_out into s_in: step i sees i+1 rows of state.
	sess := span.NewSession()
	defer sess.Close()
	for i := range 3 {
		out, err := sess.Step(shards.Tensors{"x": x})
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if rows, _ := protocol.View[int64](out["rows"]); !slices.Equal(rows, []int64{int64(i + 1), 2}) {
			t.Fatalf("step %d: rows = %v", i, rows)
		}
	}
	if sess.Steps() != 3 {
		t.Fatalf("Steps() = %d", sess.Steps())
	}
	// A failed step leaves the session's state as it was.
	if _, err := sess.Step(shards.Tensors{"x": protocol.NewTensor([]int64{1, 3}, []float32{1, 2, 3})}); err == nil {
		t.Fatal("bad step accepted")
	}
	out, err = sess.Step(shards.Tensors{"x": x})
	if err != nil {
		t.Fatal(err)
	}
	if rows, _ := protocol.View[int64](out["rows"]); !slices.Equal(rows, []int64{4, 2}) {
		t.Fatalf("after a failed step: rows = %v, want [4 2]", rows)
	}
}

func TestSpanSplitEqualsWhole(t *testing.T) {
	rt := openRuntime(t)
	model := tinyModel(t, t.TempDir())
	first, err := rt.LoadSpan(model, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	second, err := rt.LoadSpan(model, 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if got := names(first.Outputs()); !slices.Equal(got, []string{"y"}) {
		t.Fatalf("first span outputs %v, want [y]", got)
	}
	x := protocol.NewTensor([]int64{2, 2}, []float32{1, 2, 3, 4})
	mid, err := first.Run(shards.Tensors{"x": x})
	if err != nil {
		t.Fatal(err)
	}
	out, err := second.Run(mid)
	if err != nil {
		t.Fatal(err)
	}
	z, _ := protocol.View[float32](out["z"])
	if !slices.Equal(z, []float32{4, 2, 8, 6}) {
		t.Fatalf("z = %v", z)
	}
}

func TestSpanRejectsBadInputs(t *testing.T) {
	rt := openRuntime(t)
	span, err := rt.LoadSpan(tinyModel(t, t.TempDir()), 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()
	for name, in := range map[string]shards.Tensors{
		"missing":     {},
		"wrong dtype": {"x": protocol.NewTensor([]int64{1, 2}, []int64{1, 2})},
		"wrong rank":  {"x": protocol.NewTensor([]int64{2}, []float32{1, 2})},
		"wrong dim":   {"x": protocol.NewTensor([]int64{1, 3}, []float32{1, 2, 3})},
		"short data":  {"x": {DType: protocol.Float32, Shape: []int64{1, 2}, Data: make([]byte, 7)}},
	} {
		if _, err := span.Run(in); err == nil {
			t.Errorf("%s: no error", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func names(ts []shards.TensorSpec) []string {
	var out []string
	for _, t := range ts {
		out = append(out, t.Name)
	}
	return out
}

// Fused (one session) and per-block (one session each) runs of a span give
// the same results; blocks with clashing names fall back to per-block.
func TestFusedEqualsPerBlock(t *testing.T) {
	fused := openRuntime(t)
	perBlock, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1, SessionPerBlock: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		model        func(testing.TB, string) *shards.Model
		fusedSession int
	}{
		{"distinct names", tinyModel, 1},
		{"clashing names", clashModel, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.model(t, t.TempDir())
			a, err := fused.LoadSpan(m, 0, 2)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			b, err := perBlock.LoadSpan(m, 0, 2)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			if a.Sessions() != tc.fusedSession || b.Sessions() != 2 {
				t.Fatalf("sessions: fused %d (want %d), per-block %d (want 2)", a.Sessions(), tc.fusedSession, b.Sessions())
			}
			sa, sb := a.NewSession(), b.NewSession()
			defer sa.Close()
			defer sb.Close()
			x := protocol.NewTensor([]int64{2, 2}, []float32{1, 2, 3, 4})
			for step := range 3 {
				oa, err := sa.Step(shards.Tensors{"x": x})
				if err != nil {
					t.Fatal(err)
				}
				ob, err := sb.Step(shards.Tensors{"x": x})
				if err != nil {
					t.Fatal(err)
				}
				if len(oa) != len(ob) {
					t.Fatalf("outputs %v vs %v", oa, ob)
				}
				for name, ta := range oa {
					if d, err := protocol.MaxAbsDiff(ta, ob[name]); err != nil || d != 0 {
						t.Fatalf("step %d output %s differs by %v (%v)", step, name, d, err)
					}
				}
			}
		})
	}
}

// A missing library is one error line that says how to fix it.
func TestFindLibraryExplains(t *testing.T) {
	_, err := shards.FindLibrary("/nonexistent/libonnxruntime.so")
	if !errors.Is(err, shards.ErrNoRuntime) {
		t.Fatalf("err = %v, want ErrNoRuntime", err)
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") || !strings.Contains(msg, "make ort") || !strings.Contains(msg, "ORT_LIB") {
		t.Fatalf("error does not say how to fix it in one line: %q", msg)
	}
	t.Setenv("ORT_LIB", "/also/missing.so")
	if _, err := shards.FindLibrary(""); err == nil || !strings.Contains(err.Error(), "/also/missing.so") {
		t.Fatalf("ORT_LIB not honoured: %v", err)
	}
}

// onnxruntime_go copies onnxruntime-allocated float16 outputs short; the
// runtime pre-allocates them from the bound symbolic dimensions.
func TestFloat16Output(t *testing.T) {
	rt := openRuntime(t)
	g := (&tinyGraph{}).in("x", "batch", 3).
		node("Cast", []string{"x"}, []string{"h"}, onnxtest.IntAttr("to", int64(protocol.Float16)))
	g.g.Output = append(g.g.Output, onnxtest.ValueInfo("h", protocol.Float16, "batch", 3))
	data := g.bytes(t)
	span, err := rt.LoadONNX(data)
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()
	x := protocol.NewTensor([]int64{2, 3}, []float32{1, -2, 0.5, 3, 65504, 0})
	out, err := span.Run(shards.Tensors{"x": x})
	if err != nil {
		t.Fatal(err)
	}
	h := out["h"]
	if h.DType != protocol.Float16 || !slices.Equal(h.Shape, []int64{2, 3}) {
		t.Fatalf("h = %v", h)
	}
	got, _ := h.Float64s()
	if !slices.Equal(got, []float64{1, -2, 0.5, 3, 65504, 0}) {
		t.Fatalf("h = %v", got)
	}
}

// Asking for CUDA from a library without its provider (the npm build) runs
// on CPU after one warning.
func TestCUDAFallsBackToCPU(t *testing.T) {
	var logs strings.Builder
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{Provider: "cuda", IntraOpThreads: 1,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	m := tinyModel(t, t.TempDir())
	for range 3 {
		span, err := rt.LoadSpan(m, 0, 2)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := span.Run(shards.Tensors{"x": protocol.NewTensor([]int64{1, 2}, []float32{1, 2})}); err != nil {
			t.Fatal(err)
		}
		span.Close()
	}
	if rt.Provider() == "cuda" {
		t.Skip("this onnxruntime has a working CUDA provider; nothing to fall back from")
	}
	if n := strings.Count(logs.String(), "CUDA execution provider unavailable"); n != 1 {
		t.Fatalf("%d warnings, want exactly 1:\n%s", n, logs.String())
	}
	if _, err := shards.OpenRuntime(shards.RuntimeConfig{Provider: "tpu"}); err == nil {
		t.Fatal("unknown provider accepted")
	}
}

// Scalar outputs are pre-allocated too: onnxruntime_go cannot wrap a rank-0
// output that onnxruntime allocated.
func TestScalarOutput(t *testing.T) {
	rt := openRuntime(t)
	g := (&tinyGraph{}).in("x", "batch", 3).
		node("ReduceSum", []string{"x"}, []string{"s"}, onnxtest.IntAttr("keepdims", 0))
	g.g.Output = append(g.g.Output, onnxtest.ValueInfo("s", protocol.Float32))
	span, err := rt.LoadONNX(g.bytes(t))
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()
	out, err := span.Run(shards.Tensors{"x": protocol.NewTensor([]int64{2, 3}, []float32{1, 2, 3, 4, 5, 6})})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := out["s"].Float64s(); len(out["s"].Shape) != 0 || !slices.Equal(got, []float64{21}) {
		t.Fatalf("s = %v %v", out["s"], got)
	}
}
