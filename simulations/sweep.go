package simulations

// Sweeps: one scenario run once per value of one parameter, and the
// metrics a sweep can plot against it. A sweep directory holds
//
//	sweep.csv        one row per value, every metric of sweepMetrics
//	sweep.md         the chosen metrics per value, the plot, links to each run
//	sweep.png/.svg   the chosen metrics against the parameter, one panel each
//	PARAM=VALUE/     each value's own report (WriteReport)

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// SweepResult is a scenario run once per value of one parameter.
type SweepResult struct {
	Scenario string    // the scenario's name
	Param    string    // the YAML path swept, e.g. "churn.leave_per_hour"
	Values   []string  // the values, as given
	Results  []*Result // Results[i] ran with Param = Values[i]
}

// ErrUnknownMetric is returned for a metric name not in the sweep metrics
// table; the error's text lists the known names.
var ErrUnknownMetric = errors.New("unknown metric")

// Sweep runs a copy of sc per value, with param set to that value by
// (*Scenario).Set; sc itself is not changed. The runs are one after the
// other; opts.Progress, when set, sees the whole sweep as one run (done and
// total summed over the values).
func Sweep(ctx context.Context, sc *Scenario, param string, values []string, opts RunOptions) (*SweepResult, error) {
	if len(values) == 0 {
		return nil, fmt.Errorf("simulations: sweep of %s: no values", param)
	}
	scs := make([]*Scenario, len(values))
	for i, v := range values {
		c := sc.Clone()
		if err := c.Set(param, v); err != nil {
			return nil, fmt.Errorf("simulations: sweep: %s=%s: %w", param, v, err)
		}
		scs[i] = c
	}
	sr := &SweepResult{Scenario: sc.Name, Param: param, Values: append([]string(nil), values...)}
	for i, c := range scs {
		o := opts
		if opts.Progress != nil {
			i, n := float64(i), float64(len(scs))
			o.Progress = func(done, total float64) { opts.Progress(i*total+done, n*total) }
		}
		r, err := Run(ctx, c, o)
		if err != nil {
			return nil, fmt.Errorf("simulations: sweep: %s=%s: %w", param, values[i], err)
		}
		sr.Results = append(sr.Results, r)
	}
	return sr, nil
}

// metricKind says how a metric reads: its format and axis unit.
type metricKind int

const (
	kindCount   metricKind = iota // a whole number
	kindRatio                     // a fraction, shown as a percentage
	kindRate                      // per second
	kindSeconds                   // a latency
	kindNumber                    // a plain number
)

// metric is one figure of a Summary, by the name sweeps and comparisons
// use.
type metric struct {
	name, label, unit string
	kind              metricKind
	get               func(*Summary) float64
	// avail is false when the figure does not exist for the run (no
	// completed generation request ⇒ no TTFT); nil means always.
	avail func(*Summary) bool
}

func (m metric) available(s *Summary) bool { return m.avail == nil || m.avail(s) }

