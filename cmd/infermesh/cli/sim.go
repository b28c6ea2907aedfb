package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/infermesh/infermesh/simulations"
)

func runSim(ctx context.Context, e *env, args []string) error {
	return dispatch(ctx, e, "infermesh sim", []command{
		{"run", "simulate a scenario and write its report (summary.json, report.md, CSV, plots)", simRun},
		{"sweep", "run a scenario once per value of one parameter and plot metrics against it", simSweep},
		{"compare", "run scenarios (or one scenario's arms) and compare them side by side", simCompare},
		{"list", "list the built-in scenarios", simList},
	}, args)
}

// setFlag collects PATH=VALUE pairs; unlike listFlag it does not split on
// commas, since a YAML value may hold them ("[1, 2]").
type setFlag [][2]string

func (s *setFlag) String() string {
	var parts []string
	for _, kv := range *s {
		parts = append(parts, kv[0]+"="+kv[1])
	}
	return strings.Join(parts, " ")
}

func (s *setFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || strings.TrimSpace(k) == "" {
		return fmt.Errorf("want PATH=VALUE, e.g. workload.rate=20")
	}
	*s = append(*s, [2]string{strings.TrimSpace(k), val})
	return nil
}

// scenarioFlags are the flags every sim command that runs takes.
type scenarioFlags struct {
	seed int64
	sets setFlag
	arm  string // with registerArm
	fs   *flag.FlagSet
}

func (f *scenarioFlags) register(fs *flag.FlagSet) {
	f.fs = fs
	fs.Int64Var(&f.seed, "seed", 0, "seed of the run (default: the scenario's)")
	fs.Var(&f.sets, "set", "change a parameter, PATH=VALUE with the YAML path and a YAML value (repeatable), e.g. churn.leave_per_hour=0.1")
}

// registerArm adds --arm, whose settings load applies after --set.
func (f *scenarioFlags) registerArm(fs *flag.FlagSet, what string) {
	fs.StringVar(&f.arm, "arm", "", what+" this arm (variant) of the scenario; its settings apply after --set")
}

// load reads a scenario (a file, or a built-in name) and applies --seed,
// --set and --arm.
func (f *scenarioFlags) load(arg string) (*simulations.Scenario, error) {
	sc, err := loadScenario(arg)
	if err != nil {
		return nil, err
	}
	for _, kv := range f.sets {
		if err := sc.Set(kv[0], kv[1]); err != nil {
			return nil, fmt.Errorf("--set %s=%s: %w", kv[0], kv[1], err)
		}
	}
	f.fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "seed" {
			sc.Seed = f.seed
		}
	})
	if f.arm != "" {
		return sc.Arm(f.arm)
	}
	return sc, nil
}

// loadScenario reads the scenario file arg or, when no such file exists,
// the built-in scenario of that name.
func loadScenario(arg string) (*simulations.Scenario, error) {
	if _, err := os.Stat(arg); err == nil {
		return simulations.LoadScenario(arg)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if data, ok := simulations.Builtin(arg); ok {
		return simulations.ParseScenario(data, strings.TrimSuffix(arg, ".yaml"))
	}
	return nil, fmt.Errorf("%s: no such file, nor a built-in scenario (built-in: %s)",
		arg, strings.Join(simulations.BuiltinNames(), ", "))
}

func simRun(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh sim run", "SCENARIO --out DIR [--seed N] [--set PATH=VALUE ...] [--arm NAME]",
		"Simulates a scenario (a YAML file, or a built-in name from `infermesh sim list`) and writes its report\n"+
			"into DIR: summary.json, report.md, series.csv, peers.csv, latency.csv and the plots as PNG and SVG.")
	out := fs.String("out", "", "report directory, created if missing (required)")
	var sf scenarioFlags
	sf.register(fs)
	sf.registerArm(fs, "run")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	if *out == "" {
		fmt.Fprintf(e.stderr, "need --out DIR\n\n")
		fs.Usage()
		return errUsage
	}
	sc, err := sf.load(pos[0])
	if err != nil {
		return err
	}
	if sf.arm == "" && len(sc.Arms) > 0 {
		var as []string
		for _, a := range sc.Arms {
			as = append(as, a.Name)
		}
		fmt.Fprintf(e.stderr, "note: %s has arms (%s): --arm NAME runs one, `infermesh sim compare %s` runs and compares them\n",
			sc.Name, strings.Join(as, ", "), pos[0])
	}
	start := time.Now()
	r, err := runWithProgress(ctx, e, sc)
	if err != nil {
		return err
	}
	if err := simulations.WriteReport(*out, r); err != nil {
		return err
	}
	e.printf("%s", simulations.Headline(r))
	e.printf("report: %s (%s wall)\n", filepath.Join(*out, "report.md"), time.Since(start).Round(time.Millisecond))
	return nil
}

