package node

import (
	"context"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// testMesh is a requester (serving nothing) and servers of spans of a built
// GPT, all on loopback QUIC.
type testMesh struct {
	model     *shards.Model
	requester *Node
	servers   []*Node
}

func startTestMesh(t *testing.T, spans ...string) *testMesh {
	t.Helper()
	m, err := build.GPT(build.GPTConfig{Layers: 8, Dim: 64, Heads: 2, Context: 128, Seed: 5}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	return startMeshOf(t, m, spans...)
}

// startMeshOf starts a requester serving nothing and one server per span
// of m, and waits until the requester sees every block covered.
func startMeshOf(t *testing.T, m *shards.Model, spans ...string) *testMesh {
	t.Helper()
	tm := &testMesh{model: m, requester: startTestNode(t, nil)}
	t.Cleanup(func() { closeAll(append([]*Node{tm.requester}, tm.servers...)) })
	boot := []string{tm.requester.Status().Addrs[0]}
	for _, s := range spans {
		tm.servers = append(tm.servers, startTestNode(t, boot, m.Dir+":"+s))
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		cov, err := tm.requester.Coverage(context.Background(), m.ID.String())
		if err == nil && cov.Complete && len(cov.Peers) == len(spans) {
			return tm
		}
		if time.Now().After(deadline) {
			t.Fatalf("coverage never complete: %+v %v", cov, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// localSpan loads every block of m in this process, for reference runs.
func localSpan(t testing.TB, m *shards.Model) *shards.Span {
	t.Helper()
	key := localSpanKey{t, m}
	if sp, ok := localSpans.Load(key); ok {
		return sp.(*shards.Span)
	}
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	localSpans.Store(key, span)
	t.Cleanup(func() {
		localSpans.Delete(key)
		span.Close()
	})
	return span
}

// localSpans keeps, for the length of a test, the whole-model span each
// local run of a model loads: loading it takes longer than a generation.
var localSpans sync.Map // localSpanKey -> *shards.Span

type localSpanKey struct {
	t testing.TB
	m *shards.Model
}

// localGenerate decodes n tokens greedily through the blocks in this
// process (a built model has no eos token to stop at).
func localGenerate(t *testing.T, m *shards.Model, prompt []int64, n int) []int64 {
	t.Helper()
	out, _ := localGenerateUntil(t, m, prompt, n)
	return out
}

// Acceptance 1 of issue 4: the model split across 3 of 4 nodes; single
// passes and 64-token generations through the mesh equal the local run.
func TestMeshInferAndGenerateEqualLocal(t *testing.T) {
	tm := startTestMesh(t, "0-3", "4-6", "7-9")
	ctx := context.Background()
	m := tm.model

	local := localSpan(t, m)
	for seed := range uint64(3) {
		in := shards.RandomInputs(m.Manifest, seed, 2, 7)
		want, err := local.Run(in)
		if err != nil {
			t.Fatal(err)
		}
		res, err := tm.requester.Infer(ctx, m.ID, in, mesh.InferOptions{})
		if err != nil {
			t.Fatal(err)
		}
		d, err := protocol.MaxAbsDiff(want["logits"], res.Outputs["logits"])
		if err != nil || d > 1e-5 {
			t.Fatalf("pass %d: mesh differs from local by %v (%v)", seed, d, err)
		}
		if len(res.Info.Route) != 3 {
			t.Fatalf("route %v, want 3 hops", res.Info.Route)
		}
		t.Logf("pass %d: max abs diff %.2g over route %v in %s", seed, d, res.Info.Route, res.Info.Total)
	}

	// float16 on the wire: half the bytes, close but not exact.
	in := shards.RandomInputs(m.Manifest, 11, 1, 9)
	wantOut, err := local.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	res16, err := tm.requester.Infer(ctx, m.ID, in, mesh.InferOptions{FP16: true})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := protocol.MaxAbsDiff(wantOut["logits"], res16.Outputs["logits"]); err != nil || d > 0.05 || d == 0 {
		t.Fatalf("fp16 on the wire: max abs diff %v (%v); want small but not zero", d, err)
	} else {
		t.Logf("fp16 on the wire: max abs diff %.2g", d)
	}

	// Generations: greedy and seeded-sampled, as a decode ring (the
	// default) and with the requester running the loop.
	prompt := []int64{'t', 'h', 'e', ' ', 'm', 'e', 's', 'h'}
	for _, c := range []struct {
		name     string
		sampling shards.Sampling
		loop     bool
	}{
		{"greedy ring", shards.Sampling{}, false},
		{"sampled ring", shards.Sampling{Temperature: 0.9, TopK: 40, TopP: 0.95, Seed: 7}, false},
		{"greedy requester loop", shards.Sampling{}, true},
		{"sampled requester loop", shards.Sampling{Temperature: 0.9, TopK: 40, TopP: 0.95, Seed: 7}, true},
	} {
		want, _ := localGenerateWith(t, m, prompt, 64, c.sampling)
		res, err := tm.requester.Generate(ctx, GenerateRequest{Model: m.ID, Prompt: prompt, MaxTokens: 64, Sampling: c.sampling,
			Options: mesh.InferOptions{RequesterLoop: c.loop}}, nil)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if !slices.Equal(res.Tokens, want) {
			t.Fatalf("%s: mesh generated %v\nlocal generated %v", c.name, res.Tokens, want)
		}
		t.Logf("%s: 64 tokens identical to the local run; first token %s, total %s", c.name, res.FirstToken, res.Total)
	}
}

// A batch cut into micro-batches that travel the pipeline at once gives the
// rows of the whole batch run locally.
func TestMicroBatchesEqualTheWholeBatch(t *testing.T) {
	tm := startTestMesh(t, "0-3", "4-6", "7-9")
	m := tm.model
	in := shards.RandomInputs(m.Manifest, 9, 10, 5)
	local := localSpan(t, m)
	want, err := local.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	got, infos, err := tm.requester.mesh.InferBatch(context.Background(), m.ID, in, 3, mesh.InferOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 4 {
		t.Fatalf("%d micro-batches, want 4 (10 rows by 3)", len(infos))
	}
	if d, err := protocol.MaxAbsDiff(want["logits"], got["logits"]); err != nil || d > 1e-5 {
		t.Fatalf("micro-batched logits differ by %v (%v)", d, err)
	}
}
