package split_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
	"github.com/infermesh/infermesh/shards/internal/testmodels"
	"github.com/infermesh/infermesh/shards/split"
)

// checkCuts checks that every cut carries typed tensors and that the
// report agrees with the manifest's view of what crosses each cut.
func checkCuts(t *testing.T, m *shards.Model, rep *split.Report) {
	t.Helper()
	for i, c := range rep.Cuts {
		if len(c.Tensors) == 0 {
			t.Errorf("cut %d carries nothing", i)
		}
		var fromManifest []string
		for _, ts := range m.Manifest.Crossing(i) {
			fromManifest = append(fromManifest, ts.Name)
		}
		slices.Sort(fromManifest)
		if got := cutNames(rep)[i]; !slices.Equal(got, fromManifest) {
			t.Errorf("cut %d: report %v, manifest %v", i, got, fromManifest)
		}
		for _, ts := range c.Tensors {
			if !ts.DType.Valid() || ts.Bytes <= 0 {
				t.Errorf("cut %d: %s is %v%v, %d bytes", i, ts.Name, ts.DType, ts.Shape, ts.Bytes)
			}
		}
	}
}

func TestSplitOCR(t *testing.T) {
	rt := runtime(t)
	for _, tc := range []struct {
		file   string
		blocks int
		other  []int64 // an input shape other than the sample's
	}{
		{testmodels.OCRDet, 3, []int64{2, 3, 96, 128}},
		{testmodels.OCRDet, 5, []int64{1, 3, 128, 64}},
		{testmodels.OCRRec, 3, []int64{2, 3, 48, 192}},
		{testmodels.OCRRec, 4, []int64{1, 3, 48, 320}},
	} {
		t.Run(fmt.Sprintf("%s/%d", filepath.Base(tc.file), tc.blocks), func(t *testing.T) {
			data := testmodels.NPM(t, testmodels.OCRPackage, testmodels.OCRVersion, tc.file)
			m, rep := splitOK(t, data, split.Options{Blocks: tc.blocks, Verify: true, Runtime: rt})
			if len(m.Manifest.Blocks) != tc.blocks || !rep.Verified || rep.MaxAbsDiff > split.DefaultTolerance {
				t.Fatalf("%d blocks, verified %v, diff %g", len(m.Manifest.Blocks), rep.Verified, rep.MaxAbsDiff)
			}
			checkCuts(t, m, rep)
			// Symbolic dimensions: the blocks run at another batch and size.
			if d := hopByHop(t, rt, m, shards.Tensors{"x": randomFloats(tc.other, 5)}); d > split.DefaultTolerance {
				t.Errorf("at %v the blocks differ from the whole by %g", tc.other, d)
			}
			whole, err := os.ReadFile(filepath.Join(m.Dir, shards.WholeFile))
			if err != nil || !slices.Equal(whole, data) {
				t.Errorf("full.onnx is not the source model (%v)", err)
			}
		})
	}
}

func TestSplitOCRAt(t *testing.T) {
	data := testmodels.NPM(t, testmodels.OCRPackage, testmodels.OCRVersion, testmodels.OCRRec)
	at := []string{"p2o.Mul.127", "p2o.AveragePool.1"}
	m, rep := splitOK(t, data, split.Options{At: at, Verify: true})
	if len(m.Manifest.Blocks) != 3 {
		t.Fatalf("%d blocks, want 3", len(m.Manifest.Blocks))
	}
	checkCuts(t, m, rep)
	for i, name := range at {
		if !slices.Contains(cutNames(rep)[i], name) {
			t.Errorf("cut %d carries %v, not %s", i, cutNames(rep)[i], name)
		}
	}
	if got := cutNames(rep)[0]; !slices.Equal(got, at[:1]) {
		t.Errorf("cut 0 carries %v, want only %s", got, at[0])
	}
}

func TestSplitShuffledOCR(t *testing.T) {
	data := testmodels.NPM(t, testmodels.OCRPackage, testmodels.OCRVersion, testmodels.OCRDet)
	_, want := splitOK(t, data, split.Options{Blocks: 3})
	_, got := splitOK(t, shuffle(t, data, 42), split.Options{Blocks: 3, Verify: true})
	if !slices.EqualFunc(cutNames(got), cutNames(want), slices.Equal) {
		t.Errorf("shuffled cuts %v, in order %v", cutNames(got), cutNames(want))
	}
}