func simSweep(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh sim sweep", "SCENARIO --param PATH --values A,B,C --metric NAME[,NAME] --out DIR [--arm NAME] [flags]",
		"Runs a scenario once per value of one parameter and writes sweep.csv, sweep.md and a plot of the\n"+
			"metrics against the parameter into DIR, with each run's report in a sub-directory. Without --param\n"+
			"and --values, the scenario's own sweep (its `sweep:` section) is run.\n"+
			"Metrics: "+strings.Join(simulations.MetricNames(), ", "))
	out := fs.String("out", "", "output directory, created if missing (required)")
	param := fs.String("param", "", "the parameter's YAML path, e.g. churn.leave_per_hour")
	var values, metrics listFlag
	fs.Var(&values, "values", "the parameter's values, comma-separated")
	fs.Var(&metrics, "metric", "metrics to plot, comma-separated (default completion_rate,e2e_p50)")
	var sf scenarioFlags
	sf.register(fs)
	sf.registerArm(fs, "sweep")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	if *out == "" || (*param == "") != (len(values) == 0) {
		fmt.Fprintf(e.stderr, "need --out, and --param with --values (or neither)\n\n")
		fs.Usage()
		return errUsage
	}
	if err := simulations.CheckMetrics(metrics); err != nil {
		return err
	}
	sc, err := sf.load(pos[0])
	if err != nil {
		return err
	}
	if *param == "" {
		if sc.Sweep == nil || sc.Sweep.Param == "" || len(sc.Sweep.Values) == 0 {
			return fmt.Errorf("scenario %s has no sweep of its own: give --param and --values", sc.Name)
		}
		*param, values = sc.Sweep.Param, sc.Sweep.Values
	}
	start := time.Now()
	p := newProgress(e.stderr, fmt.Sprintf("sweep of %s (%d runs)", *param, len(values)))
	sr, err := simulations.Sweep(ctx, sc, *param, values, simulations.RunOptions{Progress: p.update})
	p.finish(err == nil)
	if err != nil {
		return err
	}
	if err := simulations.WriteSweep(*out, sr, metrics); err != nil {
		return err
	}
	if len(metrics) == 0 {
		metrics = []string{"completion_rate", "e2e_p50"}
	}
	for i, v := range sr.Values {
		e.printf("%s=%s:", *param, v)
		for _, m := range metrics {
			e.printf(" %s %s", m, simulations.FormatMetric(m, sr.Results[i]))
		}
		e.printf("\n")
	}
	e.printf("sweep: %s (%s wall)\n", filepath.Join(*out, "sweep.md"), time.Since(start).Round(time.Millisecond))
	return nil
}

