package simulations

// The report writer: a Result becomes files a researcher reads. The layout
// of one report directory:
//
//	summary.json     the Result's JSON fields (scenario, seed, duration, params, summary)
//	report.md        title, parameters, headline table, key numbers in prose, the plots
//	series.csv       one row per Sample
//	peers.csv        one row per PeerStat
//	latency.csv      the latency CDFs at 1001 quantiles (0, 0.001, ..., 1)
//	*.png, *.svg     the plots (report_plot.go)
//
// Everything written is a function of the Result alone: no clock, no map
// iteration order, so one seed gives identical files.
//
// Reports count the requests still in flight at the end of the run
// (Summary.Unfinished): the completion rate is completed over submitted,
// and the latency figures take each unfinished request at its lower bound
// (Result.settled, censoredQuantiles), printing "≥" before a figure that is
// only a lower bound; the JSON and CSV files say so in lower_bound fields
// and columns.

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// cdfPoints is how many steps latency.csv and the CDF plots resolve a
// distribution into: quantiles 0, 1/cdfPoints, ..., 1.
const cdfPoints = 1000

// WriteReport writes r's report into dir, creating it if missing. Files
// already there with the same names are replaced.
func WriteReport(dir string, r *Result) error {
	if r == nil {
		return fmt.Errorf("simulations: WriteReport: nil result")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	r = r.settled()
	if err := writeSummaryJSON(filepath.Join(dir, "summary.json"), r); err != nil {
		return err
	}
	if err := writeCSV(filepath.Join(dir, "series.csv"), seriesRows(r.Series)); err != nil {
		return err
	}
	if err := writeCSV(filepath.Join(dir, "peers.csv"), peerRows(r.Peers)); err != nil {
		return err
	}
	if err := writeCSV(filepath.Join(dir, "latency.csv"), latencyRows(&r.Latencies, r.Summary.Unfinished)); err != nil {
		return err
	}
	plots, err := writeReportPlots(dir, r)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "report.md"), reportMarkdown(r, plots), 0o644)
}