// vadOptions are Silero VAD's sample inputs: 512 samples at 16 kHz, and
// names for the dimensions its file leaves unnamed.
func vadOptions() split.Options {
	return split.Options{
		Verify:   true,
		Dims:     map[string][]shards.Dim{"input": {{Param: "batch"}, {Param: "samples"}}, "state": {{Size: 2}, {Param: "batch"}, {Size: 128}}},
		DimSizes: map[string]int64{"samples": 512},
		Inputs:   shards.Tensors{"sr": protocol.NewTensor[int64](nil, []int64{16000})},
	}
}

func TestSplitSileroVAD(t *testing.T) {
	data := testmodels.NPM(t, testmodels.VADPackage, testmodels.VADVersion, testmodels.VADSilero)
	rt := runtime(t)
	t.Run("outer names", func(t *testing.T) {
		// The If node's only input is the condition; its branches read
		// input and state, which therefore cross the cut.
		opts := vadOptions()
		opts.At = []string{"Equal_0_C"}
		m, rep := splitOK(t, data, opts)
		if got := cutNames(rep)[0]; !slices.Equal(got, []string{"Equal_0_C", "input", "state"}) {
			t.Errorf("cut carries %v", got)
		}
		checkCuts(t, m, rep)
		if c := rep.Cuts[0].Tensors; c[1].Shape[1].Param != "batch" {
			t.Errorf("state's dimension is not named: %v", c[1].Shape)
		}
	})
	t.Run("state", func(t *testing.T) {
		opts := vadOptions()
		opts.Blocks, opts.State, opts.Runtime = 2, []string{"state=stateN"}, rt
		m, rep := splitOK(t, data, opts)
		if len(m.Manifest.Blocks) != 2 || !rep.Verified {
			t.Fatalf("%d blocks, verified %v", len(m.Manifest.Blocks), rep.Verified)
		}
		var pairs []shards.StatePair
		for _, b := range m.Manifest.Blocks {
			pairs = append(pairs, b.State...)
		}
		if !slices.Equal(pairs, []shards.StatePair{{Input: "state", Output: "stateN"}}) {
			t.Errorf("state pairs %v", pairs)
		}
		for _, in := range m.Manifest.Inputs {
			if in.Name == "state" {
				t.Errorf("state is a model input")
			}
		}
		// A stream of frames: the state flows from step to step inside the
		// block that holds it.
		frames := []*protocol.Tensor{randomFloats([]int64{1, 512}, 1), randomFloats([]int64{1, 512}, 2), randomFloats([]int64{1, 512}, 3)}
		if d := sessionsAgree(t, rt, m, frames); d > split.DefaultTolerance {
			t.Errorf("streamed blocks differ from the whole by %g", d)
		}
	})
}

// sessionsAgree streams frames through the blocks, one session per block,
// and through full.onnx, and returns the largest difference.
func sessionsAgree(t *testing.T, rt *shards.Runtime, m *shards.Model, frames []*protocol.Tensor) float64 {
	t.Helper()
	c := openChain(t, rt, m)
	worst := 0.0
	for _, f := range frames {
		in := shards.Tensors{"input": f, "sr": protocol.NewTensor[int64](nil, []int64{16000})}
		want, got := c.step(t, in)
		d, err := protocol.MaxAbsDiff(want["output"], got["output"])
		if err != nil {
			t.Fatal(err)
		}
		worst = max(worst, d)
	}
	return worst
}

func TestSplitBuiltMLP(t *testing.T) {
	dir := t.TempDir()
	if _, err := build.MLP(build.MLPConfig{Layers: 6, Dim: 32, Seed: 3}, dir); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, shards.WholeFile))
	if err != nil {
		t.Fatal(err)
	}
	rt := runtime(t)
	for _, n := range []int{2, 3, 4, 6} {
		m, rep := splitOK(t, data, split.Options{Blocks: n, Verify: true, Runtime: rt})
		checkCuts(t, m, rep)
		for _, c := range rep.Cuts {
			if len(c.Tensors) != 1 || c.Tensors[0].Shape[0].Param != "batch" || c.Tensors[0].Shape[1].Size != 32 {
				t.Errorf("%d blocks: cut carries %v, want one float32[batch 32]", n, c.Tensors)
			}
		}
		if d := hopByHop(t, rt, m, shards.Tensors{"x": randomFloats([]int64{5, 32}, 1)}); d > 1e-5 {
			t.Errorf("%d blocks at batch 5 differ by %g", n, d)
		}
	}
}

