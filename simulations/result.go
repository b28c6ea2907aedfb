package simulations

import (
	"cmp"
	"encoding/json"
	"math"
	"slices"
)

// Result is what one run of a scenario produces: everything the report,
// the CSV files and the plots are drawn from. It holds no wall-clock
// figures, so that two runs of one scenario with one seed give the same
// Result, byte for byte once encoded.
type Result struct {
	// Scenario is the scenario's name; Seed the seed it ran with.
	Scenario string `json:"scenario"`
	Seed     int64  `json:"seed"`
	// Duration is the virtual time simulated, in seconds.
	Duration float64 `json:"duration_s"`
	// Params lists the scenario's main parameters as "name: value" lines
	// in a fixed order, for the report's header.
	Params []string `json:"params"`

	Summary Summary `json:"summary"`
	// Series has one sample per Scenario sample interval, in time order.
	Series []Sample `json:"-"`
	// Peers has one entry per peer that was ever part of the mesh, in ID
	// order.
	Peers []PeerStat `json:"-"`
	// Latencies of the completed requests, in seconds, in completion order.
	Latencies Latencies `json:"-"`
	// Regions has the latencies of the requests of each users' region
	// (geography mode; in the order of the scenario's regions, those with
	// users only).
	Regions []RegionStat `json:"regions,omitempty"`
}

// RegionStat is the requests of the users of one region.
type RegionStat struct {
	Region    string    `json:"region"`
	Completed int       `json:"completed"`
	Failed    int       `json:"failed"`
	E2E       Quantiles `json:"e2e_s"`
	TTFT      Quantiles `json:"ttft_s"`
	PerToken  Quantiles `json:"per_token_s"`
}

// Summary is the run in a few figures (summary.json).
type Summary struct {
	Requests  int `json:"requests"`  // arrived (submitted)
	Completed int `json:"completed"` // finished with a result
	Failed    int `json:"failed"`    // gave up (no route, too many failovers, deadline)
	// Unfinished were still in flight when the run ended: Requests -
	// Completed - Failed. Neither completed nor failed, they are censored:
	// each one's latency is at least the end of the run minus its
	// submission (see censoredQuantiles).
	Unfinished int `json:"unfinished"`
	// CompletionRate is Completed / Requests: an unfinished request is not
	// a completed one.
	CompletionRate float64 `json:"completion_rate"`
	// Throughput is completed requests per virtual second; TokensPerSec the
	// generated tokens per virtual second.
	Throughput   float64 `json:"throughput_rps"`
	TokensPerSec float64 `json:"tokens_per_s"`

	E2E      Quantiles `json:"e2e_s"`       // arrival to last result
	TTFT     Quantiles `json:"ttft_s"`      // arrival to first token (generation only)
	PerToken Quantiles `json:"per_token_s"` // mean time per output token after the first

	Hops      float64 `json:"mean_hops"` // mean hops per route
	Failovers int     `json:"failovers"` // hops replaced mid-request
	// The failovers by cause: the peer answered busy (slots, queue or
	// sessions full), a step timed out (a crashed peer), the peer could
	// not be reached (gone), or it refused (a span it no longer serves).
	Busy        int `json:"failovers_busy"`
	Stalls      int `json:"failovers_stall"`
	Unreachable int `json:"failovers_unreachable"`
	Refused     int `json:"failovers_refused"`
	Replays     int `json:"replays"` // session steps replayed on replacements
	// Resumes are decode-ring steps sent again on the same route after a
	// hop answered busy (not failovers: the ring was not restarted; a
	// busy answer that restarts it is one, counted in Busy).
	Resumes int `json:"resumes"`
	// Peers at the start and the end; Joins and Leaves over the run.
	PeersStart int `json:"peers_start"`
	PeersEnd   int `json:"peers_end"`
	Joins      int `json:"joins"`
	Leaves     int `json:"leaves"`
	// Moves counts peers that moved to another span (rebalancing).
	Moves int `json:"moves"`
	// MinCoverage is the lowest fraction of a model's blocks served at any
	// sample.
	MinCoverage float64 `json:"min_coverage"`
	// Blocks is how durably the mesh held the model's blocks.
	Blocks BlockLoss `json:"blocks"`
	// Events is how many discrete events the engine ran.
	Events int64 `json:"events"`
	// Load is how the compute spread over the peers; Capacity what the
	// mesh could run of the workload and the share of it it ran (load.go).
	Load     LoadSpread `json:"load"`
	Capacity Capacity   `json:"capacity"`
}

