package simulations

// Comparison of runs: comparison.md (the headline figures side by side,
// and each run's ratio to the first) and comparison_cdf.png/.svg (the
// runs' latency CDFs overlaid). Figures count unfinished requests as
// reports do (Result.settled): "≥" marks a lower bound, and a ratio
// involving one says which way it bounds.

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// WriteComparison writes the comparison of rs, named by names, into dir
// (created if missing). The first run is the baseline: every other column
// of ratios is run / first. It writes no per-run reports; callers that
// want them call WriteReport for each.
func WriteComparison(dir string, names []string, rs []*Result) error {
	if len(rs) < 2 || len(names) != len(rs) {
		return fmt.Errorf("simulations: WriteComparison: want two or more results and one name each (got %d results, %d names)", len(rs), len(names))
	}
	settled := make([]*Result, len(rs))
	for i, r := range rs {
		if r == nil {
			return fmt.Errorf("simulations: WriteComparison: result %d (%s) is nil", i, names[i])
		}
		settled[i] = r.settled()
	}
	rs = settled
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	drawn, err := writeComparisonPlot(dir, names, rs)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "comparison.md"), comparisonMarkdown(names, rs, drawn), 0o644)
}

func comparisonMarkdown(names []string, rs []*Result, drawn bool) []byte {
	var b strings.Builder
	esc := make([]string, len(names))
	for i, n := range names {
		esc[i] = mdEscape(n)
	}
	fmt.Fprintf(&b, "# Comparison: %s\n\n", strings.Join(esc, " vs "))
	for i, r := range rs {
		fmt.Fprintf(&b, "- **%s**: scenario %s, seed %d, %s of virtual time\n", esc[i],
			mdEscape(nameOr(r.Scenario, "unnamed")), r.Seed, fmtVirtual(r.Duration))
	}
	b.WriteString(paramsDiff(esc, rs))
	b.WriteString("\n## Headline figures\n\n| Figure |")
	for _, n := range esc {
		fmt.Fprintf(&b, " %s |", n)
	}
	for _, n := range esc[1:] {
		fmt.Fprintf(&b, " %s / %s |", n, esc[0])
	}
	b.WriteString("\n|---|")
	for range len(rs) + len(rs) - 1 {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	for _, m := range reportMetrics() {
		fmt.Fprintf(&b, "| %s |", m.label)
		for _, r := range rs {
			fmt.Fprintf(&b, " %s |", formatBound(m, &r.Summary))
		}
		for _, r := range rs[1:] {
			fmt.Fprintf(&b, " %s |", ratioText(m, &rs[0].Summary, &r.Summary))
		}
		b.WriteString("\n")
	}
	for i, r := range rs {
		if l := boundLegend(&r.Summary); l != "" {
			fmt.Fprintf(&b, "\n%s: %s\n", esc[i], l)
		}
	}

	b.WriteString("\n## Key differences\n\n")
	for i, r := range rs[1:] {
		fmt.Fprintf(&b, "- %s against %s: %s.\n", esc[i+1], esc[0], differences(&rs[0].Summary, &r.Summary))
	}

	if drawn {
		b.WriteString("\n## Latency\n\n![Latency CDFs overlaid](comparison_cdf.svg)\n\n" +
			"End-to-end latency (solid) and time to first token (dashed) of each run; PNG: [comparison_cdf.png](comparison_cdf.png).\n")
	} else {
		b.WriteString("\nNo latency plot: no run completed a request.\n")
	}
	return []byte(b.String())
}

// paramsDiff is the runs' parameters: a table of those that differ, then
// a list of those common to all. A parameter is a Params line "name:
// value"; a line without ": " is all name.
func paramsDiff(names []string, rs []*Result) string {
	var order []string
	vals := map[string][]string{}
	for i, r := range rs {
		for _, p := range r.Params {
			k, v, _ := strings.Cut(p, ": ")
			if _, ok := vals[k]; !ok {
				order = append(order, k)
				vals[k] = make([]string, len(rs))
				for j := range vals[k] {
					vals[k][j] = "–"
				}
			}
			vals[k][i] = v
		}
	}
	if len(order) == 0 {
		return ""
	}
	var diff, same strings.Builder
	for _, k := range order {
		v := vals[k]
		if slices.Equal(v, slices.Repeat(v[:1], len(v))) {
			fmt.Fprintf(&same, "- %s: %s\n", mdEscape(k), mdEscape(v[0]))
			continue
		}
		fmt.Fprintf(&diff, "| %s |", mdEscape(k))
		for _, x := range v {
			fmt.Fprintf(&diff, " %s |", mdEscape(x))
		}
		diff.WriteString("\n")
	}
	var b strings.Builder
	b.WriteString("\n## Parameters\n\n")
	if diff.Len() > 0 {
		b.WriteString("Where the runs differ:\n\n| Parameter |")
		for _, n := range names {
			fmt.Fprintf(&b, " %s |", n)
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(names)) + "\n" + diff.String() + "\n")
	}
	if same.Len() > 0 {
		b.WriteString("Common to all runs:\n\n" + same.String())
	}
	return b.String()
}

