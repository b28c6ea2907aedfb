package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/simulations"
)

// tinyScenario is a scenario small enough to simulate in well under a
// second: a dozen peers in two regions, a minute of requests.
const tinyScenario = `name: tiny
description: A dozen peers, a minute of chat.
seed: 3
duration_s: 60
peers: 12
model: {blocks: 8}
regions:
  - {name: eu, lat: 50.1, lon: 8.7, weight: 2}
  - {name: us, lat: 39.0, lon: -77.5, weight: 1}
classes:
  - {name: gpu, share: 1, block_ms: 2, memory_gb: 2}
  - {name: cpu, share: 1, block_ms: 10, memory_gb: 1}
workload:
  rate: 2
  generate: 0.5
  prompt: {dist: const, mean: 16}
  output: {dist: const, mean: 8}
  entries: 4
arms:
  - {name: slow, set: {workload.rate: "1"}}
  - {name: fast, set: {workload.rate: "3"}}
`

func writeTiny(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tiny.yaml")
	if err := os.WriteFile(path, []byte(tinyScenario), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestSimErrors(t *testing.T) {
	dir := t.TempDir()
	tiny := writeTiny(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"sim"}, 2, "Usage: infermesh sim COMMAND"},
		{[]string{"sim", "nope"}, 2, `unknown command "nope"`},
		{[]string{"sim", "run"}, 2, "Usage: infermesh sim run SCENARIO"},
		{[]string{"sim", "run", tiny}, 2, "need --out"},
		{[]string{"sim", "run", "/nonexistent/x.yaml", "--out", dir}, 1, "no such file"},
		{[]string{"sim", "run", "no-such-builtin", "--out", dir}, 1, "nor a built-in scenario"},
		{[]string{"sim", "run", tiny, "--out", dir, "--set", "novalue"}, 1, "want PATH=VALUE"},
		{[]string{"sim", "run", tiny, "--out", dir, "--set", "workload.nonexistent=1"}, 1, "--set workload.nonexistent=1"},
		{[]string{"sim", "run", tiny, "--out", dir, "--set", "workload.rate=-1"}, 1, "workload.rate"},
		{[]string{"sim", "run", tiny, "--out", dir, "--arm", "medium"}, 1, `no arm "medium"`},
		{[]string{"sim", "sweep", tiny, "--out", dir, "--metric", "e2e_p50,nope"}, 1, `unknown metric "nope" (known: requests,`},
		{[]string{"sim", "sweep", tiny, "--out", dir, "--param", "workload.rate"}, 2, "--param with --values"},
		{[]string{"sim", "sweep", tiny, "--out", dir}, 1, "has no sweep of its own"},
		{[]string{"sim", "sweep", tiny, "--out", dir, "--arm", "medium", "--param", "peers", "--values", "12"}, 1, `no arm "medium"`},
		{[]string{"sim", "sweep", tiny, "--out", dir, "--param", "workload.rate", "--values", "1,x"}, 1, "workload.rate=x"},
		{[]string{"sim", "compare", tiny, tiny, "--arms", "slow", "--out", dir}, 2, "--arms goes with one scenario"},
		{[]string{"sim", "compare", tiny, "--arms", "slow", "--out", dir}, 1, "compare needs two or more runs"},
		{[]string{"sim", "list", "extra"}, 2, "Usage: infermesh sim list"},
	} {
		code, out, errs := run(t, tc.args...)
		if code != tc.code || !strings.Contains(out+errs, tc.want) {
			t.Errorf("infermesh %v: exit %d, output %q; want exit %d with %q", tc.args, code, out+errs, tc.code, tc.want)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("failed commands wrote %d files", len(ents))
	}
}

// sim list shows every embedded scenario, and a built-in name loads like
// a file.
func TestSimList(t *testing.T) {
	names := simulations.BuiltinNames()
	if len(names) == 0 {
		t.Fatal("no built-in scenarios embedded")
	}
	out := mustRun(t, "sim", "list")
	for _, name := range names {
		if !strings.Contains(out, name+" ") {
			t.Errorf("sim list lacks %s:\n%s", name, out)
		}
		for _, arg := range []string{name, name + ".yaml"} {
			if sc, err := loadScenario(arg); err != nil || sc.Name == "" {
				t.Errorf("built-in %s: %v", arg, err)
			}
		}
	}
	if strings.Contains(out, "does not parse") {
		t.Errorf("a built-in scenario does not parse:\n%s", out)
	}
}

// sim run twice with one seed writes identical reports; --set and --seed
// reach the run.
func TestSimRun(t *testing.T) {
	tiny := writeTiny(t)
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	code, out, errs := run(t, "sim", "run", tiny, "--out", a, "--seed", "9", "--set", "workload.rate=4")
	if code != 0 {
		t.Fatalf("sim run: exit %d\n%s%s", code, out, errs)
	}
	for _, want := range []string{"tiny: 60.0 s virtual; ", " unfinished at the end (completion ", "end-to-end p50", "load: ", "report: " + filepath.Join(a, "report.md")} {
		if !strings.Contains(out, want) {
			t.Errorf("sim run output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(errs, "sim tiny: 100%") || !strings.Contains(errs, "tiny has arms (slow, fast)") {
		t.Errorf("no progress line at the end: %q", errs)
	}
	mustRun(t, "sim", "run", tiny, "--out", b, "--seed", "9", "--set", "workload.rate=4")
	summary, err := os.ReadFile(filepath.Join(a, "summary.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(summary), `"seed": 9`) || !strings.Contains(string(summary), `"scenario": "tiny"`) {
		t.Errorf("summary.json:\n%s", summary)
	}
	ents, _ := os.ReadDir(a)
	for _, want := range []string{"summary.json", "report.md", "series.csv", "peers.csv", "latency.csv", "latency_cdf.png", "latency_cdf.svg", "throughput.png", "coverage.svg", "peer_load.png", "failovers.svg"} {
		if _, err := os.Stat(filepath.Join(a, want)); err != nil {
			t.Errorf("sim run wrote no %s", want)
		}
	}
	for _, e := range ents {
		x, _ := os.ReadFile(filepath.Join(a, e.Name()))
		y, _ := os.ReadFile(filepath.Join(b, e.Name()))
		if string(x) != string(y) {
			t.Errorf("%s differs between two runs with one seed", e.Name())
		}
	}
}

func TestSimSweepAndCompare(t *testing.T) {
	tiny := writeTiny(t)
	dir := t.TempDir()
	out := mustRun(t, "sim", "sweep", tiny, "--param", "workload.rate", "--values", "1,3", "--metric", "completion_rate,e2e_p50", "--out", dir)
	if !strings.Contains(out, "workload.rate=3: completion_rate ") || !strings.Contains(out, "sweep: "+filepath.Join(dir, "sweep.md")) {
		t.Errorf("sweep output:\n%s", out)
	}
	for _, f := range []string{"sweep.csv", "sweep.md", "sweep.png", "sweep.svg", "workload.rate=1/report.md", "workload.rate=3/summary.json"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("sweep wrote no %s", f)
		}
	}

	// A sweep of one arm: the arm's settings hold in every run.
	dir = t.TempDir()
	mustRun(t, "sim", "sweep", tiny, "--arm", "fast", "--param", "peers", "--values", "12", "--out", dir)
	sum, err := os.ReadFile(filepath.Join(dir, "peers=12", "summary.json"))
	if err != nil || !strings.Contains(string(sum), `"scenario": "tiny/fast"`) || !strings.Contains(string(sum), "workload: 3 req/s") {
		t.Errorf("a sweep of arm fast (%v):\n%s", err, sum)
	}

	dir = t.TempDir()
	out = mustRun(t, "sim", "compare", tiny, "--out", dir)
	if !strings.Contains(out, "comparison: "+filepath.Join(dir, "comparison.md")) {
		t.Errorf("compare output:\n%s", out)
	}
	md, err := os.ReadFile(filepath.Join(dir, "comparison.md"))
	if err != nil || !strings.Contains(string(md), "| Figure | slow | fast | fast / slow |") {
		t.Errorf("comparison.md (%v):\n%s", err, md)
	}
	for _, f := range []string{"comparison_cdf.png", "comparison_cdf.svg", "slow/report.md", "fast/report.md"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("compare wrote no %s", f)
		}
	}
}

func TestSimProgress(t *testing.T) {
	var buf strings.Builder
	p := newProgress(&buf, "x")
	for i := 0; i <= 100; i++ {
		p.update(float64(i), 100)
	}
	p.finish(true)
	// Not a terminal and faster than progressLinesEvery: the last line only.
	if got := buf.String(); strings.Count(got, "\n") != 1 || !strings.HasPrefix(got, "sim x: 100%  100/100 s virtual") {
		t.Errorf("progress lines: %q", got)
	}
	bar := p.bar(0.5, 30, 60, p.start.Add(90*time.Second))
	if want := "x [===============>              ]  50%  30/60 s virtual  1:30 wall  ETA 1:30"; !strings.HasPrefix(bar, want) {
		t.Errorf("bar = %q, want %q", bar, want)
	}
	if got := clock(3723 * time.Second); got != "1:02:03" {
		t.Errorf("clock = %q", got)
	}
}

func TestUniqueNames(t *testing.T) {
	got := uniqueNames([]string{"tiny", "tiny", "a/b", "", "..", "tiny"})
	want := []string{"tiny", "tiny-2", "a-b", "run", "run-2", "tiny-3"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("uniqueNames = %q, want %q", got, want)
	}
}
