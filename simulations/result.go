package simulations

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
	Requests  int `json:"requests"`  // arrived
	Completed int `json:"completed"` // finished with a result
	Failed    int `json:"failed"`    // gave up (no route, too many failovers, deadline)
	// CompletionRate is Completed / (Completed + Failed).
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
	// Events is how many discrete events the engine ran.
	Events int64 `json:"events"`
}

// Quantiles of a latency distribution, in seconds (all 0 when empty).
type Quantiles struct {
	N    int     `json:"n"`
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P95  float64 `json:"p95"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
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
}