// writeSummaryJSON writes the JSON-tagged fields of r, indented. Figures
// that are not finite (a division by zero upstream) are written as 0:
// JSON has no NaN.
func writeSummaryJSON(path string, r *Result) error {
	c := *r
	c.Duration = orZero(c.Duration)
	s := &c.Summary
	for _, f := range []*float64{&s.CompletionRate, &s.Throughput, &s.TokensPerSec, &s.Hops, &s.MinCoverage, &s.Blocks.LostS} {
		*f = orZero(*f)
	}
	for _, q := range []*Quantiles{&s.E2E, &s.TTFT, &s.PerToken} {
		for _, f := range []*float64{&q.Mean, &q.P50, &q.P90, &q.P95, &q.P99, &q.Max} {
			*f = orZero(*f)
		}
	}
	if c.Params == nil {
		c.Params = []string{}
	}
	b, err := json.MarshalIndent(&c, "", "  ")
	if err != nil {
		return fmt.Errorf("simulations: summary.json: %w", err)
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// orZero is f, or 0 when f is NaN or infinite.
func orZero(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return 0
	}
	return f
}

func writeCSV(path string, rows [][]string) error {
	var buf bytes.Buffer
	w := csv.NewWriter(&buf)
	if err := w.WriteAll(rows); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// ff formats a float for CSV: shortest exact form.
func ff(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// interval is the length of sample i's interval (the first starts at 0).
func interval(series []Sample, i int) float64 {
	if i == 0 {
		return series[0].T
	}
	return series[i].T - series[i-1].T
}

// perSec is n over dt seconds, 0 when dt is not positive.
func perSec(n int, dt float64) float64 {
	if dt <= 0 {
		return 0
	}
	return float64(n) / dt
}

func seriesRows(series []Sample) [][]string {
	rows := [][]string{{"t_s", "interval_s", "arrivals", "completed", "failed", "failovers", "tokens",
		"peers", "inflight", "coverage", "p50_s", "p95_s", "completed_per_s", "tokens_per_s"}}
	for i, s := range series {
		dt := interval(series, i)
		rows = append(rows, []string{ff(s.T), ff(dt), strconv.Itoa(s.Arrivals), strconv.Itoa(s.Completed),
			strconv.Itoa(s.Failed), strconv.Itoa(s.Failovers), strconv.Itoa(s.Tokens), strconv.Itoa(s.Peers),
			strconv.Itoa(s.InFlight), ff(s.Coverage), ff(s.P50), ff(s.P95),
			ff(perSec(s.Completed, dt)), ff(perSec(s.Tokens, dt))})
	}
	return rows
}

func peerRows(peers []PeerStat) [][]string {
	rows := [][]string{{"id", "class", "region", "passes", "busy", "online_s", "failed"}}
	for _, p := range peers {
		rows = append(rows, []string{strconv.Itoa(p.ID), p.Class, p.Region, strconv.FormatInt(p.Passes, 10),
			ff(p.Busy), ff(p.Online), strconv.Itoa(p.Failed)})
	}
	return rows
}

// latencyRows is the three latency CDFs at quantiles 0, 0.001, ..., 1: a
// cell is the latency below or at which that fraction of the requests
// finished, empty where a distribution has no entries. The requests are
// the completed ones and the unfinished ones (unfinished of them, l's
// entries first) at their lower bounds; a *_lower_bound column is true
// where the cell beside it is only a lower bound (censoredQuantiles' rule).
func latencyRows(l *Latencies, unfinished int) [][]string {
	sets := latencySets(l, unfinished)
	var cs [3]censored
	for i, set := range sets {
		cs[i] = newCensored(set.done, set.low)
	}
	rows := [][]string{{"quantile", "e2e_s", "ttft_s", "per_token_s", "e2e_lower_bound", "ttft_lower_bound", "per_token_lower_bound"}}
	for i := 0; i <= cdfPoints; i++ {
		row := []string{strconv.FormatFloat(float64(i)/cdfPoints, 'f', 3, 64), "", "", "", "", "", ""}
		for j, c := range cs {
			if len(c.v) == 0 {
				continue
			}
			v, low, _ := c.at(float64(i) / cdfPoints)
			row[1+j], row[4+j] = ff(v), strconv.FormatBool(low)
		}
		rows = append(rows, row)
	}
	return rows
}

// quantileGrid returns the values of xs at quantiles i/n for i = 0..n
// (nearest rank; 0 is the minimum, 1 the maximum), or nil when xs holds
// no finite value. xs is not modified.
func quantileGrid(xs []float64, n int) []float64 {
	s := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			s = append(s, x)
		}
	}
	if len(s) == 0 {
		return nil
	}
	slices.Sort(s)
	g := make([]float64, n+1)
	for i := range g {
		g[i] = s[rankIndex(float64(i)/float64(n), len(s))]
	}
	return g
}

// rankIndex is the nearest-rank index of quantile q among n sorted values.
func rankIndex(q float64, n int) int {
	k := int(math.Ceil(q*float64(n))) - 1
	return min(max(k, 0), n-1)
}

// reportMarkdown is report.md: plots lists the plots written, by file
// stem, with why a plot was skipped for those that were not.
func reportMarkdown(r *Result, plots []plotFile) []byte {
	var b strings.Builder
	s := &r.Summary
	fmt.Fprintf(&b, "# Simulation report: %s\n\n", mdEscape(nameOr(r.Scenario, "unnamed scenario")))
	fmt.Fprintf(&b, "Seed %d, %s of virtual time, %s discrete events.\n\n",
		r.Seed, fmtVirtual(r.Duration), commas(s.Events))

	b.WriteString("## Parameters\n\n")
	if len(r.Params) == 0 {
		b.WriteString("(none recorded)\n")
	}
	for _, p := range r.Params {
		fmt.Fprintf(&b, "- %s\n", mdEscape(p))
	}

	b.WriteString("\n## Headline figures\n\n| Figure | Value |\n|---|---:|\n")
	for _, m := range reportMetrics() {
		fmt.Fprintf(&b, "| %s | %s |\n", m.label, formatBound(m, s))
	}
	if l := boundLegend(s); l != "" {
		fmt.Fprintf(&b, "\n%s\n", l)
	}

	b.WriteString("\n## Key numbers\n\n")
	b.WriteString(keyNumbers(r))
	if s.Load.Peers > 0 {
		b.WriteString(loadSection(s))
	}

	b.WriteString("\n## Plots\n\n")
	for _, p := range plots {
		fmt.Fprintf(&b, "### %s\n\n", p.title)
		if p.skipped != "" {
			fmt.Fprintf(&b, "Not drawn: %s.\n\n", p.skipped)
			continue
		}
		fmt.Fprintf(&b, "![%s](%s.svg)\n\n%s (PNG: [%s.png](%s.png))\n\n", p.title, p.stem, p.caption, p.stem, p.stem)
	}

	b.WriteString("## Files\n\n" +
		"- `summary.json`: the scenario, seed, duration, parameters and the figures above\n" +
		fmt.Sprintf("- `series.csv`: one row per sample interval (%d rows)\n", len(r.Series)) +
		fmt.Sprintf("- `peers.csv`: one row per peer that was ever in the mesh (%d rows)\n", len(r.Peers)) +
		"- `latency.csv`: end-to-end, time-to-first-token and per-token latency at quantiles 0, 0.001, ..., 1, " +
		"each with a column saying whether it is only a lower bound (unfinished requests)\n")
	return []byte(b.String())
}

// keyNumbers states the run's main figures as sentences.
func keyNumbers(r *Result) string {
	s := &r.Summary
	var b strings.Builder
	fmt.Fprintf(&b, "Over %s of virtual time, %s. The mesh completed %s requests/s",
		fmtVirtual(r.Duration), requestCounts(s, " arrived"), fmtRate(s.Throughput))
	if s.TokensPerSec > 0 {
		fmt.Fprintf(&b, " and generated %s tokens/s", fmtRate(s.TokensPerSec))
	}
	b.WriteString(".\n\n")

	if s.E2E.N == 0 {
		b.WriteString("No request completed, so there are no latency figures.\n\n")
	} else {
		e, t, k := &s.E2E, &s.TTFT, &s.PerToken
		fmt.Fprintf(&b, "End-to-end latency: median %s, p95 %s, p99 %s (mean %s, max %s).",
			fmtBound(e.P50, e.LowerBound.P50, e.UpperBound.P50), fmtBound(e.P95, e.LowerBound.P95, e.UpperBound.P95),
			fmtBound(e.P99, e.LowerBound.P99, e.UpperBound.P99), fmtBound(e.Mean, e.LowerBound.Mean, 0), fmtBound(e.Max, e.LowerBound.Max, 0))
		if t.N == 0 {
			b.WriteString(" There were no completed generation requests, so no time to first token or per-token latency.")
		} else {
			fmt.Fprintf(&b, " Time to first token: median %s, p95 %s, p99 %s. Per output token after the first: median %s, p95 %s, p99 %s.",
				fmtBound(t.P50, t.LowerBound.P50, t.UpperBound.P50), fmtBound(t.P95, t.LowerBound.P95, t.UpperBound.P95),
				fmtBound(t.P99, t.LowerBound.P99, t.UpperBound.P99), fmtBound(k.P50, k.LowerBound.P50, k.UpperBound.P50),
				fmtBound(k.P95, k.LowerBound.P95, k.UpperBound.P95), fmtBound(k.P99, k.LowerBound.P99, k.UpperBound.P99))
		}
		if l := boundLegend(s); l != "" {
			b.WriteString(" " + l)
		}
		b.WriteString("\n\n")
	}

	fmt.Fprintf(&b, "Routes averaged %.2f hops; %s hops were replaced mid-request (failovers) and %s session steps were replayed on replacements. ",
		orZero(s.Hops), commas(s.Failovers), commas(s.Replays))
	if s.Resumes > 0 {
		fmt.Fprintf(&b, "%s decode-ring steps a hop refused busy were sent again on the same route (resumes, not failovers). ", commas(s.Resumes))
	}
	fmt.Fprintf(&b, "The mesh went from %s to %s peers (%s joined, %s left, %s moved to another span); the lowest block coverage at any sample was %s. ",
		commas(s.PeersStart), commas(s.PeersEnd), commas(s.Joins), commas(s.Leaves), commas(s.Moves), fmtPercent(s.MinCoverage))
	fmt.Fprintf(&b, "%s\n", blockLoss(&s.Blocks, true))

	if len(r.Peers) > 0 {
		busy := make([]float64, len(r.Peers))
		var sum float64
		worked := 0
		for i, p := range r.Peers {
			busy[i] = orZero(p.Busy)
			sum += busy[i]
			if p.Passes > 0 {
				worked++
			}
		}
		g := quantileGrid(busy, 100)
		fmt.Fprintf(&b, "\nPeer load (fraction of its online time a peer computed): mean %s, median %s, p90 %s, busiest %s; %s of the %s peers (%s) ran at least one block pass.\n",
			fmtPercent(sum/float64(len(busy))), fmtPercent(g[50]), fmtPercent(g[90]), fmtPercent(g[100]),
			commas(worked), commas(len(r.Peers)), fmtPercent(float64(worked)/float64(len(r.Peers))))
	}
	return b.String()
}

func nameOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// mdEscape keeps a free-text value from breaking a Markdown table or list.
func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

// commas writes an integer with thousands separators: 1,234,567.
func commas[T ~int | ~int64](n T) string {
	s := strconv.FormatInt(int64(n), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// sig3 writes v with about three significant figures, no exponent.
func sig3(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

// fmtSeconds writes a latency in the unit that suits it: µs, ms or s.
func fmtSeconds(s float64) string {
	s = orZero(s)
	a := math.Abs(s)
	switch {
	case a == 0:
		return "0 s"
	case a < 1e-3:
		return sig3(s*1e6) + " µs"
	case a < 1:
		return sig3(s*1e3) + " ms"
	default:
		return sig3(s) + " s"
	}
}

// fmtVirtual writes a span of virtual time: seconds, with hours or days
// alongside when long.
func fmtVirtual(s float64) string {
	s = orZero(s)
	switch {
	case s >= 2*86400:
		return fmt.Sprintf("%s s (%.1f days)", commas(int64(math.Round(s))), s/86400)
	case s >= 2*3600:
		return fmt.Sprintf("%s s (%.1f h)", commas(int64(math.Round(s))), s/3600)
	case s >= 120:
		return fmt.Sprintf("%s s (%.1f min)", commas(int64(math.Round(s))), s/60)
	default:
		return sig3(s) + " s"
	}
}

func fmtPercent(f float64) string { return strconv.FormatFloat(100*orZero(f), 'f', 2, 64) + " %" }

func fmtRate(f float64) string {
	f = orZero(f)
	if math.Abs(f) >= 1000 {
		return commas(int64(math.Round(f)))
	}
	return sig3(f)
}

// Headline is r's main figures in a few lines of plain text, for a
// terminal.
func Headline(r *Result) string {
	r = r.settled()
	s := &r.Summary
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s virtual; %s; %s req/s, %s tokens/s\n", nameOr(r.Scenario, "scenario"),
		fmtVirtual(r.Duration), requestCounts(s, ""), fmtRate(s.Throughput), fmtRate(s.TokensPerSec))
	if e, t := &s.E2E, &s.TTFT; e.N > 0 {
		fmt.Fprintf(&b, "end-to-end p50 %s, p95 %s, p99 %s", fmtBound(e.P50, e.LowerBound.P50, e.UpperBound.P50),
			fmtBound(e.P95, e.LowerBound.P95, e.UpperBound.P95), fmtBound(e.P99, e.LowerBound.P99, e.UpperBound.P99))
		if t.N > 0 {
			k := &s.PerToken
			fmt.Fprintf(&b, "; first token p50 %s, p95 %s; per token p50 %s", fmtBound(t.P50, t.LowerBound.P50, t.UpperBound.P50),
				fmtBound(t.P95, t.LowerBound.P95, t.UpperBound.P95), fmtBound(k.P50, k.LowerBound.P50, k.UpperBound.P50))
		}
		b.WriteString("\n")
		if boundLegend(s) != "" {
			fmt.Fprintf(&b, "a – b: between a and b; ≥: at least (the %s unfinished requests count at their latency so far; see report.md)\n", commas(s.Unfinished))
		}
	}
	resumes := ""
	if s.Resumes > 0 {
		resumes = fmt.Sprintf(", %s resumes", commas(s.Resumes))
	}
	fmt.Fprintf(&b, "%.2f hops per route, %s failovers%s, %s replays; peers %s -> %s, lowest coverage %s; %s\n",
		orZero(s.Hops), commas(s.Failovers), resumes, commas(s.Replays), commas(s.PeersStart), commas(s.PeersEnd), fmtPercent(s.MinCoverage),
		blockLoss(&s.Blocks, false))
	if l := &s.Load; l.Peers > 0 {
		fmt.Fprintf(&b, "load: %s of %s peers served (%s); utilisation of the %s holders p50 %s, p99 %s (of those that served p50 %s, p99 %s); %s\n",
			commas(l.Serving), commas(l.Peers), fmtPercent(l.ServingShare), commas(l.Holders), fmtPercent(l.P50), fmtPercent(l.P99),
			fmtPercent(l.ServingP50), fmtPercent(l.ServingP99), worstRatio(l))
	}
	if c := &s.Capacity; c.Block >= 0 {
		fmt.Fprintf(&b, "throughput %s of the bottleneck capacity, %s req/s (block %d); %s of the mesh's over partial spans, %s req/s\n",
			fmtPercent(c.Share), fmtRate(c.RPS), c.Block, fmtPercent(c.FlowShare), fmtRate(c.FlowRPS))
	}
	return b.String()
}

// blockLoss says how many blocks the mesh lost (BlockLoss), in a sentence
// for report.md (long) or a clause for the headline.
func blockLoss(l *BlockLoss, long bool) string {
	if !long {
		return fmt.Sprintf("blocks lost %s (%s with room), fewest holders %d", commas(l.Lost), commas(l.LostWithRoom), l.MinHolders)
	}
	if l.Lost == 0 {
		return fmt.Sprintf("No block lost its last online holder; the fewest holders of a block at any sample was %d.", l.MinHolders)
	}
	return fmt.Sprintf("Blocks lost their last online holder %s times (%s of them while the live peers could hold the whole model), "+
		"%.0f block-seconds without a holder; the fewest holders of a block at any sample was %d.", commas(l.Lost),
		commas(l.LostWithRoom), l.LostS, l.MinHolders)
}

// worstRatio is "worst 1.8x its blocks' median, 0 holders above 2x (0
// on idle medians)".
func worstRatio(l *LoadSpread) string {
	t := "no holder computed beside a busy median"
	if l.WorstPeer >= 0 {
		t = fmt.Sprintf("worst %.2fx its blocks' median (peer %d)", l.WorstRatio, l.WorstPeer)
	}
	return t + fmt.Sprintf(", %s holders above 2x (%s of them where the median is 0)", commas(l.OverTwice), commas(l.Unbounded))
}

// loadSection is report.md's section on how the work spread over the
// peers and the capacity it had (load.go).
func loadSection(s *Summary) string {
	l, c := &s.Load, &s.Capacity
	var b strings.Builder
	b.WriteString("\n## Load spread\n\n" +
		"A peer's utilisation is its compute time (the pass time of every pass it ran, queueing not counted) over its time " +
		"online times its slots. Holders are the peers that held a span when they left or the run ended.\n\n" +
		"| Figure | Value |\n|---|---:|\n")
	fmt.Fprintf(&b, "| Peers that ran any pass | %s of %s (%s) |\n", commas(l.Serving), commas(l.Peers), fmtPercent(l.ServingShare))
	fmt.Fprintf(&b, "| Utilisation of the %s holders, p50 / p99 / max | %s / %s / %s |\n", commas(l.Holders),
		fmtPercent(l.P50), fmtPercent(l.P99), fmtPercent(l.Max))
	fmt.Fprintf(&b, "| Utilisation of the peers that ran any pass, p50 / p99 | %s / %s |\n", fmtPercent(l.ServingP50), fmtPercent(l.ServingP99))
	worst := "none"
	if l.WorstPeer >= 0 {
		worst = fmt.Sprintf("%.2fx (peer %d)", l.WorstRatio, l.WorstPeer)
	}
	fmt.Fprintf(&b, "| Worst ratio to the median utilisation of the peer's blocks' holders | %s |\n", worst)
	fmt.Fprintf(&b, "| Holders above 2x that median (of them, on blocks whose median is 0) | %s (%s) |\n", commas(l.OverTwice), commas(l.Unbounded))
	if c.Block >= 0 {
		fmt.Fprintf(&b, "| Bottleneck capacity (block %d) | %s req/s |\n", c.Block, fmtRate(c.RPS))
		fmt.Fprintf(&b, "| Throughput over that capacity | %s |\n", fmtPercent(c.Share))
		fmt.Fprintf(&b, "| The mesh's capacity over partial spans | %s req/s |\n", fmtRate(c.FlowRPS))
		fmt.Fprintf(&b, "| Throughput over that capacity | %s |\n", fmtPercent(c.FlowShare))
		b.WriteString("\nThe capacity of a block is what its online holders could run of this workload, averaged over the samples: " +
			"Σ slots / (block time × W), W = 1 + (mean prompt − 1) × prefill factor + generate share × (mean output − 1), " +
			"the mean passes of a request in single-token pass times; the bottleneck is the block with the least. " +
			"Throughput reaches it only when the offered load exceeds it. " +
			"A route may run part of a peer's span, which costs it less: the mesh's capacity over partial spans is the most " +
			"requests/s the peers could run through every block with each one's time split among its blocks as routes best split it " +
			"(a max flow), at least the bottleneck block's.\n")
	}
	return b.String()
}

// requestCounts is "3,081 requests<verb>: 3,020 completed, 0 failed, 61
// unfinished at the end (completion 98.02 %)", the completion rate when
// any request arrived.
func requestCounts(s *Summary, verb string) string {
	t := fmt.Sprintf("%s requests%s: %s completed, %s failed, %s unfinished at the end",
		commas(s.Requests), verb, commas(s.Completed), commas(s.Failed), commas(s.Unfinished))
	if s.Requests > 0 {
		t += fmt.Sprintf(" (completion %s)", fmtPercent(s.CompletionRate))
	}
	return t
}

// fmtBound is a latency: "a – b" when it is only known to lie between a
// and b (upper > 0), "≥ a" when only a lower bound.
func fmtBound(v float64, lower bool, upper float64) string {
	switch {
	case lower && upper > v:
		return fmtSeconds(v) + " – " + fmtSeconds(upper)
	case lower:
		return "≥ " + fmtSeconds(v)
	}
	return fmtSeconds(v)
}

// boundLegend explains "≥" when a latency figure of s is a lower bound,
// and is empty otherwise.
func boundLegend(s *Summary) string {
	if s.E2E.LowerBound == (Bounds{}) && s.TTFT.LowerBound == (Bounds{}) && s.PerToken.LowerBound == (Bounds{}) {
		return ""
	}
	return fmt.Sprintf("≥ marks a lower bound, and a – b a range: %s requests were unfinished at the end of the run, and each counts at its latency so far "+
		"(end of run − submission; per token, the time since its first token over its tokens after the first, 0 before the first), "+
		"so a percentile is exact only where its rank falls on a completed request no slower than every unfinished one so far; "+
		"otherwise it lies between that lower bound and the completed latency at its rank, had every unfinished request run forever "+
		"(no upper bound when its rank falls among them); the mean and maximum are lower bounds.", commas(s.Unfinished))
}

// reportMetrics is the figures of a report's and a comparison's table:
// headline's, with the unfinished requests after the failed ones.
func reportMetrics() []metric {
	unfinished := metric{name: "unfinished", label: "Requests unfinished at the end", kind: kindCount,
		get: func(s *Summary) float64 { return float64(s.Unfinished) }}
	var ms []metric
	for _, m := range headline() {
		ms = append(ms, m)
		if m.name == "failed" {
			ms = append(ms, unfinished)
		}
	}
	return ms
}

// lowerBound says whether m's value in s is only a lower bound: a latency
// figure ("e2e_p95", ...) censoring bounds.
func lowerBound(m metric, s *Summary) bool {
	lower, _ := bounds(m, s)
	return lower
}

// bounds says whether m's value in s is only a lower bound, and then its
// upper bound (0: none).
func bounds(m metric, s *Summary) (lower bool, upper float64) {
	if m.kind != kindSeconds || !m.available(s) {
		return false, 0
	}
	for _, q := range []struct {
		prefix string
		q      *Quantiles
	}{{"e2e_", &s.E2E}, {"ttft_", &s.TTFT}, {"per_token_", &s.PerToken}} {
		if stat, ok := strings.CutPrefix(m.name, q.prefix); ok {
			lb, ub := &q.q.LowerBound, &q.q.UpperBound
			switch stat {
			case "mean":
				return lb.Mean, 0
			case "p50":
				return lb.P50, ub.P50
			case "p90":
				return lb.P90, ub.P90
			case "p95":
				return lb.P95, ub.P95
			case "p99":
				return lb.P99, ub.P99
			case "max":
				return lb.Max, 0
			}
		}
	}
	return false, 0
}

// formatBound is m.format(s), as a range "a – b" when it is only known to
// lie between, after "≥ " when only a lower bound.
func formatBound(m metric, s *Summary) string {
	switch lower, upper := bounds(m, s); {
	case lower && upper > m.get(s):
		return m.format(s) + " – " + fmtSeconds(upper)
	case lower:
		return "≥ " + m.format(s)
	}
	return m.format(s)
}
