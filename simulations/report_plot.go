package simulations

// The report's plots, drawn with gonum.org/v1/plot and written as both SVG
// and PNG. Drawing depends on the Result alone; long series are merged into
// at most maxPlotPoints points so that files stay small at a million
// requests.

import (
	"bytes"
	"cmp"
	"fmt"
	"image/color"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

const (
	// maxPlotPoints bounds the points of one line in a time-series plot.
	maxPlotPoints = 2000
	// plotDPI is the PNG resolution.
	plotDPI = 120
	// maxClassLines bounds the per-class lines of the per-peer load plot.
	maxClassLines = 6
)

var (
	plotW = 7 * vg.Inch
	plotH = 4 * vg.Inch
)

// plotFile is one plot of a report: written as stem.svg and stem.png, or
// skipped with a reason.
type plotFile struct {
	stem, title, caption string
	skipped              string
}

// figure draws one image onto a canvas.
type figure func(dc draw.Canvas)

// savePlot writes fig as dir/stem.svg and dir/stem.png.
func savePlot(dir, stem string, w, h vg.Length, fig figure) error {
	svg := vgsvg.New(w, h)
	fig(draw.New(svg))
	var buf bytes.Buffer
	if _, err := svg.WriteTo(&buf); err != nil {
		return fmt.Errorf("simulations: %s.svg: %w", stem, err)
	}
	if err := os.WriteFile(filepath.Join(dir, stem+".svg"), buf.Bytes(), 0o644); err != nil {
		return err
	}
	img := vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(plotDPI), vgimg.UseBackgroundColor(color.White))
	fig(draw.New(img))
	buf.Reset()
	// Fast compression: the default level costs several times the drawing
	// for files a fifth smaller.
	enc := png.Encoder{CompressionLevel: png.BestSpeed}
	if err := enc.Encode(&buf, img.Image()); err != nil {
		return fmt.Errorf("simulations: %s.png: %w", stem, err)
	}
	return os.WriteFile(filepath.Join(dir, stem+".png"), buf.Bytes(), 0o644)
}

// single is a figure of one plot.
func single(p *plot.Plot) figure { return func(dc draw.Canvas) { p.Draw(dc) } }

// stacked is a figure of plots one above the other, their axes aligned.
func stacked(ps ...*plot.Plot) figure {
	return func(dc draw.Canvas) {
		rows := make([][]*plot.Plot, len(ps))
		for i, p := range ps {
			rows[i] = []*plot.Plot{p}
		}
		t := draw.Tiles{Rows: len(ps), Cols: 1, PadY: vg.Points(6), PadTop: vg.Points(2), PadBottom: vg.Points(2)}
		cs := plot.Align(rows, t, dc)
		for i, p := range ps {
			p.Draw(cs[i][0])
		}
	}
}

func newPlot(title, x, y string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = x
	p.Y.Label.Text = y
	p.Legend.Top = true
	p.X.Tick.Marker, p.Y.Tick.Marker = distinctTicks{}, distinctTicks{}
	p.Add(plotter.NewGrid())
	return p
}

// addLine adds a line with a legend entry; style i picks colour and dashes.
func addLine(p *plot.Plot, label string, pts plotter.XYs, i int, dashed bool) error {
	l, err := plotter.NewLine(pts)
	if err != nil {
		return fmt.Errorf("simulations: plot %q, line %q: %w", p.Title.Text, label, err)
	}
	l.Color = plotutil.Color(i)
	l.Width = vg.Points(1.5)
	if dashed {
		l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
	}
	p.Add(l)
	if label != "" {
		p.Legend.Add(label, l)
	}
	return nil
}

// fromZero sets p's y axis from 0 to a quarter above the largest y of
// pts (so that the legend clears the lines), and its x axis from 0.
func fromZero(p *plot.Plot, pts ...plotter.XYs) {
	hi := 0.0
	for _, l := range pts {
		for _, xy := range l {
			hi = max(hi, xy.Y)
		}
	}
	if hi <= 0 {
		hi = 1
	}
	p.X.Min = 0
	p.Y.Min, p.Y.Max = 0, 1.25*hi
}

