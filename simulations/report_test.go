package simulations

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"encoding/xml"
	"errors"
	"image/png"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fakeResult is a hand-made Result of a run of requests over 10-second
// samples and peers of three classes; gen adds generation latencies
// (TTFT, per token). latScale multiplies every latency.
func fakeResult(tb testing.TB, seed uint64, requests int, gen bool, latScale float64) *Result {
	tb.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	r := &Result{Scenario: "fake", Seed: int64(seed), Duration: 600,
		Params: []string{"peers: 50", "workload.rate: 2/s", "churn.leave_per_hour: 0.05"}}
	for range requests {
		e2e := latScale * math.Exp(rng.NormFloat64()*0.5) // median latScale s
		r.Latencies.E2E = append(r.Latencies.E2E, e2e)
		if gen {
			r.Latencies.TTFT = append(r.Latencies.TTFT, e2e/5)
			r.Latencies.PerToken = append(r.Latencies.PerToken, e2e/100)
		}
	}
	for i := range 60 {
		c := requests / 60
		r.Series = append(r.Series, Sample{T: float64(10 * (i + 1)), Arrivals: c + 1, Completed: c, Failed: i % 2,
			Failovers: i % 3, Tokens: 50 * c, Peers: 50 - i/10, InFlight: 3, Coverage: 1 - float64(i%7)/20, P50: 1, P95: 2})
	}
	classes := []string{"dc-gpu", "consumer-gpu", "edge-cpu"}
	for i := range 50 {
		r.Peers = append(r.Peers, PeerStat{ID: i, Class: classes[i%3], Region: "eu", Passes: int64(rng.IntN(1000)),
			Busy: rng.Float64(), Online: 600, Failed: i % 4})
	}
	s := &r.Summary
	s.Requests, s.Completed, s.Failed = requests+30, requests, 30
	s.CompletionRate = float64(requests) / float64(requests+30)
	s.Throughput, s.TokensPerSec = float64(requests)/600, float64(50*requests)/600
	s.E2E = quantilesOf(r.Latencies.E2E)
	s.TTFT = quantilesOf(r.Latencies.TTFT)
	s.PerToken = quantilesOf(r.Latencies.PerToken)
	s.Hops, s.Failovers, s.Replays = 3.25, 60, 12
	s.PeersStart, s.PeersEnd, s.Joins, s.Leaves = 50, 45, 3, 8
	s.MinCoverage, s.Events, s.Moves = 0.7, 123456, 4
	return r
}

func quantilesOf(xs []float64) Quantiles {
	g := quantileGrid(xs, 100)
	if g == nil {
		return Quantiles{}
	}
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return Quantiles{N: len(xs), Mean: sum / float64(len(xs)), P50: g[50], P90: g[90], P95: g[95], P99: g[99], Max: g[100]}
}

