package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards/text/texttest"
)

// run runs a command line in-process and returns its exit code and output.
func run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = Run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errs := run(t, args...)
	if code != 0 {
		t.Fatalf("infermesh %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// The user journey of issue 2 through the CLI: build, inspect, run with
// --compare, generate, and the demo.
func TestShardJourney(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gpt")
	out := mustRun(t, "shard", "build", "gpt", "--layers", "2", "--dim", "64", "--heads", "2", "--ctx", "64", "--seed", "3", "--out", dir)
	if !strings.Contains(out, "4 blocks") {
		t.Fatalf("build output: %s", out)
	}

	out = mustRun(t, "shard", "inspect", dir)
	for _, want := range []string{"bafk", "after block 0: h0", "attention_mask", "past_key_0->present_key_0", "ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("inspect output lacks %q:\n%s", want, out)
		}
	}

	out = mustRun(t, "shard", "run", dir, "--random", "--batch", "2", "--dim-size", "3", "--compare", filepath.Join(dir, "full.onnx"))
	var report struct {
		MaxAbsDiff *float64 `json:"max_abs_diff"`
		Outputs    map[string]struct {
			DType string    `json:"dtype"`
			Shape []int64   `json:"shape"`
			Data  []float64 `json:"data"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal([]byte(out), &report); err != nil {
		t.Fatalf("run output is not JSON: %v\n%s", err, out)
	}
	if report.MaxAbsDiff == nil || *report.MaxAbsDiff > 1e-5 {
		t.Fatalf("max_abs_diff = %v", report.MaxAbsDiff)
	}
	if l := report.Outputs["logits"]; l.DType != "float32" || len(l.Data) != 2*3*256 {
		t.Fatalf("logits: %s %v with %d values", l.DType, l.Shape, len(l.Data))
	}

	// An input file in the same JSON form.
	in := filepath.Join(t.TempDir(), "in.json")
	os.WriteFile(in, []byte(`{"input_ids":{"dtype":"int64","shape":[1,3],"data":[72,105,33]},
		"position_ids":{"dtype":"int64","shape":[1,3],"data":[0,1,2]},
		"attention_mask":{"dtype":"int64","shape":[1,3],"data":[1,1,1]}}`), 0o644)
	out = mustRun(t, "shard", "run", dir, "--input", in, "--quiet")
	if !strings.Contains(out, "float32[1 3 256]") {
		t.Fatalf("run --input: %s", out)
	}

	code, gen, errs := run(t, "shard", "generate", dir, "--prompt", "Hi", "--tokens", "8")
	if code != 0 || !strings.Contains(errs, "8 tokens after a 2-token prompt through 4 blocks") || gen == "" {
		t.Fatalf("generate: exit %d, %q, %q", code, gen, errs)
	}

	tokJSON, tokCfg := texttest.Files(t, "llama3")
	tokDir := t.TempDir()
	os.WriteFile(filepath.Join(tokDir, "tokenizer.json"), tokJSON, 0o644)
	os.WriteFile(filepath.Join(tokDir, "tokenizer_config.json"), tokCfg, 0o644)
	out = mustRun(t, "demo", "--dir", t.TempDir(), "--tokenizer", tokDir, "--layers", "2", "--hidden", "64", "--hops", "2",
		"--tokens", "6", "--prompts", "a|bc|Grüß Gott 🙂")
	for _, want := range []string{"every token matches the local run", "<|start_header_id|>assistant<|end_header_id|>", "3 chats through the mesh at once"} {
		if !strings.Contains(out, want) {
			t.Fatalf("demo output lacks %q: %s", want, out)
		}
	}
}

// shard split on a built model's full.onnx: the blocks it writes chain to
// the same outputs, by its own check and by shard run --compare.
func TestShardSplit(t *testing.T) {
	dir := t.TempDir()
	mustRun(t, "shard", "build", "mlp", "--layers", "6", "--dim", "32", "--out", filepath.Join(dir, "mlp"))
	out := mustRun(t, "shard", "split", filepath.Join(dir, "mlp", "full.onnx"), "--blocks", "3", "--out", filepath.Join(dir, "split"))
	if !strings.Contains(out, "verified: max abs diff") || strings.Count(out, "block ") != 3 {
		t.Fatalf("split output:\n%s", out)
	}
	out = mustRun(t, "shard", "run", filepath.Join(dir, "split"), "--random", "--batch", "2", "--compare", filepath.Join(dir, "mlp", "full.onnx"), "--quiet")
	if !strings.Contains(out, `"max_abs_diff": 0`) {
		t.Fatalf("run --compare: %s", out)
	}
	code, _, errs := run(t, "shard", "split", filepath.Join(dir, "mlp", "full.onnx"), "--at", "nonexistent", "--out", filepath.Join(dir, "bad"))
	if code != 1 || !strings.Contains(errs, "nonexistent") {
		t.Fatalf("--at of an unknown tensor: exit %d, %s", code, errs)
	}
	code, _, errs = run(t, "shard", "split", filepath.Join(dir, "mlp", "manifest.json"), "--blocks", "2", "--out", filepath.Join(dir, "bad"))
	if code != 1 || !strings.Contains(errs, "not an ONNX model") {
		t.Fatalf("split of a JSON file: exit %d, %s", code, errs)
	}
}

func TestCLIErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "Usage: infermesh COMMAND"},
		{[]string{"nope"}, 2, `unknown command "nope"`},
		{[]string{"shard", "inspect"}, 2, "Usage: infermesh shard inspect DIR"},
		{[]string{"shard", "inspect", "/nonexistent"}, 1, "not a model directory"},
		{[]string{"shard", "build", "cnn", "--out", "x"}, 1, `unknown model kind "cnn"`},
		{[]string{"shard", "run", "/nonexistent", "--random"}, 1, "not a model directory"},
	} {
		code, out, errs := run(t, tc.args...)
		if code != tc.code || !strings.Contains(out+errs, tc.want) {
			t.Errorf("infermesh %v: exit %d, output %q; want exit %d with %q", tc.args, code, out+errs, tc.code, tc.want)
		}
	}
}