// format writes the metric's value for a report table.
func (m metric) format(s *Summary) string {
	if !m.available(s) {
		return "–"
	}
	v := orZero(m.get(s))
	switch m.kind {
	case kindCount:
		return commas(int64(math.Round(v)))
	case kindRatio:
		return fmtPercent(v)
	case kindRate:
		return fmtRate(v) + " " + m.unit
	case kindSeconds:
		return fmtSeconds(v)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

// axisValue is the metric's value in its axis unit (percent for ratios).
func (m metric) axisValue(s *Summary) float64 {
	v := orZero(m.get(s))
	if m.kind == kindRatio {
		return 100 * v
	}
	return v
}

func (m metric) axisLabel() string {
	switch m.kind {
	case kindRatio:
		return m.label + " (%)"
	case kindCount, kindNumber:
		return m.label
	default:
		return m.label + " (" + m.unit + ")"
	}
}

// sweepMetrics is the table of metric names, in report order.
var sweepMetrics = func() []metric {
	ms := []metric{
		{name: "requests", label: "Requests arrived", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Requests) }},
		{name: "completed", label: "Requests completed", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Completed) }},
		{name: "failed", label: "Requests failed", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Failed) }},
		{name: "completion_rate", label: "Completion rate", kind: kindRatio, get: func(s *Summary) float64 { return s.CompletionRate },
			avail: func(s *Summary) bool { return s.Completed+s.Failed > 0 }},
		{name: "throughput_rps", label: "Throughput", unit: "req/s", kind: kindRate, get: func(s *Summary) float64 { return s.Throughput }},
		{name: "tokens_per_s", label: "Tokens generated", unit: "tokens/s", kind: kindRate, get: func(s *Summary) float64 { return s.TokensPerSec }},
	}
	for _, q := range []struct {
		prefix, label string
		get           func(*Summary) *Quantiles
	}{
		{"e2e", "End-to-end latency", func(s *Summary) *Quantiles { return &s.E2E }},
		{"ttft", "Time to first token", func(s *Summary) *Quantiles { return &s.TTFT }},
		{"per_token", "Per-token latency", func(s *Summary) *Quantiles { return &s.PerToken }},
	} {
		avail := func(s *Summary) bool { return q.get(s).N > 0 }
		for _, p := range []struct {
			name string
			get  func(*Quantiles) float64
		}{
			{"mean", func(x *Quantiles) float64 { return x.Mean }},
			{"p50", func(x *Quantiles) float64 { return x.P50 }},
			{"p90", func(x *Quantiles) float64 { return x.P90 }},
			{"p95", func(x *Quantiles) float64 { return x.P95 }},
			{"p99", func(x *Quantiles) float64 { return x.P99 }},
			{"max", func(x *Quantiles) float64 { return x.Max }},
		} {
			ms = append(ms, metric{name: q.prefix + "_" + p.name, label: q.label + " " + p.name, unit: "s",
				kind: kindSeconds, get: func(s *Summary) float64 { return p.get(q.get(s)) }, avail: avail})
		}
	}
	return append(ms,
		metric{name: "hops", label: "Mean hops per route", kind: kindNumber, get: func(s *Summary) float64 { return s.Hops },
			avail: func(s *Summary) bool { return s.Completed+s.Failed > 0 }},
		metric{name: "failovers", label: "Failovers", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Failovers) }},
		metric{name: "replays", label: "Session replays", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Replays) }},
		metric{name: "resumes", label: "Ring steps resumed after a busy hop", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Resumes) }},
		metric{name: "peers_start", label: "Peers at start", kind: kindCount, get: func(s *Summary) float64 { return float64(s.PeersStart) }},
		metric{name: "peers_end", label: "Peers at end", kind: kindCount, get: func(s *Summary) float64 { return float64(s.PeersEnd) }},
		metric{name: "joins", label: "Peers joined", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Joins) }},
		metric{name: "leaves", label: "Peers left", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Leaves) }},
		metric{name: "moves", label: "Span moves (rebalancing)", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Moves) }},
		metric{name: "min_coverage", label: "Lowest block coverage", kind: kindRatio, get: func(s *Summary) float64 { return s.MinCoverage }},
		metric{name: "events", label: "Discrete events", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Events) }},
		metric{name: "serving_share", label: "Peers that ran any pass", kind: kindRatio, get: func(s *Summary) float64 { return s.Load.ServingShare }},
		metric{name: "util_p50", label: "Holders' utilisation p50", kind: kindRatio, get: func(s *Summary) float64 { return s.Load.P50 }},
		metric{name: "util_p99", label: "Holders' utilisation p99", kind: kindRatio, get: func(s *Summary) float64 { return s.Load.P99 }},
		metric{name: "worst_ratio", label: "Worst utilisation over its blocks' median", kind: kindNumber,
			get: func(s *Summary) float64 { return s.Load.WorstRatio }, avail: func(s *Summary) bool { return s.Load.WorstPeer >= 0 }},
		metric{name: "over_2x", label: "Holders above 2x their blocks' median", kind: kindCount, get: func(s *Summary) float64 { return float64(s.Load.OverTwice) }},
		metric{name: "capacity_rps", label: "Bottleneck capacity", unit: "req/s", kind: kindRate, get: func(s *Summary) float64 { return s.Capacity.RPS },
			avail: func(s *Summary) bool { return s.Capacity.Block >= 0 }},
		metric{name: "capacity_share", label: "Throughput over bottleneck capacity", kind: kindRatio,
			get: func(s *Summary) float64 { return s.Capacity.Share }, avail: func(s *Summary) bool { return s.Capacity.Block >= 0 }},
		metric{name: "flow_rps", label: "Mesh capacity over partial spans", unit: "req/s", kind: kindRate,
			get: func(s *Summary) float64 { return s.Capacity.FlowRPS }, avail: func(s *Summary) bool { return s.Capacity.Block >= 0 }},
		metric{name: "flow_share", label: "Throughput over the mesh capacity", kind: kindRatio,
			get: func(s *Summary) float64 { return s.Capacity.FlowShare }, avail: func(s *Summary) bool { return s.Capacity.Block >= 0 }},
	)
}()

// headlineNames are the figures of a report's and a comparison's table.
var headlineNames = []string{"requests", "completed", "failed", "completion_rate", "throughput_rps", "tokens_per_s",
	"e2e_p50", "e2e_p95", "e2e_p99", "ttft_p50", "ttft_p95", "ttft_p99", "per_token_p50", "per_token_p95", "per_token_p99",
	"hops", "failovers", "replays", "peers_start", "peers_end", "joins", "leaves", "moves", "min_coverage"}

func headline() []metric {
	ms, err := lookupMetrics(headlineNames)
	if err != nil {
		panic(err) // the two tables above disagree
	}
	return ms
}