// BlockLoss counts the blocks the mesh lost: a block is lost when its
// last online holder leaves (gracefully or not) or moves off it, so that
// no live peer holds it (a peer holds the blocks it serves; the node keeps
// no others). Issue 15's goal: no block is lost while the live peers could
// hold every block.
type BlockLoss struct {
	// Lost counts the losses (one per block and time it lost its last
	// holder).
	Lost int `json:"lost"`
	// LostWithRoom counts the losses when the online peers that remained
	// could hold the whole model between them (their spans' capacities
	// summed to the model's blocks or more): placement had room to keep a
	// copy of every block.
	LostWithRoom int `json:"lost_with_room"`
	// LostS is the block-seconds that lost blocks spent with no holder,
	// until a peer placed on them came online or the run ended. The
	// simulator's joining peers fetch their blocks whether or not a live
	// peer holds them (as from the model's origin): in a mesh with no
	// origin, a lost block stays lost.
	LostS float64 `json:"lost_block_s"`
	// MinHolders is the fewest online holders of any block at a sample or
	// at the end.
	MinHolders int `json:"min_holders"`
	// MovesGivenUp counts the rebalancing moves a peer gave up after
	// fetching its new span: its view then said it held the last copy of
	// a block it would drop (mesh.LastCopies).
	MovesGivenUp int `json:"moves_given_up"`
}