func readCSV(t *testing.T, path string) [][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return rows
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// checkImages checks that stem.png decodes and stem.svg is well-formed XML.
func checkImages(t *testing.T, dir string, stems ...string) {
	t.Helper()
	for _, stem := range stems {
		f, err := os.Open(filepath.Join(dir, stem+".png"))
		if err != nil {
			t.Error(err)
			continue
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil {
			t.Errorf("%s.png: %v", stem, err)
		} else if b := img.Bounds(); b.Dx() < 300 || b.Dy() < 200 {
			t.Errorf("%s.png is %v", stem, b)
		}
		svg, err := os.ReadFile(filepath.Join(dir, stem+".svg"))
		if err != nil {
			t.Error(err)
			continue
		}
		d := xml.NewDecoder(bytes.NewReader(svg))
		var root bool
		for {
			tok, err := d.Token()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Errorf("%s.svg: %v", stem, err)
				break
			}
			if se, ok := tok.(xml.StartElement); ok && !root {
				root = true
				if se.Name.Local != "svg" {
					t.Errorf("%s.svg: root element %s", stem, se.Name.Local)
				}
			}
		}
	}
}

var reportPlots = []string{"latency_cdf", "throughput", "coverage", "peer_load", "failovers"}

func TestWriteReport(t *testing.T) {
	r := fakeResult(t, 1, 3000, true, 1)
	dir := filepath.Join(t.TempDir(), "new", "dir")
	if err := WriteReport(dir, r); err != nil {
		t.Fatal(err)
	}

	var got Result
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(dir, "summary.json"))), &got); err != nil {
		t.Fatal(err)
	}
	if got.Summary != r.Summary || got.Scenario != "fake" || got.Seed != 1 || got.Duration != 600 || !slices.Equal(got.Params, r.Params) {
		t.Errorf("summary.json round trip: %+v", got)
	}

	if rows := readCSV(t, filepath.Join(dir, "series.csv")); len(rows) != len(r.Series)+1 || rows[0][0] != "t_s" || rows[1][1] != "10" {
		t.Errorf("series.csv: %d rows, first %v %v", len(rows), rows[0], rows[1])
	}
	if rows := readCSV(t, filepath.Join(dir, "peers.csv")); len(rows) != len(r.Peers)+1 || rows[0][1] != "class" {
		t.Errorf("peers.csv: %d rows", len(rows))
	}
	rows := readCSV(t, filepath.Join(dir, "latency.csv"))
	if len(rows) != cdfPoints+2 || rows[0][1] != "e2e_s" || rows[cdfPoints+1][0] != "1.000" {
		t.Fatalf("latency.csv: %d rows, first %v", len(rows), rows[0])
	}
	if want := ff(r.Summary.E2E.Max); rows[cdfPoints+1][1] != want {
		t.Errorf("latency.csv max e2e %s, want %s", rows[cdfPoints+1][1], want)
	}
	if want := ff(r.Summary.E2E.P50); rows[501][1] != want {
		t.Errorf("latency.csv median e2e %s, want %s", rows[501][1], want)
	}

	checkImages(t, dir, reportPlots...)

	md := readFile(t, filepath.Join(dir, "report.md"))
	for _, want := range []string{
		"# Simulation report: fake", "Seed 1", "workload.rate: 2/s",
		"| Requests arrived | 3,030 |", "| Completion rate | 99.01 % |", "| Failovers | 60 |",
		fmtSeconds(r.Summary.E2E.P50), fmtSeconds(r.Summary.E2E.P99), fmtSeconds(r.Summary.TTFT.P95),
		"median " + fmtSeconds(r.Summary.E2E.P50), "3.25 hops", "4 moved to another span", "| Span moves (rebalancing) | 4 |", "lowest block coverage at any sample was 70.00 %",
		"![Latency CDF](latency_cdf.svg)", "(throughput.svg)", "(coverage.svg)", "(peer_load.svg)", "(failovers.svg)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report.md lacks %q", want)
		}
	}
	if strings.Contains(md, "Not drawn") || strings.Contains(md, "NaN") {
		t.Errorf("report.md:\n%s", md)
	}

	// One Result gives identical files, plots included.
	again := t.TempDir()
	if err := WriteReport(again, fakeResult(t, 1, 3000, true, 1)); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 5+2*len(reportPlots) {
		t.Errorf("%d files in a report", len(ents))
	}
	for _, e := range ents {
		if readFile(t, filepath.Join(dir, e.Name())) != readFile(t, filepath.Join(again, e.Name())) {
			t.Errorf("%s differs between two writes of one result", e.Name())
		}
	}
}

