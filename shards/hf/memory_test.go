package hf_test

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
)

// bigEnv runs TestImportMemory, which writes a 2.5 GB checkpoint.
const bigEnv = "INFERMESH_HF_BIG"

// TestImportMemory imports a random checkpoint of Llama 3.2 1B's shapes in
// bfloat16 (2.5 GB) and
// checks the process's peak RSS stays under 1.5 GiB: weights stream from
// the checkpoint into the blocks. Set INFERMESH_HF_BIG=1 to run it.
func TestImportMemory(t *testing.T) {
	if os.Getenv(bigEnv) == "" {
		t.Skipf("set %s=1 to import a checkpoint of Llama 3.2 1B's shapes (2.5 GB)", bigEnv)
	}
	src := writeCheckpoint(t, checkpoint.Llama32_1B())
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

	// The blocks load and run at this size (weights cast to float32 at
	// load: several GB of memory), one session per block: fused into one
	// graph, 2.5 GB of blocks would pass protobuf's 2 GiB limit.
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{SessionPerBlock: true})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	defer span.Close()
	loaded := time.Since(start)
	start = time.Now()
	out, err := span.Run(shards.StepInputs(m.Manifest.Decoder, []int64{128000, 791, 6864, 315}, 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loaded in %s; a 4-token prompt ran in %s, logits %v", loaded.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), out["logits"].Shape)
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
