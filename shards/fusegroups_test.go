package shards_test

import (
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// A span too big to fuse into one graph (ONNX files are protobufs, at most
// 2 GiB) is fused in groups of contiguous blocks under the bound, and runs
// exactly as one session per block does, KV cache and all.
func TestSpanFusedInGroups(t *testing.T) {
	m, err := build.GPT(build.GPTConfig{Layers: 6, Dim: 32, Heads: 2, Context: 64, Seed: 4}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	largest := int64(0)
	for _, b := range m.Manifest.Blocks {
		largest = max(largest, b.Size)
	}
	restore := shards.SetMaxFusedBytes(3 * largest)
	defer restore()
	grouped := openRuntime(t)
	perBlock, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1, SessionPerBlock: true})
	if err != nil {
		t.Fatal(err)
	}
	n := len(m.Manifest.Blocks)
	a, err := grouped.LoadSpan(m, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := perBlock.LoadSpan(m, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Sessions() < 2 || a.Sessions() >= n {
		t.Fatalf("%d blocks under a bound of 3 blocks ran as %d sessions, want a few groups", n, a.Sessions())
	}
	sa, sb := a.NewSession(), b.NewSession()
	defer sa.Close()
	defer sb.Close()
	tokens := []int64{'h', 'e', 'l', 'l', 'o'}
	fed := 0
	for step := range 6 {
		in := shards.StepInputs(m.Manifest.Decoder, tokens, fed)
		oa, err := sa.Step(in)
		if err != nil {
			t.Fatal(err)
		}
		ob, err := sb.Step(in)
		if err != nil {
			t.Fatal(err)
		}
		if d, err := protocol.MaxAbsDiff(oa["logits"], ob["logits"]); err != nil || d != 0 {
			t.Fatalf("step %d: logits differ by %v (%v)", step, d, err)
		}
		fed = len(tokens)
		tokens = append(tokens, int64('a'+step))
	}
	t.Logf("%d blocks as %d sessions", n, a.Sessions())
}