func TestWriteReportDegenerate(t *testing.T) {
	t.Run("empty", func(t *testing.T) {
		dir := t.TempDir()
		if err := WriteReport(dir, &Result{}); err != nil {
			t.Fatal(err)
		}
		md := readFile(t, filepath.Join(dir, "report.md"))
		for _, want := range []string{"unnamed scenario", "No request completed", "Not drawn: no request completed", "Not drawn: no samples", "Not drawn: no peers", "| Completion rate | – |"} {
			if !strings.Contains(md, want) {
				t.Errorf("report.md lacks %q:\n%s", want, md)
			}
		}
		for _, stem := range reportPlots {
			if _, err := os.Stat(filepath.Join(dir, stem+".png")); err == nil {
				t.Errorf("%s.png drawn for an empty result", stem)
			}
		}
		if rows := readCSV(t, filepath.Join(dir, "latency.csv")); len(rows) != cdfPoints+2 || rows[1][1] != "" {
			t.Errorf("latency.csv of no latencies: %d rows, %v", len(rows), rows[1])
		}
		if rows := readCSV(t, filepath.Join(dir, "series.csv")); len(rows) != 1 {
			t.Errorf("series.csv: %d rows", len(rows))
		}
	})
	// No generation requests, and figures that are not finite, a zero
	// latency (no log axis), a zero-length interval, a single peer.
	t.Run("single passes, not finite and zero", func(t *testing.T) {
		dir := t.TempDir()
		r := fakeResult(t, 3, 200, false, 0.2)
		r.Summary.CompletionRate = math.NaN()
		r.Summary.Throughput = math.Inf(1)
		r.Latencies.E2E = append(r.Latencies.E2E, math.NaN(), 0)
		r.Series[3].Coverage = math.NaN()
		r.Series = append(r.Series, Sample{T: r.Series[len(r.Series)-1].T})
		r.Peers = r.Peers[:1]
		r.Summary.Requests += 5
		if err := WriteReport(dir, r); err != nil {
			t.Fatal(err)
		}
		md := readFile(t, filepath.Join(dir, "report.md"))
		for _, want := range []string{"| Time to first token p50 | – |", "no time to first token", "(latency_cdf.svg)",
			"235 requests arrived: 200 completed, 30 failed, 5 unfinished at the end (completion 85.11 %)."} {
			if !strings.Contains(md, want) {
				t.Errorf("report.md lacks %q:\n%s", want, md)
			}
		}
		if strings.Contains(md, "NaN") || strings.Contains(md, "Inf") {
			t.Errorf("report.md:\n%s", md)
		}
		var got Result
		if err := json.Unmarshal([]byte(readFile(t, filepath.Join(dir, "summary.json"))), &got); err != nil || got.Summary.Throughput != 0 {
			t.Errorf("summary.json: %v, throughput %v", err, got.Summary.Throughput)
		}
		checkImages(t, dir, reportPlots...)
	})
}

// The rule of censoredQuantiles on a small case: 100 completed requests
// of 1..100 s and two unfinished ones, 95.5 s and 120 s so far.
func TestCensoredQuantiles(t *testing.T) {
	done := make([]float64, 100)
	for i := range done {
		done[i] = float64(i + 1)
	}
	q := censoredQuantiles(done, []float64{120, 95.5, math.NaN()})
	// Of 102 (the NaN skipped): p50 is rank 51 (51 s, below every bound:
	// exact), p90 rank 92 (92 s, exact), p95 rank 97 (96 s: the 95.5 s
	// request may finish before it), p99 rank 101 (100 s); mean and max
	// take the unfinished at their bounds.
	want := Quantiles{N: 100, Censored: 2, Mean: (5050 + 95.5 + 120) / 102, P50: 51, P90: 92, P95: 96, P99: 100, Max: 120,
		LowerBound: Bounds{Mean: true, P95: true, P99: true, Max: true},
		// p95 is at most the 97th completed (were both unfinished to run
		// forever); p99's rank falls among the unfinished: no bound.
		UpperBound: Uppers{P95: 97}}
	if q != want {
		t.Errorf("censoredQuantiles =\n%+v, want\n%+v", q, want)
	}
	// A rank landing on an unfinished request is its bound, flagged.
	if q := censoredQuantiles(done, []float64{0.5}); q.P50 != 50 || !q.LowerBound.P50 || q.Max != 100 || !q.LowerBound.Max {
		t.Errorf("censoredQuantiles with a 0.5 s bound: %+v", q)
	}
	// Nothing unfinished: the plain figures, nothing flagged.
	if q, want := censoredQuantiles(done, nil), quantilesOf(done); q != want {
		t.Errorf("censoredQuantiles without censoring = %+v, want %+v", q, want)
	}
	if q := censoredQuantiles(nil, nil); q != (Quantiles{}) {
		t.Errorf("censoredQuantiles of nothing = %+v", q)
	}

	for _, tc := range []struct {
		got, want Unfinished
	}{
		{unfinishedAt(600, 590, 0, false, false, 0), Unfinished{E2E: 10, TTFT: math.NaN(), PerToken: math.NaN()}},
		{unfinishedAt(600, 590, 0, false, true, 11), Unfinished{E2E: 10, TTFT: 10, PerToken: 0}},
		{unfinishedAt(600, 590, 592, true, true, 11), Unfinished{E2E: 10, TTFT: 2, FirstToken: true, PerToken: 0.8}},
		{unfinishedAt(600, 590, 592, true, true, 1), Unfinished{E2E: 10, TTFT: 2, FirstToken: true, PerToken: math.NaN()}},
	} {
		g, w := tc.got, tc.want
		same := func(a, b float64) bool { return a == b || math.IsNaN(a) && math.IsNaN(b) }
		if !same(g.E2E, w.E2E) || !same(g.TTFT, w.TTFT) || !same(g.PerToken, w.PerToken) || g.FirstToken != w.FirstToken {
			t.Errorf("unfinishedAt = %+v, want %+v", g, w)
		}
	}
}