// padRange widens an axis by a tenth of its span on each side (of its
// value when the span is 0), so that markers at the ends are not cut.
func padRange(a *plot.Axis, lo, hi float64) {
	d := (hi - lo) / 10
	if d == 0 {
		d = max(math.Abs(lo)/10, 1e-9)
	}
	a.Min, a.Max = lo-d, hi+d
}

// writeReportPlots draws the report's plots into dir and returns them in
// report order, with those skipped and why.
func writeReportPlots(dir string, r *Result) ([]plotFile, error) {
	var out []plotFile
	for _, mk := range []func(*Result) (plotFile, figure, error){
		latencyCDFPlot, throughputPlot, coveragePlot, peerLoadPlot, failoverPlot,
	} {
		pf, fig, err := mk(r)
		if err != nil {
			return nil, err
		}
		if fig != nil {
			if err := savePlot(dir, pf.stem, plotW, plotH, fig); err != nil {
				return nil, err
			}
		}
		out = append(out, pf)
	}
	return out, nil
}

// cdfLine is one distribution of a CDF plot.
type cdfLine struct {
	label  string
	xs     []float64
	style  int
	dashed bool
}

// cdfFigure plots empirical CDFs at cdfPoints quantiles each, on a log x
// axis when the values span more than a decade and are all positive. ok is
// false when no line has a value.
func cdfFigure(title string, lines []cdfLine) (p *plot.Plot, ok bool, err error) {
	type drawn struct {
		cdfLine
		grid []float64
	}
	var ds []drawn
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, l := range lines {
		g := quantileGrid(l.xs, cdfPoints)
		if g == nil {
			continue
		}
		ds = append(ds, drawn{l, g})
		lo, hi = min(lo, g[0]), max(hi, g[len(g)-1])
	}
	if len(ds) == 0 {
		return nil, false, nil
	}
	logX := lo > 0 && hi/lo > 10
	xLabel := "latency (s)"
	if logX {
		xLabel = "latency (s, log scale)"
	}
	p = newPlot(title, xLabel, "fraction of requests at or below")
	p.Y.Min, p.Y.Max = 0, 1
	if logX {
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	p.Legend.Top = false
	p.Legend.Left = false
	p.Legend.XOffs = -vg.Points(4)
	p.Legend.YOffs = vg.Points(4)
	for _, d := range ds {
		pts := make(plotter.XYs, 0, len(d.grid))
		for i, x := range d.grid {
			if logX && x <= 0 {
				continue
			}
			pts = append(pts, plotter.XY{X: x, Y: float64(i) / cdfPoints})
		}
		if err := addLine(p, d.label, pts, d.style, d.dashed); err != nil {
			return nil, false, err
		}
	}
	return p, true, nil
}

func latencyCDFPlot(r *Result) (plotFile, figure, error) {
	pf := plotFile{stem: "latency_cdf", title: "Latency CDF",
		caption: "Fraction of completed requests finished within a latency: end-to-end (arrival to last result), time to first token and mean time per output token after the first (generation requests only)."}
	p, ok, err := cdfFigure(fmt.Sprintf("Latency CDF: %s", nameOr(r.Scenario, "scenario")), []cdfLine{
		{label: "end-to-end", xs: r.Latencies.E2E, style: 0},
		{label: "time to first token", xs: r.Latencies.TTFT, style: 1},
		{label: "per output token", xs: r.Latencies.PerToken, style: 2},
	})
	if err != nil || !ok {
		pf.skipped = "no request completed"
		return pf, nil, err
	}
	return pf, single(p), nil
}

// bucket is several consecutive samples merged for plotting.
type bucket struct {
	t, dt                                          float64 // end of the last sample, summed intervals
	arrivals, completed, failed, failovers, tokens int
	peers                                          int     // at the last sample
	coverage                                       float64 // lowest
}

// buckets merges series into at most maxPlotPoints buckets of consecutive
// samples.
func buckets(series []Sample) []bucket {
	k := (len(series) + maxPlotPoints - 1) / maxPlotPoints
	var bs []bucket
	for i, s := range series {
		if i%k == 0 {
			bs = append(bs, bucket{coverage: math.Inf(1)})
		}
		b := &bs[len(bs)-1]
		b.t = s.T
		b.dt += interval(series, i)
		b.arrivals += s.Arrivals
		b.completed += s.Completed
		b.failed += s.Failed
		b.failovers += s.Failovers
		b.tokens += s.Tokens
		b.peers = s.Peers
		b.coverage = min(b.coverage, s.Coverage)
	}
	return bs
}

// timeLabel is the x label of time-series plots, in the unit suiting the
// run's length; scale converts seconds to it.
func timeLabel(r *Result) (string, float64) {
	end := r.Duration
	if n := len(r.Series); n > 0 {
		end = max(end, r.Series[n-1].T)
	}
	switch {
	case end >= 3*3600:
		return "virtual time (h)", 1.0 / 3600
	case end >= 3*60:
		return "virtual time (min)", 1.0 / 60
	default:
		return "virtual time (s)", 1
	}
}

// seriesLine is a per-bucket value against time.
func seriesLine(bs []bucket, scale float64, f func(*bucket) float64) plotter.XYs {
	pts := make(plotter.XYs, len(bs))
	for i := range bs {
		pts[i] = plotter.XY{X: bs[i].t * scale, Y: orZero(f(&bs[i]))}
	}
	return pts
}

func throughputPlot(r *Result) (plotFile, figure, error) {
	pf := plotFile{stem: "throughput", title: "Throughput over time",
		caption: "Requests arriving and completing per virtual second (top) and tokens generated per virtual second (bottom), per sample interval."}
	if len(r.Series) == 0 {
		pf.skipped = "no samples in the series"
		return pf, nil, nil
	}
	bs := buckets(r.Series)
	xl, scale := timeLabel(r)
	top := newPlot(fmt.Sprintf("Throughput: %s", nameOr(r.Scenario, "scenario")), "", "requests/s")
	arrived := seriesLine(bs, scale, func(b *bucket) float64 { return perSec(b.arrivals, b.dt) })
	completed := seriesLine(bs, scale, func(b *bucket) float64 { return perSec(b.completed, b.dt) })
	if err := addLine(top, "arrived", arrived, 1, true); err != nil {
		return pf, nil, err
	}
	if err := addLine(top, "completed", completed, 0, false); err != nil {
		return pf, nil, err
	}
	fromZero(top, arrived, completed)
	bottom := newPlot("", xl, "tokens/s")
	tokens := seriesLine(bs, scale, func(b *bucket) float64 { return perSec(b.tokens, b.dt) })
	if err := addLine(bottom, "tokens generated", tokens, 2, false); err != nil {
		return pf, nil, err
	}
	fromZero(bottom, tokens)
	return pf, stacked(top, bottom), nil
}

func coveragePlot(r *Result) (plotFile, figure, error) {
	pf := plotFile{stem: "coverage", title: "Block coverage and peers online",
		caption: "Fraction of the blocks served by at least one online peer (lowest over the models) at each sample (top), and peers online (bottom)."}
	if len(r.Series) == 0 {
		pf.skipped = "no samples in the series"
		return pf, nil, nil
	}
	bs := buckets(r.Series)
	xl, scale := timeLabel(r)
	top := newPlot(fmt.Sprintf("Block coverage: %s", nameOr(r.Scenario, "scenario")), "", "blocks served (%)")
	if err := addLine(top, "", seriesLine(bs, scale, func(b *bucket) float64 { return 100 * b.coverage }), 0, false); err != nil {
		return pf, nil, err
	}
	top.X.Min, top.Y.Min, top.Y.Max = 0, 0, 105
	bottom := newPlot("", xl, "peers online")
	peers := seriesLine(bs, scale, func(b *bucket) float64 { return float64(b.peers) })
	if err := addLine(bottom, "", peers, 1, false); err != nil {
		return pf, nil, err
	}
	fromZero(bottom, peers)
	bottom.Y.Max = max(1, bottom.Y.Max/1.25*1.1)
	return pf, stacked(top, bottom), nil
}

func failoverPlot(r *Result) (plotFile, figure, error) {
	pf := plotFile{stem: "failovers", title: "Failovers over time",
		caption: "Hops replaced mid-request (failovers) and requests given up (failed), per virtual minute, per sample interval."}
	if len(r.Series) == 0 {
		pf.skipped = "no samples in the series"
		return pf, nil, nil
	}
	bs := buckets(r.Series)
	xl, scale := timeLabel(r)
	p := newPlot(fmt.Sprintf("Failovers and failed requests: %s", nameOr(r.Scenario, "scenario")), xl, "per virtual minute")
	failovers := seriesLine(bs, scale, func(b *bucket) float64 { return 60 * perSec(b.failovers, b.dt) })
	failed := seriesLine(bs, scale, func(b *bucket) float64 { return 60 * perSec(b.failed, b.dt) })
	if err := addLine(p, "failovers", failovers, 0, false); err != nil {
		return pf, nil, err
	}
	if err := addLine(p, "failed requests", failed, 1, true); err != nil {
		return pf, nil, err
	}
	fromZero(p, failovers, failed)
	return pf, single(p), nil
}

// loadCurve is busy fractions sorted from the busiest down, as at most
// cdfPoints+1 points: x the share of peers (%), y busy (%).
func loadCurve(busy []float64) plotter.XYs {
	g := quantileGrid(busy, cdfPoints) // ascending
	pts := make(plotter.XYs, len(g))
	for i := range g {
		pts[i] = plotter.XY{X: 100 * float64(i) / cdfPoints, Y: 100 * g[len(g)-1-i]}
	}
	return pts
}

func peerLoadPlot(r *Result) (plotFile, figure, error) {
	pf := plotFile{stem: "peer_load", title: "Per-peer load",
		caption: "Each peer's busy fraction (share of its online time spent computing), peers sorted from the busiest down; one line for all peers and one per peer class."}
	if len(r.Peers) == 0 {
		pf.skipped = "no peers"
		return pf, nil, nil
	}
	byClass := map[string][]float64{}
	all := make([]float64, len(r.Peers))
	for i, p := range r.Peers {
		all[i] = orZero(p.Busy)
		byClass[p.Class] = append(byClass[p.Class], all[i])
	}
	p := newPlot(fmt.Sprintf("Per-peer load: %s", nameOr(r.Scenario, "scenario")),
		"peers, sorted by load (% of peers)", "busy (% of online time)")
	p.Legend.Left = false
	if err := addLine(p, fmt.Sprintf("all peers (%s)", commas(len(all))), loadCurve(all), 0, false); err != nil {
		return pf, nil, err
	}
	if n := len(byClass); n > 1 && n <= maxClassLines {
		classes := make([]string, 0, n)
		for c := range byClass {
			classes = append(classes, c)
		}
		slices.SortFunc(classes, cmp.Compare)
		for i, c := range classes {
			label := fmt.Sprintf("%s (%s)", nameOr(c, "no class"), commas(len(byClass[c])))
			if err := addLine(p, label, loadCurve(byClass[c]), i+1, true); err != nil {
				return pf, nil, err
			}
		}
	}
	// Legend top right, where the sorted curve is low; the axis up to a
	// little above the busiest peer.
	p.Y.Min, p.Y.Max = 0, min(105, max(5, 120*slices.Max(all)))
	p.X.Min, p.X.Max = 0, 100
	return pf, single(p), nil
}

// distinctTicks are gonum's default ticks labelled with as few decimals
// as tell them apart (the default labels a narrow range 2.6, 2.6, 2.6).
type distinctTicks struct{}

func (distinctTicks) Ticks(lo, hi float64) []plot.Tick {
	ticks := plot.DefaultTicks{}.Ticks(lo, hi)
	for decimals := 0; decimals <= 9; decimals++ {
		labels := make([]string, len(ticks))
		seen := map[string]bool{}
		ok := true
		for i, t := range ticks {
			if t.Label == "" {
				continue
			}
			labels[i] = strconv.FormatFloat(t.Value, 'f', decimals, 64)
			ok = ok && !seen[labels[i]]
			seen[labels[i]] = true
		}
		if ok {
			for i := range ticks {
				ticks[i].Label = labels[i]
			}
			break
		}
	}
	return ticks
}

// writeSweepPlot draws the chosen metrics against the swept parameter,
// one panel per metric, as sweep.svg and sweep.png. The x axis is numeric
// when every value parses as a number, else the values are evenly spaced
// categories. drawn is false when no metric has a value.
func writeSweepPlot(dir string, sr *SweepResult, ms []metric) (drawn bool, err error) {
	xs := make([]float64, len(sr.Values))
	numeric := true
	for i, v := range sr.Values {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			numeric = false
			break
		}
		xs[i] = f
	}
	if !numeric {
		for i := range xs {
			xs[i] = float64(i)
		}
	}
	// Values over two decades or more (peers: 1000, 10000, 100000) on a
	// log axis.
	logX := numeric && slices.Min(xs) > 0 && slices.Max(xs)/slices.Min(xs) >= 100
	var ps []*plot.Plot
	for i, m := range ms {
		var pts plotter.XYs
		for j, r := range sr.Results {
			if m.available(&r.Summary) {
				pts = append(pts, plotter.XY{X: xs[j], Y: m.axisValue(&r.Summary)})
			}
		}
		if len(pts) == 0 {
			continue
		}
		slices.SortStableFunc(pts, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
		title := ""
		if len(ps) == 0 {
			title = fmt.Sprintf("Sweep of %s: %s", sr.Param, nameOr(sr.Scenario, "scenario"))
		}
		p := newPlot(title, sr.Param, m.axisLabel())
		switch {
		case !numeric:
			p.NominalX(sr.Values...)
			padRange(&p.X, slices.Min(xs), slices.Max(xs))
		case logX:
			p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
			p.X.Min, p.X.Max = slices.Min(xs)/1.3, slices.Max(xs)*1.3
		default:
			padRange(&p.X, slices.Min(xs), slices.Max(xs))
		}
		ylo, yhi := math.Inf(1), math.Inf(-1)
		for _, xy := range pts {
			ylo, yhi = min(ylo, xy.Y), max(yhi, xy.Y)
		}
		padRange(&p.Y, ylo, yhi)
		if m.kind == kindRatio && yhi <= 100 && p.Y.Max > 100 {
			p.Y.Max = 100.5 // a percentage: no room above 100 %
		}
		l, s, err := plotter.NewLinePoints(pts)
		if err != nil {
			return false, fmt.Errorf("simulations: sweep plot %s: %w", m.name, err)
		}
		l.Color, s.Color = plotutil.Color(i), plotutil.Color(i)
		l.Width = vg.Points(1.5)
		s.Shape = draw.CircleGlyph{}
		p.Add(l, s)
		ps = append(ps, p)
	}
	if len(ps) == 0 {
		return false, nil
	}
	h := plotH
	if len(ps) > 1 {
		h = vg.Length(len(ps)) * 2.6 * vg.Inch
	}
	return true, savePlot(dir, "sweep", plotW, h, stacked(ps...))
}