// Quantiles of a latency distribution, in seconds (all 0 when empty).
type Quantiles struct {
	// N counts the latencies known exactly: completed requests' (and, of
	// TTFT, unfinished requests' that had their first token).
	N    int     `json:"n"`
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P95  float64 `json:"p95"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	// Censored counts the unfinished requests the figures take at their
	// lower bounds (censoredQuantiles); LowerBound says which figures are
	// then only lower bounds of the true ones. Both zero, and absent from
	// the JSON, when no request was unfinished.
	Censored   int    `json:"censored,omitempty"`
	LowerBound Bounds `json:"lower_bound,omitzero"`
	// UpperBound, of a percentile that is only a lower bound, is the most
	// it can be: the value at its rank had every unfinished request taken
	// forever (0: no bound, its rank falls among them). So the true
	// percentile lies between the figure and this.
	UpperBound Uppers `json:"upper_bound,omitzero"`
}

// Uppers are the upper bounds of a Quantiles' percentiles that are lower
// bounds (0: none, or unbounded).
type Uppers struct {
	P50 float64 `json:"p50,omitempty"`
	P90 float64 `json:"p90,omitempty"`
	P95 float64 `json:"p95,omitempty"`
	P99 float64 `json:"p99,omitempty"`
}

// Bounds marks the figures of a Quantiles that are lower bounds: the true
// figure, had every unfinished request finished, is at least the one given.
type Bounds struct {
	Mean bool `json:"mean,omitempty"`
	P50  bool `json:"p50,omitempty"`
	P90  bool `json:"p90,omitempty"`
	P95  bool `json:"p95,omitempty"`
	P99  bool `json:"p99,omitempty"`
	Max  bool `json:"max,omitempty"`
}

// Sample is the mesh over one sample interval ending at T.
type Sample struct {
	T         float64 `json:"t_s"` // end of the interval, virtual seconds
	Arrivals  int     `json:"arrivals"`
	Completed int     `json:"completed"`
	Failed    int     `json:"failed"`
	Failovers int     `json:"failovers"`
	Tokens    int     `json:"tokens"`   // tokens generated in the interval
	Peers     int     `json:"peers"`    // peers online at T
	InFlight  int     `json:"inflight"` // requests in the mesh at T
	// Coverage is the fraction of blocks served by at least one online
	// peer at T (the lowest over the models).
	Coverage float64 `json:"coverage"`
	// P50 and P95 of the end-to-end latency of the requests completed in
	// the interval, seconds (0 when none).
	P50 float64 `json:"p50_s"`
	P95 float64 `json:"p95_s"`
}

// PeerStat is one peer over the run.
type PeerStat struct {
	ID     int    `json:"id"`
	Class  string `json:"class"`
	Region string `json:"region"`
	// Passes is how many block passes it ran (one pass of one block for one
	// token counts 1); Busy the fraction of its online time it computed.
	Passes int64   `json:"passes"`
	Busy   float64 `json:"busy"`
	// Online is how long it was in the mesh, virtual seconds.
	Online float64 `json:"online_s"`
	// Failed counts the requests in flight on it when it left or failed.
	Failed int `json:"failed"`
}

// Latencies of completed requests, seconds. TTFT and PerToken have entries
// for generation requests only.
type Latencies struct {
	E2E      []float64
	TTFT     []float64
	PerToken []float64
	// Unfinished has one entry per request still in flight at the end of
	// the run (unfinishedAt). A Result may have fewer entries than
	// Summary.Unfinished: the report then takes each missing one at the
	// only bound known without its submission time, 0.
	Unfinished []Unfinished
}

// Unfinished is what is known of the latencies of a request the run ended
// before it finished. NaN marks a latency the request does not have (TTFT
// and PerToken of a single pass; PerToken of a generation of one token).
type Unfinished struct {
	// E2E is the end of the run minus its submission: its end-to-end
	// latency is at least that.
	E2E float64
	// TTFT is its time to first token: exact when FirstToken (the token
	// had reached the user), else at least E2E.
	TTFT       float64
	FirstToken bool
	// PerToken is a lower bound of its time per output token after the
	// first: the time from its first token to the end of the run over its
	// output tokens after the first, (end - first token) / (output - 1);
	// 0 before its first token.
	PerToken float64
}

// unfinishedJSON is Unfinished on the wire: JSON has no NaN, so a latency
// the request does not have is null.
type unfinishedJSON struct {
	E2E        float64  `json:"e2e"`
	TTFT       *float64 `json:"ttft"`
	FirstToken bool     `json:"first_token,omitempty"`
	PerToken   *float64 `json:"per_token"`
}

func (u Unfinished) MarshalJSON() ([]byte, error) {
	orNull := func(f float64) *float64 {
		if math.IsNaN(f) {
			return nil
		}
		return &f
	}
	return json.Marshal(unfinishedJSON{E2E: u.E2E, TTFT: orNull(u.TTFT), FirstToken: u.FirstToken, PerToken: orNull(u.PerToken)})
}

func (u *Unfinished) UnmarshalJSON(b []byte) error {
	var j unfinishedJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	orNaN := func(f *float64) float64 {
		if f == nil {
			return math.NaN()
		}
		return *f
	}
	*u = Unfinished{E2E: j.E2E, TTFT: orNaN(j.TTFT), FirstToken: j.FirstToken, PerToken: orNaN(j.PerToken)}
	return nil
}

// unfinishedAt is what the end of a run at end knows of a request
// submitted at arrive, its first token at the user at firstTok (when
// first), of output tokens (gen) or a single pass; times in seconds.
func unfinishedAt(end, arrive, firstTok float64, first, gen bool, output int) Unfinished {
	u := Unfinished{E2E: end - arrive, TTFT: math.NaN(), PerToken: math.NaN()}
	if !gen {
		return u
	}
	u.TTFT = u.E2E
	if first {
		u.TTFT, u.FirstToken = firstTok-arrive, true
	}
	if output > 1 {
		u.PerToken = 0
		if first {
			u.PerToken = (end - firstTok) / float64(output-1)
		}
	}
	return u
}

// Censoring. A request still in flight at the end of the run has no
// latency yet, only a lower bound: its latency so far. Leaving it out (as
// the completed-only figures do) drops exactly the slowest requests. The
// figures here take every unfinished request at its lower bound, with the
// completed ones, so each is a lower bound of the figure the run would
// have given had it gone on until all had finished; and one is exact when
// nothing unfinished can change it:
//
//   - a percentile (nearest rank k of n, completed and unfinished) is
//     exact when rank k falls on a completed request whose latency is at
//     most every unfinished request's lower bound (then all unfinished
//     requests rank above it, wherever they finish); otherwise it is the
//     lower bound found at rank k, and flagged, with an upper bound when
//     k falls among the completed requests: the k-th completed latency
//     (where the percentile would be were every unfinished request to run
//     forever);
//   - the mean and the maximum are lower bounds as soon as one latency
//     is taken at its bound.
//
// Failed requests have no latency and are in neither set.

// censoredQuantiles is the Quantiles of the exact latencies done and the
// lower bounds low of unfinished requests' (not finite values skipped).
// With no low it is the plain nearest-rank Quantiles of done.
func censoredQuantiles(done, low []float64) Quantiles {
	c := newCensored(done, low)
	if len(c.v) == 0 {
		return Quantiles{}
	}
	sum := 0.0
	for _, x := range c.v {
		sum += x
	}
	cen := len(c.v) - c.exact
	q := Quantiles{N: c.exact, Censored: cen, Mean: sum / float64(len(c.v)), Max: c.v[len(c.v)-1]}
	q.P50, q.LowerBound.P50, q.UpperBound.P50 = c.at(0.5)
	q.P90, q.LowerBound.P90, q.UpperBound.P90 = c.at(0.9)
	q.P95, q.LowerBound.P95, q.UpperBound.P95 = c.at(0.95)
	q.P99, q.LowerBound.P99, q.UpperBound.P99 = c.at(0.99)
	q.LowerBound.Mean, q.LowerBound.Max = cen > 0, cen > 0
	return q
}

// censored is a distribution of exact latencies and lower bounds, sorted.
type censored struct {
	v     []float64 // the values, ascending (an exact one before a bound of the same value)
	low   []bool    // v[i] is a lower bound
	exact int       // how many are exact
	min   float64   // the least lower bound, +Inf when none
	ex    []float64 // the exact values alone, ascending
}

func newCensored(done, low []float64) censored {
	type val struct {
		v   float64
		low bool
	}
	vs := make([]val, 0, len(done)+len(low))
	c := censored{min: math.Inf(1)}
	for _, x := range done {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			vs = append(vs, val{x, false})
			c.exact++
		}
	}
	for _, x := range low {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			vs = append(vs, val{x, true})
			c.min = min(c.min, x)
		}
	}
	slices.SortFunc(vs, func(a, b val) int {
		if d := cmp.Compare(a.v, b.v); d != 0 {
			return d
		}
		return cmp.Compare(b2i(a.low), b2i(b.low))
	})
	c.v, c.low = make([]float64, len(vs)), make([]bool, len(vs))
	for i, x := range vs {
		c.v[i], c.low[i] = x.v, x.low
		if !x.low {
			c.ex = append(c.ex, x.v)
		}
	}
	return c
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// at is the value at quantile q (nearest rank), whether it is only a
// lower bound, and then the most it can be: the exact value at the same
// rank with every unfinished request ranked last (0 when the rank falls
// among those: no bound). c must not be empty.
func (c censored) at(q float64) (v float64, lower bool, upper float64) {
	i := rankIndex(q, len(c.v))
	v, lower = c.v[i], c.low[i] || c.v[i] > c.min
	if lower && i < len(c.ex) {
		upper = c.ex[i]
	}
	return v, lower, upper
}

// settled is a copy of r whose Summary counts the unfinished requests and
// takes them into its latency figures (censoredQuantiles), for reports:
// Run's Summary leaves them out. Requests's counts alone give Unfinished
// and CompletionRate; the latencies are taken again from Latencies, when
// they are the ones the Summary was drawn from (a Summary built by hand,
// without them, keeps its figures).
func (r *Result) settled() *Result {
	c := *r
	s := &c.Summary
	s.Unfinished = max(0, s.Requests-s.Completed-s.Failed)
	if s.Requests > 0 {
		s.CompletionRate = float64(s.Completed) / float64(s.Requests)
	}
	if s.Unfinished == 0 {
		return &c
	}
	sets := latencySets(&r.Latencies, s.Unfinished)
	for i, q := range []*Quantiles{&s.E2E, &s.TTFT, &s.PerToken} {
		if sets[i].completed == q.N {
			*q = censoredQuantiles(sets[i].done, sets[i].low)
		}
	}
	return &c
}

// latencySet is one latency distribution of a run: the exact latencies
// (completed requests', and an unfinished one's time to first token when
// it had come) and the lower bounds of the unfinished requests'.
type latencySet struct {
	done, low []float64
	completed int // how many of done are completed requests' (the first)
}

// latencySets is l's end-to-end, time-to-first-token and per-token
// distributions, of a run that ended with unfinished requests in flight.
func latencySets(l *Latencies, unfinished int) [3]latencySet {
	sets := [3]latencySet{
		{done: slices.Clip(l.E2E), completed: len(l.E2E)},
		{done: slices.Clip(l.TTFT), completed: len(l.TTFT)},
		{done: slices.Clip(l.PerToken), completed: len(l.PerToken)},
	}
	for _, u := range l.Unfinished {
		sets[0].low = append(sets[0].low, u.E2E)
		switch {
		case math.IsNaN(u.TTFT):
		case u.FirstToken:
			sets[1].done = append(sets[1].done, u.TTFT)
		default:
			sets[1].low = append(sets[1].low, u.TTFT)
		}
		if !math.IsNaN(u.PerToken) {
			sets[2].low = append(sets[2].low, u.PerToken)
		}
	}
	// Unfinished requests with no entry: only 0 bounds their latencies,
	// and each may be any kind of request, so it bounds every
	// distribution the run has (one with no entry at all has none).
	if missing := unfinished - len(l.Unfinished); missing > 0 {
		for i := range sets {
			if len(sets[i].done)+len(sets[i].low) > 0 {
				sets[i].low = append(sets[i].low, make([]float64, missing)...)
			}
		}
	}
	return sets
}