func TestSplitBuiltGPT(t *testing.T) {
	const layers = 4
	dir := t.TempDir()
	src, err := build.GPT(build.GPTConfig{Layers: layers, Dim: 64, Heads: 2, Context: 64, Seed: 5}, dir)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, shards.WholeFile))
	if err != nil {
		t.Fatal(err)
	}
	var state []string
	for i := range layers {
		state = append(state, fmt.Sprintf("past_key_%d=present_key_%d", i, i), fmt.Sprintf("past_value_%d=present_value_%d", i, i))
	}
	rt := runtime(t)
	for _, n := range []int{2, 3, 5} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			m, rep := splitOK(t, data, split.Options{Blocks: n, State: state, Verify: true, Runtime: rt,
				DimSizes: map[string]int64{"batch": 1, "seq": 4, "past": 0, "total": 4}})
			checkCuts(t, m, rep)
			for _, c := range rep.Cuts {
				for _, ts := range c.Tensors {
					if ts.Name != "attention_mask" && fmt.Sprint(ts.Shape) != "[batch seq 64]" {
						t.Errorf("cut carries %s%v, want [batch seq 64] or the mask", ts.Name, ts.Shape)
					}
				}
			}
			pairs := 0
			for _, b := range m.Manifest.Blocks {
				pairs += len(b.State)
			}
			if pairs != 2*layers {
				t.Errorf("%d state pairs, want %d", pairs, 2*layers)
			}
			// Decode: a prompt of 5 tokens, then 3 single tokens, the KV cache
			// growing inside the blocks that hold it.
			if d := decodeAgrees(t, rt, m, src.Manifest.Inputs); d > 1e-4 {
				t.Errorf("decoding through the blocks differs from full.onnx by %g", d)
			}
		})
	}
}

// decodeAgrees decodes through the blocks (a session each) and through
// full.onnx, feeding the same tokens, and returns the largest difference in
// logits.
func decodeAgrees(t *testing.T, rt *shards.Runtime, m *shards.Model, _ []shards.TensorSpec) float64 {
	t.Helper()
	c := openChain(t, rt, m)
	worst, pos := 0.0, int64(0)
	for _, seq := range []int64{5, 1, 1, 1} {
		ids, positions := make([]int64, seq), make([]int64, seq)
		for j := range seq {
			ids[j], positions[j] = (pos*7+j*13)%256, pos+j
		}
		pos += seq
		mask := make([]int64, pos)
		for j := range mask {
			mask[j] = 1
		}
		in := shards.Tensors{
			"input_ids":      protocol.NewTensor([]int64{1, seq}, ids),
			"position_ids":   protocol.NewTensor([]int64{1, seq}, positions),
			"attention_mask": protocol.NewTensor([]int64{1, pos}, mask),
		}
		want, got := c.step(t, in)
		d, err := protocol.MaxAbsDiff(want["logits"], got["logits"])
		if err != nil {
			t.Fatal(err)
		}
		worst = max(worst, d)
	}
	return worst
}

// hopChain is a model run two ways: one session per block, each hop handed
// only what the previous hop sent on (as peers would), and one session on
// full.onnx.
type hopChain struct {
	whole shards.Session
	hops  []shards.Session
}

func openChain(t *testing.T, rt *shards.Runtime, m *shards.Model) *hopChain {
	t.Helper()
	open := func(load func() (*shards.Span, error)) shards.Session {
		sp, err := load()
		if err != nil {
			t.Fatal(err)
		}
		s := sp.NewSession()
		t.Cleanup(func() { s.Close(); sp.Close() })
		return s
	}
	c := &hopChain{whole: open(func() (*shards.Span, error) { return rt.LoadWhole(m) })}
	for i := range m.Manifest.Blocks {
		c.hops = append(c.hops, open(func() (*shards.Span, error) { return rt.LoadSpan(m, i, i+1) }))
	}
	return c
}

// step runs one step both ways and returns full.onnx's outputs and the last
// hop's.
func (c *hopChain) step(t *testing.T, in shards.Tensors) (want, got shards.Tensors) {
	t.Helper()
	want, err := c.whole.Step(in)
	if err != nil {
		t.Fatal(err)
	}
	got = in
	for i, h := range c.hops {
		if got, err = h.Step(got); err != nil {
			t.Fatalf("block %d: %v", i, err)
		}
	}
	return want, got
}