func simCompare(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh sim compare", "SCENARIO [SCENARIO ...] --out DIR [--arms A,B] [flags]",
		"Runs several scenarios, or the arms (variants) of one scenario, and writes comparison.md (the headline\n"+
			"figures side by side, with each run's ratio to the first) and an overlaid latency CDF into DIR, and\n"+
			"each run's own report into a sub-directory.")
	out := fs.String("out", "", "output directory, created if missing (required)")
	var arms listFlag
	fs.Var(&arms, "arms", "with one scenario: the arms to run, comma-separated (default: all of them); their settings apply after --set")
	var sf scenarioFlags
	sf.register(fs)
	pos, err := parse(fs, args, 1, -1)
	if err != nil {
		return err
	}
	if *out == "" || (len(arms) > 0 && len(pos) > 1) {
		fmt.Fprintf(e.stderr, "need --out; --arms goes with one scenario\n\n")
		fs.Usage()
		return errUsage
	}
	var names []string
	var scs []*simulations.Scenario
	for _, arg := range pos {
		sc, err := sf.load(arg)
		if err != nil {
			return err
		}
		if len(pos) > 1 {
			names, scs = append(names, sc.Name), append(scs, sc)
			continue
		}
		if len(arms) == 0 {
			for _, a := range sc.Arms {
				arms = append(arms, a.Name)
			}
		}
		if len(arms) < 2 {
			return fmt.Errorf("compare needs two or more runs: give two or more scenarios, or one with two or more arms (%s: %d)", sc.Name, len(arms))
		}
		for _, a := range arms {
			c, err := sc.Arm(a)
			if err != nil {
				return err
			}
			names, scs = append(names, a), append(scs, c)
		}
	}
	names = uniqueNames(names)
	start := time.Now()
	rs := make([]*simulations.Result, len(scs))
	for i, sc := range scs {
		r, err := runWithProgress(ctx, e, sc)
		if err != nil {
			return fmt.Errorf("%s: %w", names[i], err)
		}
		if err := simulations.WriteReport(filepath.Join(*out, names[i]), r); err != nil {
			return err
		}
		rs[i] = r
		e.printf("%s", simulations.Headline(r))
	}
	if err := simulations.WriteComparison(*out, names, rs); err != nil {
		return err
	}
	e.printf("comparison: %s (%s wall)\n", filepath.Join(*out, "comparison.md"), time.Since(start).Round(time.Millisecond))
	return nil
}

// uniqueNames makes names usable as directory names, distinct.
func uniqueNames(names []string) []string {
	out := make([]string, len(names))
	seen := map[string]bool{}
	for i, n := range names {
		n = strings.Map(func(r rune) rune {
			if r == '/' || r == '\\' || r == 0 {
				return '-'
			}
			return r
		}, n)
		if n == "" || n == "." || n == ".." {
			n = "run"
		}
		base := n
		for k := 2; seen[n]; k++ {
			n = base + "-" + strconv.Itoa(k)
		}
		seen[n] = true
		out[i] = n
	}
	return out
}

func simList(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh sim list", "", "Lists the built-in scenarios, which `sim run NAME` and the other sim commands take in place of a file.")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	names := simulations.BuiltinNames()
	if len(names) == 0 {
		e.printf("no built-in scenarios\n")
		return nil
	}
	for _, n := range names {
		data, _ := simulations.Builtin(n)
		sc, err := simulations.ParseScenario(data, n)
		if err != nil {
			e.printf("%-16s (does not parse: %v)\n", n, err)
			continue
		}
		desc := wrap(firstSentence(sc.Description), 80)
		var extra []string
		if len(sc.Arms) > 0 {
			var as []string
			for _, a := range sc.Arms {
				as = append(as, a.Name)
			}
			extra = append(extra, "arms: "+strings.Join(as, ", "))
		}
		if sc.Sweep != nil && sc.Sweep.Param != "" {
			extra = append(extra, "sweep: "+sc.Sweep.Param+" = "+strings.Join(sc.Sweep.Values, ", "))
		}
		for i, l := range desc {
			if i == 0 {
				e.printf("%-16s %s\n", n, l)
			} else {
				e.printf("%-16s %s\n", "", l)
			}
		}
		if len(extra) > 0 {
			e.printf("%-16s (%s)\n", "", strings.Join(extra, "; "))
		}
	}
	return nil
}