// withUnfinished adds to r n requests unfinished at the end of its run,
// submitted from 1.5 s before the end back by 0.1 s each: generation
// requests, every other one with its first token 0.2 s after submission.
func withUnfinished(r *Result, n int) *Result {
	for i := range n {
		arrive := r.Duration - 1.5 - 0.1*float64(i)
		r.Latencies.Unfinished = append(r.Latencies.Unfinished, unfinishedAt(r.Duration, arrive, arrive+0.2, i%2 == 0, true, 100))
	}
	r.Summary.Requests += n
	return r
}

// A run that ended with requests in flight: they count as submitted, not
// completed, and bound the latency figures from below; those they may
// change say so in report.md, summary.json, latency.csv and Headline.
func TestReportUnfinished(t *testing.T) {
	plain := fakeResult(t, 1, 3000, true, 1) // e2e median 1 s, p90 1.9 s
	r := withUnfinished(fakeResult(t, 1, 3000, true, 1), 61)
	dir := t.TempDir()
	if err := WriteReport(dir, r); err != nil {
		t.Fatal(err)
	}
	if r.Summary.Unfinished != 0 || r.Summary.E2E != plain.Summary.E2E {
		t.Errorf("WriteReport changed its result: %+v", r.Summary)
	}

	var got Result
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(dir, "summary.json"))), &got); err != nil {
		t.Fatal(err)
	}
	s := &got.Summary
	if s.Requests != 3091 || s.Completed != 3000 || s.Failed != 30 || s.Unfinished != 61 || s.CompletionRate != 3000.0/3091 {
		t.Errorf("summary.json counts: %+v", s)
	}
	e, plainE := s.E2E, plain.Summary.E2E
	if e.N != 3000 || e.Censored != 61 || e.LowerBound != (Bounds{Mean: true, P90: true, P95: true, P99: true, Max: true}) {
		t.Errorf("summary.json e2e: %+v", e)
	}
	// The median ranks among the 3,061 requests, below every unfinished
	// request's 1.5 s: exact, and the completed requests' rank-1,531
	// latency. Above 1.5 s the figures rise with the slow requests the
	// completed-only ones left out.
	sorted := slices.Sorted(slices.Values(r.Latencies.E2E))
	if e.P50 != sorted[1530] || e.P50 >= 1.5 || !(e.P99 > plainE.P99) || e.Max != 7.5 || !(e.Mean > plainE.Mean) {
		t.Errorf("e2e with unfinished requests %+v, completed only %+v", e, plainE)
	}
	// Half had their first token (exact TTFT 0.2 s); the others' TTFT is
	// at least 1.5 s, above the completed requests' p99 (e2e/5).
	if tt := s.TTFT; tt.N != 3031 || tt.Censored != 30 || tt.LowerBound.P50 || tt.LowerBound.P95 || !tt.LowerBound.Max {
		t.Errorf("summary.json ttft: %+v", tt)
	}
	// Per token: 0 before a first token, so nothing is exact above 0.
	if pt := s.PerToken; pt.N != 3000 || pt.Censored != 61 || pt.LowerBound != (Bounds{true, true, true, true, true, true}) {
		t.Errorf("summary.json per token: %+v against %+v", pt, plain.Summary.PerToken)
	}
	js := readFile(t, filepath.Join(dir, "summary.json"))
	if !strings.Contains(js, `"unfinished": 61`) || !strings.Contains(js, `"lower_bound": {`) || !strings.Contains(js, `"p99": true`) {
		t.Errorf("summary.json:\n%s", js)
	}

	md := readFile(t, filepath.Join(dir, "report.md"))
	for _, want := range []string{
		"3,091 requests arrived: 3,000 completed, 30 failed, 61 unfinished at the end (completion 97.06 %).",
		"| Requests unfinished at the end | 61 |", "| Completion rate | 97.06 % |",
		"| End-to-end latency p50 | " + fmtSeconds(e.P50) + " |", "| End-to-end latency p99 | " + fmtBound(e.P99, true, e.UpperBound.P99) + " |",
		"median " + fmtSeconds(e.P50) + ", p95 " + fmtBound(e.P95, true, e.UpperBound.P95), "max ≥ 7.50 s",
		"≥ marks a lower bound, and a – b a range: 61 requests were unfinished at the end of the run",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report.md lacks %q", want)
		}
	}
	if e.UpperBound.P95 <= e.P95 || !strings.Contains(md, fmtSeconds(e.P95)+" – "+fmtSeconds(e.UpperBound.P95)) {
		t.Errorf("p95 %s should show as a range up to the completed latency at its rank (%s)", fmtSeconds(e.P95), fmtSeconds(e.UpperBound.P95))
	}
	if t.Failed() {
		t.Log(md)
	}

	rows := readCSV(t, filepath.Join(dir, "latency.csv"))
	if h := rows[0]; len(h) != 7 || h[4] != "e2e_lower_bound" {
		t.Fatalf("latency.csv header %v", h)
	}
	if med, last := rows[501], rows[cdfPoints+1]; med[1] != ff(e.P50) || med[4] != "false" || last[1] != "7.5" || last[4] != "true" {
		t.Errorf("latency.csv median %v, max %v", med, last)
	}

	h := Headline(r)
	for _, want := range []string{"3,091 requests: 3,000 completed, 30 failed, 61 unfinished at the end (completion 97.06 %)",
		"end-to-end p50 " + fmtSeconds(e.P50) + ", p95 " + fmtBound(e.P95, true, e.UpperBound.P95), "≥: at least (the 61 unfinished requests"} {
		if !strings.Contains(h, want) {
			t.Errorf("Headline lacks %q:\n%s", want, h)
		}
	}

	// Unfinished requests the result has no entry for: bounded by 0 only,
	// so every figure above the fastest is a lower bound.
	r = fakeResult(t, 1, 3000, true, 1)
	r.Summary.Requests += 5
	st := r.settled().Summary
	if st.Unfinished != 5 || st.E2E.Censored != 5 || st.TTFT.Censored != 5 || !st.E2E.LowerBound.P50 || st.E2E.P50 > plainE.P50 {
		t.Errorf("settled without entries for the unfinished: %+v", st)
	}
}