// MetricNames lists the metric names Sweep's plots and WriteSweep accept.
func MetricNames() []string {
	names := make([]string, len(sweepMetrics))
	for i, m := range sweepMetrics {
		names[i] = m.name
	}
	return names
}

// CheckMetrics returns an error wrapping ErrUnknownMetric, listing the
// known names, when a name is not a metric.
func CheckMetrics(names []string) error {
	_, err := lookupMetrics(names)
	return err
}

func lookupMetrics(names []string) ([]metric, error) {
	var ms []metric
next:
	for _, n := range names {
		for _, m := range sweepMetrics {
			if m.name == n {
				ms = append(ms, m)
				continue next
			}
		}
		return nil, fmt.Errorf("%w %q (known: %s)", ErrUnknownMetric, n, strings.Join(MetricNames(), ", "))
	}
	return ms, nil
}

// WriteSweep writes sr into dir, created if missing: sweep.csv, sweep.md,
// the plot of metrics against the parameter (sweep.png, sweep.svg) and
// each value's report in its own sub-directory. metrics are names from
// MetricNames; none means completion_rate and e2e_p50.
func WriteSweep(dir string, sr *SweepResult, metrics []string) error {
	if sr == nil || len(sr.Results) != len(sr.Values) {
		return fmt.Errorf("simulations: WriteSweep: want one result per value")
	}
	if len(metrics) == 0 {
		metrics = []string{"completion_rate", "e2e_p50"}
	}
	chosen, err := lookupMetrics(metrics)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	subdirs := make([]string, len(sr.Values))
	seen := map[string]bool{}
	for i, v := range sr.Values {
		subdirs[i] = sweepDirName(sr.Param, v, i)
		if seen[subdirs[i]] {
			subdirs[i] = fmt.Sprintf("%s-%02d", subdirs[i], i)
		}
		seen[subdirs[i]] = true
		if err := WriteReport(filepath.Join(dir, subdirs[i]), sr.Results[i]); err != nil {
			return err
		}
	}

	rows := [][]string{append([]string{sr.Param}, MetricNames()...)}
	for i, r := range sr.Results {
		row := []string{sr.Values[i]}
		for _, m := range sweepMetrics {
			if m.available(&r.Summary) {
				row = append(row, ff(orZero(m.get(&r.Summary))))
			} else {
				row = append(row, "")
			}
		}
		rows = append(rows, row)
	}
	if err := writeCSV(filepath.Join(dir, "sweep.csv"), rows); err != nil {
		return err
	}

	drawn, err := writeSweepPlot(dir, sr, chosen)
	if err != nil {
		return err
	}

	var b strings.Builder
	fmt.Fprintf(&b, "# Sweep of %s: %s\n\n", mdEscape(sr.Param), mdEscape(nameOr(sr.Scenario, "unnamed scenario")))
	fmt.Fprintf(&b, "The scenario run once per value of `%s` (%d runs).\n\n", sr.Param, len(sr.Values))
	fmt.Fprintf(&b, "| %s |", mdEscape(sr.Param))
	for _, m := range chosen {
		fmt.Fprintf(&b, " %s |", m.label)
	}
	b.WriteString(" Report |\n|---|")
	for range chosen {
		b.WriteString("---:|")
	}
	b.WriteString("---|\n")
	for i, r := range sr.Results {
		fmt.Fprintf(&b, "| %s |", mdEscape(sr.Values[i]))
		for _, m := range chosen {
			fmt.Fprintf(&b, " %s |", m.format(&r.Summary))
		}
		fmt.Fprintf(&b, " [report](%s/report.md) |\n", subdirs[i])
	}
	if drawn {
		fmt.Fprintf(&b, "\n![%s against %s](sweep.svg)\n", strings.Join(metrics, ", "), sr.Param)
	} else {
		b.WriteString("\nNo plot: no value has any of the chosen metrics.\n")
	}
	b.WriteString("\n`sweep.csv` has every metric for every value.\n")
	return os.WriteFile(filepath.Join(dir, "sweep.md"), []byte(b.String()), 0o644)
}

// sweepDirName is a file-name-safe directory name for one value's report.
func sweepDirName(param, value string, i int) string {
	name := param + "=" + value
	safe := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-', r == '=':
			return r
		}
		return '_'
	}, name)
	if len(safe) > 100 || strings.HasPrefix(safe, ".") {
		safe = fmt.Sprintf("run-%02d", i)
	}
	return safe
}

// FormatMetric writes r's value of the named metric as a report shows it
// ("99.01 %", "1.23 s"), or "?" for an unknown name.
func FormatMetric(name string, r *Result) string {
	ms, err := lookupMetrics([]string{name})
	if err != nil {
		return "?"
	}
	return ms[0].format(&r.Summary)
}