// firstSentence is text up to its first full stop (or line end).
func firstSentence(text string) string {
	text = strings.TrimSpace(text)
	text, _, _ = strings.Cut(text, "\n")
	if i := strings.Index(text, ". "); i >= 0 {
		text = text[:i+1]
	}
	return text
}

// wrap breaks text into lines of at most width runes (longer words stay
// whole).
func wrap(text string, width int) []string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(text) {
		if line != "" && len([]rune(line))+1+len([]rune(w)) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	return append(lines, line)
}

func runWithProgress(ctx context.Context, e *env, sc *simulations.Scenario) (*simulations.Result, error) {
	p := newProgress(e.stderr, sc.Name)
	r, err := simulations.Run(ctx, sc, simulations.RunOptions{Progress: p.update})
	p.finish(err == nil)
	return r, err
}

// progress shows a run's virtual time done: on a terminal as a bar redrawn
// at most progressHz times a second; elsewhere (a pipe, a file, a test) as
// a line at a tenth done at most every progressLinesEvery, and at the end.
type progress struct {
	w     io.Writer
	tty   bool
	label string
	start time.Time

	mu      sync.Mutex
	last    time.Time // last redraw
	tenths  int       // tenths reported, when not a terminal
	drawn   bool
	current [2]float64 // done, total
}

const (
	progressHz         = 10              // terminal bar redraws per second, at most
	progressLinesEvery = 5 * time.Second // least time between lines when not a terminal
)

func newProgress(w io.Writer, label string) *progress {
	now := time.Now()
	return &progress{w: w, tty: isTerminal(w), label: label, start: now, last: now}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0 && os.Getenv("TERM") != "dumb"
}

// update is a RunOptions.Progress: virtual seconds done of total.
func (p *progress) update(done, total float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.current = [2]float64{done, total}
	frac := 0.0
	if total > 0 {
		frac = min(1, max(0, done/total))
	}
	now := time.Now()
	if p.tty {
		if frac < 1 && now.Sub(p.last) < time.Second/progressHz {
			return
		}
		p.last, p.drawn = now, true
		fmt.Fprintf(p.w, "\r%s", p.bar(frac, done, total, now))
		return
	}
	// Elsewhere: a line at a new tenth when the last line is progressLinesEvery
	// old, and one at the end.
	if t := int(frac * 10); t > p.tenths && (frac == 1 || now.Sub(p.last) >= progressLinesEvery) {
		p.tenths, p.last = t, now
		fmt.Fprintf(p.w, "sim %s: %3.0f%%  %.0f/%.0f s virtual  %.1f s wall\n", p.label, 100*frac, done, total,
			now.Sub(p.start).Seconds())
	}
}

// bar is "[=========>          ]  45%  270/600 s virtual  0:03 wall  ETA 0:04".
func (p *progress) bar(frac, done, total float64, now time.Time) string {
	const width = 30
	fill := int(frac * width)
	b := strings.Repeat("=", fill)
	if fill < width {
		b += ">" + strings.Repeat(" ", width-fill-1)
	}
	wall := now.Sub(p.start)
	eta := "?"
	if frac > 0 {
		eta = clock(time.Duration(float64(wall) * (1 - frac) / frac))
	}
	return fmt.Sprintf("%s [%s] %3.0f%%  %.0f/%.0f s virtual  %s wall  ETA %s   ", p.label, b, 100*frac, done, total, clock(wall), eta)
}

// clock writes d as m:ss (or h:mm:ss).
func clock(d time.Duration) string {
	s := int(d.Round(time.Second).Seconds())
	if s >= 3600 {
		return fmt.Sprintf("%d:%02d:%02d", s/3600, s/60%60, s%60)
	}
	return fmt.Sprintf("%d:%02d", s/60, s%60)
}

// finish ends the bar's line; on success it draws the bar full.
func (p *progress) finish(ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.tty || !p.drawn {
		return
	}
	if ok {
		fmt.Fprintf(p.w, "\r%s", p.bar(1, p.current[1], p.current[1], time.Now()))
	}
	fmt.Fprintln(p.w)
}