// Without unfinished requests, a report says so and prints its figures as
// before: nothing flagged, the same values, no lower_bound in the JSON.
func TestReportNoUnfinished(t *testing.T) {
	r := fakeResult(t, 1, 3000, true, 1)
	dir := t.TempDir()
	if err := WriteReport(dir, r); err != nil {
		t.Fatal(err)
	}
	md, js := readFile(t, filepath.Join(dir, "report.md")), readFile(t, filepath.Join(dir, "summary.json"))
	if strings.Contains(md, "≥") || strings.Contains(js, "lower_bound") || strings.Contains(js, "censored") {
		t.Errorf("a run without unfinished requests has lower bounds:\n%s\n%s", md, js)
	}
	for _, want := range []string{"3,030 requests arrived: 3,000 completed, 30 failed, 0 unfinished at the end (completion 99.01 %).",
		"| Requests unfinished at the end | 0 |",
		"End-to-end latency: median " + fmtSeconds(r.Summary.E2E.P50) + ", p95 " + fmtSeconds(r.Summary.E2E.P95) + ", p99 " + fmtSeconds(r.Summary.E2E.P99)} {
		if !strings.Contains(md, want) {
			t.Errorf("report.md lacks %q", want)
		}
	}
	if rows := readCSV(t, filepath.Join(dir, "latency.csv")); rows[cdfPoints+1][4] != "false" || rows[cdfPoints+1][1] != ff(r.Summary.E2E.Max) {
		t.Errorf("latency.csv max row %v", rows[cdfPoints+1])
	}
	if h := Headline(r); strings.Contains(h, "≥") || !strings.Contains(h, "3,030 requests: 3,000 completed, 30 failed, 0 unfinished at the end (completion 99.01 %)") {
		t.Errorf("Headline:\n%s", h)
	}
}