// ratio is b's metric over a's; ok is false when either is missing or a is
// zero.
func ratio(m metric, a, b *Summary) (float64, bool) {
	if !m.available(a) || !m.available(b) {
		return 0, false
	}
	av, bv := orZero(m.get(a)), orZero(m.get(b))
	if av == 0 {
		return 0, false
	}
	return bv / av, true
}

// ratioText is b's metric over a's, "≥" before it when b's is a lower
// bound and a's exact (the true ratio is at least that), "≤" in the
// opposite case, and "?" after it when both are lower bounds (the true
// ratio may be either side).
func ratioText(m metric, a, b *Summary) string {
	r, ok := ratio(m, a, b)
	if !ok {
		return "–"
	}
	t := fmt.Sprintf("%.2f×", r)
	switch la, lb := lowerBound(m, a), lowerBound(m, b); {
	case la && lb:
		return t + " ?"
	case lb:
		return "≥ " + t
	case la:
		return "≤ " + t
	}
	return t
}

// differences is a sentence comparing b's latency, completion and
// throughput with a's.
func differences(a, b *Summary) string {
	var parts []string
	for _, name := range []string{"e2e_p50", "e2e_p95", "ttft_p50", "ttft_p95", "per_token_p50"} {
		ms, _ := lookupMetrics([]string{name})
		m := ms[0]
		r, ok := ratio(m, a, b)
		if !ok {
			continue
		}
		parts = append(parts, fmt.Sprintf("%s %s vs %s (%s)", strings.ToLower(m.label), formatBound(m, b), formatBound(m, a),
			change(r, lowerBound(m, a), lowerBound(m, b))))
	}
	for _, name := range []string{"completion_rate", "throughput_rps"} {
		ms, _ := lookupMetrics([]string{name})
		if m := ms[0]; m.available(a) && m.available(b) {
			parts = append(parts, fmt.Sprintf("%s %s vs %s", strings.ToLower(m.label), m.format(b), m.format(a)))
		}
	}
	if len(parts) == 0 {
		return "no figure to compare"
	}
	return strings.Join(parts, "; ")
}

// change says how a figure of ratio r to the baseline's differs from it:
// "21% higher". When the figure is only a lower bound (lb; the true ratio
// is at least r) or the baseline's is (la; at most r), it says what that
// bound allows: "at least 21% higher", "at most 21% lower"; when both are,
// the ratio settles nothing.
func change(r float64, la, lb bool) string {
	lower, higher := r < 0.995, r > 1.005
	pct := fmt.Sprintf("%.0f%%", 100*math.Abs(1-r))
	switch {
	case la && lb:
		return "both lower bounds: not settled"
	case lb && higher:
		return "at least " + pct + " higher"
	case la && lower:
		return "at least " + pct + " lower"
	case lb && lower:
		return "at most " + pct + " lower"
	case la && higher:
		return "at most " + pct + " higher"
	case lb:
		return "the same or higher"
	case la:
		return "the same or lower"
	case lower:
		return pct + " lower"
	case higher:
		return pct + " higher"
	}
	return "the same"
}

func writeComparisonPlot(dir string, names []string, rs []*Result) (bool, error) {
	var lines []cdfLine
	for i, r := range rs {
		lines = append(lines,
			cdfLine{label: names[i] + " end-to-end", xs: r.Latencies.E2E, style: i},
			cdfLine{label: names[i] + " first token", xs: r.Latencies.TTFT, style: i, dashed: true})
	}
	p, ok, err := cdfFigure("Latency CDF: "+strings.Join(names, " vs "), lines)
	if err != nil || !ok {
		return false, err
	}
	return true, savePlot(dir, "comparison_cdf", plotW, plotH, single(p))
}