func TestQuantileGrid(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3, math.NaN()}
	g := quantileGrid(xs, 4)
	if !slices.Equal(g, []float64{1, 2, 3, 4, 5}) {
		t.Errorf("quantileGrid = %v", g)
	}
	if xs[0] != 5 {
		t.Error("quantileGrid sorted its input")
	}
	if quantileGrid(nil, 10) != nil || quantileGrid([]float64{math.Inf(1)}, 10) != nil {
		t.Error("quantileGrid of nothing finite is not nil")
	}
}

func TestDistinctTicks(t *testing.T) {
	seen := map[string]bool{}
	for _, tk := range (distinctTicks{}).Ticks(2.605, 2.655) {
		if tk.Label == "" {
			continue
		}
		if seen[tk.Label] || strings.Contains(tk.Label, "e") {
			t.Errorf("tick label %q twice or with an exponent", tk.Label)
		}
		seen[tk.Label] = true
	}
	if len(seen) < 2 {
		t.Errorf("%d labelled ticks", len(seen))
	}
}

func TestFormatting(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{commas(0), "0"}, {commas(999), "999"}, {commas(1000), "1,000"}, {commas(-1234567), "-1,234,567"},
		{fmtSeconds(0), "0 s"}, {fmtSeconds(0.0000123), "12.3 µs"}, {fmtSeconds(0.123), "123 ms"},
		{fmtSeconds(1.5), "1.50 s"}, {fmtSeconds(math.NaN()), "0 s"},
		{fmtVirtual(3600), "3,600 s (60.0 min)"}, {fmtVirtual(86400), "86,400 s (24.0 h)"}, {fmtVirtual(30), "30.0 s"},
		{fmtPercent(0.5), "50.00 %"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestMetricNames(t *testing.T) {
	names := MetricNames()
	seen := map[string]bool{}
	for _, n := range names {
		if seen[n] {
			t.Errorf("metric %q twice", n)
		}
		seen[n] = true
	}
	for _, n := range append([]string{"completion_rate", "e2e_p50", "e2e_p95", "ttft_p50", "throughput_rps", "failovers"}, headlineNames...) {
		if !seen[n] {
			t.Errorf("metric %q missing", n)
		}
	}
	if err := CheckMetrics([]string{"e2e_p50", "completion_rate"}); err != nil {
		t.Error(err)
	}
	err := CheckMetrics([]string{"e2e_p50", "latency"})
	if !errors.Is(err, ErrUnknownMetric) || !strings.Contains(err.Error(), `"latency"`) || !strings.Contains(err.Error(), "ttft_p95") {
		t.Errorf("unknown metric: %v", err)
	}

	s := fakeResult(t, 5, 100, false, 1).Summary
	ms, _ := lookupMetrics([]string{"completion_rate", "e2e_p95", "ttft_p50", "failovers"})
	for i, want := range []float64{s.CompletionRate, s.E2E.P95, 0, 60} {
		if got := ms[i].get(&s); got != want {
			t.Errorf("%s = %v, want %v", ms[i].name, got, want)
		}
	}
	if ms[2].available(&s) || ms[2].format(&s) != "–" {
		t.Error("ttft_p50 available without generation requests")
	}
}

func TestWriteSweep(t *testing.T) {
	values := []string{"0.2", "0.05"}
	sr := &SweepResult{Scenario: "fake", Param: "churn.leave_per_hour", Values: values}
	for i := range values {
		r := fakeResult(t, uint64(10+i), 300, true, float64(i+1))
		r.Series, r.Peers = nil, nil // fewer plots in the runs' reports: faster
		sr.Results = append(sr.Results, r)
	}
	dir := t.TempDir()
	if err := WriteSweep(dir, sr, []string{"completion_rate", "e2e_p50", "ttft_p95"}); err != nil {
		t.Fatal(err)
	}
	rows := readCSV(t, filepath.Join(dir, "sweep.csv"))
	if len(rows) != 3 || rows[0][0] != "churn.leave_per_hour" || len(rows[0]) != len(MetricNames())+1 || rows[2][0] != "0.05" {
		t.Errorf("sweep.csv: %v", rows)
	}
	checkImages(t, dir, "sweep")
	md := readFile(t, filepath.Join(dir, "sweep.md"))
	for _, want := range []string{"# Sweep of churn.leave_per_hour", "| Completion rate | End-to-end latency p50 | Time to first token p95 |",
		"(sweep.svg)", fmtSeconds(sr.Results[1].Summary.E2E.P50)} {
		if !strings.Contains(md, want) {
			t.Errorf("sweep.md lacks %q:\n%s", want, md)
		}
	}
	for _, v := range values {
		sub := sweepDirName(sr.Param, v, 0)
		if !strings.Contains(md, "("+sub+"/report.md)") {
			t.Errorf("sweep.md has no link to %s", sub)
		}
		if _, err := os.Stat(filepath.Join(dir, sub, "report.md")); err != nil {
			t.Error(err)
		}
	}

	// Values that are not numbers are categories on the x axis.
	sr.Values = []string{"node", "even split"}
	dir = t.TempDir()
	ms, _ := lookupMetrics([]string{"e2e_p95"})
	if drawn, err := writeSweepPlot(dir, sr, ms); !drawn || err != nil {
		t.Fatalf("sweep plot of categories: %v, %v", drawn, err)
	}
	checkImages(t, dir, "sweep")
	// Values over decades go on a log axis.
	sr.Values = []string{"1000", "100000"}
	if drawn, err := writeSweepPlot(dir, sr, ms); !drawn || err != nil {
		t.Fatalf("sweep plot over decades: %v, %v", drawn, err)
	}

	err := WriteSweep(t.TempDir(), &SweepResult{Values: []string{"1"}, Results: []*Result{{}}}, []string{"nope"})
	if !errors.Is(err, ErrUnknownMetric) {
		t.Errorf("WriteSweep with an unknown metric: %v", err)
	}
	if got := sweepDirName("a.b", "x/../y z", 0); got != "a.b=x_.._y_z" {
		t.Errorf("sweepDirName = %q", got)
	}
}

func TestWriteComparison(t *testing.T) {
	a := fakeResult(t, 20, 400, true, 2)
	b := fakeResult(t, 20, 400, true, 1) // the same draws, half the latency
	b.Params = append([]string{"peers: 200"}, b.Params[1:]...)
	dir := t.TempDir()
	if err := WriteComparison(dir, []string{"cloud", "edge"}, []*Result{a, b}); err != nil {
		t.Fatal(err)
	}
	checkImages(t, dir, "comparison_cdf")
	md := readFile(t, filepath.Join(dir, "comparison.md"))
	for _, want := range []string{"# Comparison: cloud vs edge", "| Figure | cloud | edge | edge / cloud |",
		"| End-to-end latency p50 | " + fmtSeconds(a.Summary.E2E.P50) + " | " + fmtSeconds(b.Summary.E2E.P50) + " | 0.50× |",
		"| Requests arrived | 430 | 430 | 1.00× |", "end-to-end latency p50 " + fmtSeconds(b.Summary.E2E.P50) + " vs " + fmtSeconds(a.Summary.E2E.P50) + " (50% lower)",
		"(comparison_cdf.svg)", "| Parameter | cloud | edge |\n|---|---|---|\n| peers | 50 | 200 |\n", "Common to all runs:\n\n- workload.rate: 2/s\n"} {
		if !strings.Contains(md, want) {
			t.Errorf("comparison.md lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "≥") || !strings.Contains(md, "| Requests unfinished at the end | 0 | 0 | – |") {
		t.Errorf("comparison.md of runs without unfinished requests:\n%s", md)
	}

	// The faster run with unfinished requests: its tail figures are lower
	// bounds, and so are the ratios to them.
	b = withUnfinished(fakeResult(t, 20, 400, true, 1), 20)
	if err := WriteComparison(dir, []string{"cloud", "edge"}, []*Result{a, b}); err != nil {
		t.Fatal(err)
	}
	bs := b.settled().Summary
	md = readFile(t, filepath.Join(dir, "comparison.md"))
	for _, want := range []string{"| Requests unfinished at the end | 0 | 20 | – |", "| Completion rate | 93.02 % | 88.89 % | 0.96× |",
		"| End-to-end latency p99 | " + fmtSeconds(a.Summary.E2E.P99) + " | " + fmtBound(bs.E2E.P99, true, bs.E2E.UpperBound.P99) + " | ≥ ",
		"edge: ≥ marks a lower bound, and a – b a range: 20 requests were unfinished",
		"end-to-end latency p95 " + fmtBound(bs.E2E.P95, true, bs.E2E.UpperBound.P95) + " vs " + fmtSeconds(a.Summary.E2E.P95) + " (at most "} {
		if !strings.Contains(md, want) {
			t.Errorf("comparison.md lacks %q:\n%s", want, md)
		}
	}
	if err := WriteComparison(dir, []string{"a"}, []*Result{a}); err == nil {
		t.Error("a comparison of one run")
	}
	if err := WriteComparison(t.TempDir(), []string{"a", "b"}, []*Result{{}, {}}); err != nil {
		t.Errorf("comparison of empty runs: %v", err)
	}
}

// Sweep runs one copy of the scenario per value, leaving it unchanged, and
// reports progress over the whole sweep.
func TestSweep(t *testing.T) {
	sc, err := ParseScenario([]byte(`name: tiny
duration_s: 60
peers: 6
model: {blocks: 4}
regions: [{name: eu, lat: 50, lon: 8, weight: 1}]
classes: [{name: gpu, share: 1, block_ms: 2, memory_gb: 1}]
workload: {rate: 2, entries: 2}
`), "tiny")
	if err != nil {
		t.Fatal(err)
	}
	var last, total float64
	sr, err := Sweep(t.Context(), sc, "workload.rate", []string{"1", "4"}, RunOptions{Progress: func(done, tot float64) {
		if done < last {
			t.Errorf("progress went back from %v to %v", last, done)
		}
		last, total = done, tot
	}})
	if err != nil {
		t.Fatal(err)
	}
	if sc.Workload.Rate != 2 {
		t.Errorf("Sweep changed the scenario: rate %v", sc.Workload.Rate)
	}
	if len(sr.Results) != 2 || sr.Param != "workload.rate" || sr.Scenario != "tiny" {
		t.Fatalf("sweep result: %+v", sr)
	}
	if a, b := sr.Results[0].Summary.Requests, sr.Results[1].Summary.Requests; !(b > 2*a) {
		t.Errorf("requests at rate 1 and 4: %d, %d", a, b)
	}
	if last != total || total != 120 {
		t.Errorf("progress ended at %v of %v, want 120 of 120", last, total)
	}
	if _, err := Sweep(t.Context(), sc, "workload.rate", []string{"1", "-1"}, RunOptions{}); err == nil || !strings.Contains(err.Error(), "workload.rate=-1") {
		t.Errorf("sweep to a bad value: %v", err)
	}
	if _, err := Sweep(t.Context(), sc, "workload.rate", nil, RunOptions{}); err == nil {
		t.Error("sweep of no values")
	}
}

// A result with unfinished requests goes through JSON (which has no NaN:
// a latency a request does not have is null) and comes back the same.
func TestUnfinishedJSON(t *testing.T) {
	in := []Unfinished{unfinishedAt(600, 590, 0, false, false, 0), unfinishedAt(600, 590, 592, true, true, 11)}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out []Unfinished
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || out[0].E2E != 10 || !math.IsNaN(out[0].TTFT) || !math.IsNaN(out[0].PerToken) ||
		out[1] != in[1] {
		t.Fatalf("%s came back as %+v", b, out)
	}
}
