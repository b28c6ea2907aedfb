package simulations

// Scenarios: the YAML input of a run, its defaults and its checks. Every
// field is documented in scenarios/README.md; the comments here say what
// zero means.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/infermesh/infermesh/mesh"
)

// ErrBadScenario wraps every error of parsing or checking a scenario.
var ErrBadScenario = errors.New("bad scenario")

// Model is the model every peer serves a span of.
type Model struct {
	// Blocks is how many blocks (layers) it has (default 32).
	Blocks int `yaml:"blocks"`
	// BlockMB is the memory one loaded block takes, MB (default 400); a
	// peer class's MemoryGB over it gives the span a peer holds, and a
	// joining or moving peer fetches that many bytes.
	BlockMB float64 `yaml:"block_mb"`
	// ActivationKB is what one token's activations weigh between hops, KB
	// (default 8: a 4096-wide fp16 hidden state).
	ActivationKB float64 `yaml:"activation_kb"`
}

// Region is a place on the map where peers and users are.
type Region struct {
	Name string  `yaml:"name"`
	Lat  float64 `yaml:"lat"`
	Lon  float64 `yaml:"lon"`
	// Weight is the region's share of the users (requests); PeerWeight its
	// share of the peers (default: Weight).
	Weight     float64  `yaml:"weight"`
	PeerWeight *float64 `yaml:"peer_weight"`
	// RadiusKM spreads peers and users uniformly over a disc around the
	// centre (default 300).
	RadiusKM float64 `yaml:"radius_km"`
	// UTCOffset is the local time's offset in hours, for diurnal load.
	UTCOffset float64 `yaml:"utc_offset"`
}

// Class is a kind of peer.
type Class struct {
	Name string `yaml:"name"`
	// Share is the class's weight among the peers (Scenario.Peers of them
	// in all).
	Share float64 `yaml:"share"`
	// Regions, when set, restricts the class to these regions (weighted by
	// their PeerWeight); empty means all regions.
	Regions []string `yaml:"regions"`
	// BlockMS is the time of one block for one token, ms (> 0).
	BlockMS float64 `yaml:"block_ms"`
	// PrefillFactor is what each prompt token after the first adds to a
	// pass, as a fraction of a decode pass: a pass of T tokens takes
	// BlockMS * (1 + (T-1) * PrefillFactor). GPUs run prompts in
	// parallel (~0.01-0.05), CPUs barely (~0.5-1). Default 0.05.
	PrefillFactor *float64 `yaml:"prefill_factor"`
	// MemoryGB bounds the span a peer holds: floor(MemoryGB*1000/BlockMB)
	// blocks, at least 1, at most the model's.
	MemoryGB float64 `yaml:"memory_gb"`
	// BandwidthMbps is its access bandwidth (default 1000).
	BandwidthMbps float64 `yaml:"bandwidth_mbps"`
	// LastMileMS is the one-way latency of its access link, ms; JitterMS the
	// mean of an exponential extra delay per message (default 0).
	LastMileMS float64 `yaml:"last_mile_ms"`
	JitterMS   float64 `yaml:"jitter_ms"`
	// Slots is how many passes it runs at once at full speed (default 8;
	// the stage server's MaxInFlight is now its CPUs, at least 2).
	Slots int `yaml:"slots"`
	// Queue is how many passes may wait for a slot, first come, first
	// served. Unset (the default): 4 x Slots, as the stage server queues
	// 4 x MaxInFlight (mesh.StageConfig's default; it serves the queue
	// fairly among sending peers, which this models first come, first
	// served). 0 answers busy at once, as the stage server did before it
	// queued; -1 queues without bound.
	Queue *int `yaml:"queue"`
	// Sessions bounds the generation sessions open at once (each holding
	// its blocks' KV cache): one more is answered busy (default 256, the
	// stage server's MaxSessions; -1: no bound).
	Sessions int `yaml:"sessions"`
}

// Node is a peer of an explicit topology (Network.Nodes).
type Node struct {
	Name string `yaml:"name"`
	// Start and End bound the blocks it serves, [Start, End); End 0 with
	// Start 0 means it serves none (a requester only).
	Start int `yaml:"start"`
	End   int `yaml:"end"`
	// BlockUS is its time of one block for one token, µs (needed when it
	// serves): one number for every block it serves, or a list of one per
	// served block (block Start first); PrefillFactor as in Class.
	BlockUS       Micros   `yaml:"block_us"`
	PrefillFactor *float64 `yaml:"prefill_factor"`
	// Requester makes it an entry node: requests arrive here.
	Requester bool `yaml:"requester"`
	// BandwidthMbps as in Class (default 1000).
	BandwidthMbps float64 `yaml:"bandwidth_mbps"`
	// JitterMS as in Class: the mean of an exponential extra delay per
	// message, ms (default 0; a message's is its two ends' summed).
	JitterMS float64 `yaml:"jitter_ms"`
	// Slots, Queue and Sessions as in Class.
	Slots    int  `yaml:"slots"`
	Queue    *int `yaml:"queue"`
	Sessions int  `yaml:"sessions"`
}

// Micros is a per-block time in µs: one number for every block, written
// as a scalar in YAML, or one per block, written as a list.
type Micros []float64

// UnmarshalYAML reads a scalar as one number for every block, or a list.
func (m *Micros) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		if n.Tag == "!!null" {
			*m = nil
			return nil
		}
		var v float64
		if err := n.Decode(&v); err != nil {
			return err
		}
		*m = Micros{v}
		return nil
	}
	var vs []float64
	if err := n.Decode(&vs); err != nil {
		return err
	}
	*m = vs
	return nil
}

// MarshalYAML writes one number as a scalar, several as a list.
func (m Micros) MarshalYAML() (any, error) {
	if len(m) == 1 {
		return m[0], nil
	}
	return []float64(m), nil
}

// at is the time of the i-th served block.
func (m Micros) at(i int) float64 {
	if len(m) == 1 {
		return m[0]
	}
	return m[i]
}

// Network is the geography, or an explicit topology.
type Network struct {
	// RouteFactor is how much longer than the great circle the fibre path
	// is, and slower: one-way latency = distance / (2/3 c) * RouteFactor
	// + both last miles. Default 1.8.
	RouteFactor float64 `yaml:"route_factor"`
	// Nodes and LatencyMS make an explicit topology instead of the
	// geography: LatencyMS[i][j] is the one-way latency from node i to
	// node j in ms (the diagonal is ignored). Regions, classes, Peers and
	// churn are then unused.
	Nodes     []Node      `yaml:"nodes"`
	LatencyMS [][]float64 `yaml:"latency_ms"`
	// CoordErrorMS adds a random error of about this many ms of RTT to
	// each network coordinate routing sees (default 0: the coordinates
	// fit the network as well as Vivaldi converges to).
	CoordErrorMS float64 `yaml:"coord_error_ms"`
	// HopOverheadUS is a fixed time added to every message of a request
	// between two different nodes (requester to first hop, hop to hop,
	// last hop to requester, and failure answers), µs, on top of latency
	// and bytes over bandwidth; coordinates do not see it. It stands for
	// the pipeline's per-edge work: framing, tensor codec, QUIC stream.
	// Default 300, what BENCHMARKS.md measured per hop (290-383 µs,
	// "Inference through the mesh (issue 4)"); the real router charges
	// mesh.RouteHopOverhead per edge. A pointer so that 0 can be asked for.
	HopOverheadUS *float64 `yaml:"hop_overhead_us"`
}

// Dist is a distribution of a positive quantity.
type Dist struct {
	// Dist is "const" (Mean), "exp" (mean Mean), "uniform" (Min..Max) or
	// "lognormal" (mean Mean, Sigma of the log); the result is clamped to
	// [Min, Max] when Max > 0.
	Dist  string  `yaml:"dist"`
	Mean  float64 `yaml:"mean"`
	Min   float64 `yaml:"min"`
	Max   float64 `yaml:"max"`
	Sigma float64 `yaml:"sigma"`
}

// Workload is what the users ask.
type Workload struct {
	// Rate is the mean arrival rate of requests, per second.
	Rate float64 `yaml:"rate"`
	// Arrivals is "poisson" (default: exponential gaps) or "uniform" (one
	// request every 1/Rate seconds, as a benchmark client sends them).
	Arrivals string `yaml:"arrivals"`
	// Diurnal modulates the rate of each region by its local time: rate *
	// (1 + Diurnal * cos(2π (hour - PeakHour) / 24)), 0..1 (default 0).
	Diurnal  float64 `yaml:"diurnal"`
	PeakHour float64 `yaml:"peak_hour"`
	// StartHour is the UTC hour at virtual time 0.
	StartHour float64 `yaml:"start_hour"`
	// Generate is the fraction of requests that are generation sessions
	// (prompt pass then one step per output token); the others are single
	// passes of the prompt.
	Generate float64 `yaml:"generate"`
	// Prompt and Output are the token counts (default const 128 and 64).
	Prompt Dist `yaml:"prompt"`
	Output Dist `yaml:"output"`
	// Entries is how many entry nodes (the users' local nodes, non-serving)
	// the users enter through in the geography mode, spread by region
	// Weight (default 64); EntryLastMileMS and EntryBandwidthMbps their
	// access (default 5 ms, 100 Mbps).
	Entries            int     `yaml:"entries"`
	EntryLastMileMS    float64 `yaml:"entry_last_mile_ms"`
	EntryBandwidthMbps float64 `yaml:"entry_bandwidth_mbps"`
	// Gateway names a region (geography mode) whose gateway nodes every
	// request enters through, as a central API does ("local": a gateway
	// in each user's own region, as a regional API does): the user's node
	// sends the prompt to its gateway node (one one-way leg), the gateway
	// runs the request (routing, steps, failover, replay) and streams the
	// tokens back, each one one-way leg after the gateway has it. Empty:
	// the users' own entry nodes run their requests. There are as many
	// gateway nodes as entry nodes, placed like them on the region's
	// disc, entry node i using gateway node i; GatewayLastMileMS and
	// GatewayBandwidthMbps are their access (default 0.2 ms, 10 Gbps).
	Gateway              string  `yaml:"gateway"`
	GatewayLastMileMS    float64 `yaml:"gateway_last_mile_ms"`
	GatewayBandwidthMbps float64 `yaml:"gateway_bandwidth_mbps"`
	// Decode is where a generation's decode loop runs: "ring" (default,
	// the node's default since issue 13: the route's last hop samples each
	// token and sends the next step straight to the first hop, and streams
	// the token to the requester, which is off the per-token loop; a step
	// a hop answers busy is sent again on the same route after a pause, up
	// to 3 times in a row; any other failure restarts the ring on a new
	// route and replays the prompt and the tokens so far as forced ring
	// turns) or "requester" (the
	// requester-driven loop, mesh's InferOptions.RequesterLoop: each step
	// goes requester -> hops -> requester before the next starts; a
	// failover replaces the lost span and replays its steps from the
	// requester). Single passes are the same either way.
	Decode string `yaml:"decode"`
	// StepTimeoutS bounds a step (default 30, the node's); MaxFailovers the
	// failovers of one step (default 16).
	StepTimeoutS float64 `yaml:"step_timeout_s"`
	MaxFailovers int     `yaml:"max_failovers"`
	// MaxRequests stops arrivals after this many (0: no bound).
	MaxRequests int `yaml:"max_requests"`
}

// The values of Workload.Decode.
const (
	DecodeRing      = "ring"      // the last hop feeds the first (mesh.Session.Ring)
	DecodeRequester = "requester" // the requester drives every step
)

// Churn is peers leaving and joining.
type Churn struct {
	// LeavePerHour is the fraction of the online peers that leave per hour
	// (0.05: 5%/hour), each after an exponential session.
	LeavePerHour float64 `yaml:"leave_per_hour"`
	// CrashFraction is the share of leaves that are crashes: the peer
	// vanishes, its record lingers until it expires, and requests on it
	// stall until the step timeout. The others leave gracefully (an empty
	// record, connections closed: requests on them fail over at once).
	CrashFraction float64 `yaml:"crash_fraction"`
	// Replace makes each leaving peer replaced by a new one of its class
	// and region after an exponential delay of mean RejoinS (default 60),
	// so the mesh keeps its size.
	Replace bool    `yaml:"replace"`
	RejoinS float64 `yaml:"rejoin_s"`
	// Session shapes how long a peer stays, always with the mean
	// 1/LeavePerHour hours: "exp" (the default: memoryless), "lognormal"
	// with Sigma (measured peer-to-peer sessions are heavy-tailed: many
	// short ones, a few very long), or "const". Its Mean is not set: the
	// leave rate gives it.
	Session Dist `yaml:"session"`
}

// DHT is the record store's timing.
type DHT struct {
	// RecordTTLS is a capacity record's lifetime, republished every third
	// of it (default 300, mesh.DefaultRecordTTL).
	RecordTTLS float64 `yaml:"record_ttl_s"`
	// ViewRefreshS is how often views re-read the records (default 5,
	// mesh.DefaultViewRefresh).
	ViewRefreshS float64 `yaml:"view_refresh_s"`
	// BucketSize is Kademlia's k (default 20): a lookup takes about
	// log2(N)/log2(k)+1 hops, each a round trip.
	BucketSize int `yaml:"bucket_size"`
}

// Routing is how requesters choose among routes.
type Routing struct {
	// Spread draws each route among near-equal ones
	// (mesh.RouteRequest.Rand), as the node does (nil: true). false
	// passes no Rand, so every requester of one view takes the same best
	// route, as the mesh did before issue 15's spreading: the "before"
	// arm of a comparison, in the same code.
	Spread *bool `yaml:"spread"`
	// FreshLoad folds the load each hop's answer says into the requester's
	// view, as the node does (mesh.View's observeLoad, mesh.FreshLoad; nil:
	// true). false routes on the records' loads alone, up to a record
	// refresh old, as the simulator did before it modelled answers' loads.
	// Saturated runs route nearly every request afresh with it (the route
	// memo rarely hits), several times slower.
	FreshLoad *bool `yaml:"fresh_load"`
}

// Arm is a variant of the scenario: the same scenario with some
// parameters set (Scenario.Set paths to YAML values).
type Arm struct {
	Name string            `yaml:"name"`
	Set  map[string]string `yaml:"set"`
}

// Sweep names a parameter a sweep of this scenario varies and its values.
type SweepSpec struct {
	Param  string   `yaml:"param"`
	Values []string `yaml:"values"`
}

// Scenario is a simulation's whole input (its YAML form is documented in
// simulations/scenarios/README.md).
type Scenario struct {
	Name        string `yaml:"name"`
	Description string `yaml:"description"`
	Seed        int64  `yaml:"seed"`
	// DurationS is the virtual time simulated (default 600); SampleS the
	// sample interval of Result.Series (default DurationS/60).
	DurationS float64 `yaml:"duration_s"`
	SampleS   float64 `yaml:"sample_s"`
	Model     Model   `yaml:"model"`
	// Peers is how many peers start in the mesh (geography mode).
	Peers   int      `yaml:"peers"`
	Regions []Region `yaml:"regions"`
	Classes []Class  `yaml:"classes"`
	Network Network  `yaml:"network"`
	// Placement is how peers choose spans: "node" (mesh.Place, and
	// rebalancing with mesh.Rebalance), "random" or "even" (a static
	// split, in turn).
	Placement string `yaml:"placement"`
	// RebalanceS is the mean interval of a peer's rebalancing check (the
	// node's default 120; jittered as the node does: half to all of it);
	// -1 disables it.
	RebalanceS float64 `yaml:"rebalance_s"`
	// Replicas is how many peers should hold each block, what placement
	// "node" passes mesh.Place and mesh.Rebalance as PlaceRequest.Replicas
	// (default 2, the node's DefaultReplicas; 1: copies are not counted,
	// placement weighs throughput alone, as before the node counted them).
	Replicas int `yaml:"replicas"`
	// PlacementSpread is the PlaceRequest.Spread placement "node" passes
	// (nil: mesh.DefaultPlaceSpread, what the node passes; 0: exact ties
	// only, going to the lowest start, as before the node spread joins).
	PlacementSpread *float64 `yaml:"placement_spread"`
	Workload        Workload `yaml:"workload"`
	Churn           Churn    `yaml:"churn"`
	DHT             DHT      `yaml:"dht"`
	Routing         Routing  `yaml:"routing"`
	// Arms are variants to run side by side (see Arm); Sweep a sweep the
	// scenario is meant for. Run ignores both; (*Scenario).Arm applies one.
	Arms  []Arm      `yaml:"arms"`
	Sweep *SweepSpec `yaml:"sweep"`
}

// LoadScenario reads a scenario from a YAML file, fills in defaults and
// checks it.
func LoadScenario(path string) (*Scenario, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseScenario(data, strings.TrimSuffix(filepath.Base(path), filepath.Ext(path)))
}

// ParseScenario is LoadScenario on bytes already read; name is used when
// the YAML names none.
func ParseScenario(data []byte, name string) (*Scenario, error) {
	sc := &Scenario{}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(sc); errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: %s: empty", ErrBadScenario, name)
	} else if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadScenario, name, err)
	}
	if sc.Name == "" {
		sc.Name = name
	}
	if err := sc.check(); err != nil {
		return nil, err
	}
	return sc, nil
}

// Set changes one parameter of a scenario by its YAML path (for example
// "workload.rate", "churn.leave_per_hour" or "classes.0.share"), the value
// written as YAML, and checks the scenario again. Sweeps use it. On an
// error the scenario is unchanged.
func (s *Scenario) Set(path, value string) error {
	raw, err := yaml.Marshal(s)
	if err != nil {
		return err
	}
	var tree yaml.Node
	if err := yaml.Unmarshal(raw, &tree); err != nil {
		return err
	}
	var val yaml.Node
	if err := yaml.Unmarshal([]byte(value), &val); err != nil {
		return fmt.Errorf("%w: %s: value %q: %v", ErrBadScenario, path, value, err)
	}
	if len(val.Content) == 0 {
		return fmt.Errorf("%w: %s: empty value", ErrBadScenario, path)
	}
	if err := setNode(tree.Content[0], strings.Split(path, "."), val.Content[0], path); err != nil {
		return err
	}
	out, err := yaml.Marshal(&tree)
	if err != nil {
		return err
	}
	ns, err := ParseScenario(out, s.Name)
	if err != nil {
		return fmt.Errorf("%s=%s: %w", path, value, err)
	}
	*s = *ns
	return nil
}

// setNode sets the node at path under n; a missing mapping key is added
// (decoding then says whether the field exists).
func setNode(n *yaml.Node, path []string, val *yaml.Node, full string) error {
	if len(path) == 0 {
		*n = *val
		return nil
	}
	key := path[0]
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == key {
				return setNode(n.Content[i+1], path[1:], val, full)
			}
		}
		child := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
		if len(path) == 1 {
			child = val
		} else if err := setNode(child, path[1:], val, full); err != nil {
			return err
		}
		n.Content = append(n.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key}, child)
		return nil
	case yaml.SequenceNode:
		i, err := strconv.Atoi(key)
		if err != nil || i < 0 || i >= len(n.Content) {
			return fmt.Errorf("%w: %s: %q is not an index of a list of %d", ErrBadScenario, full, key, len(n.Content))
		}
		return setNode(n.Content[i], path[1:], val, full)
	case yaml.ScalarNode:
		if n.Tag == "!!null" { // an unset pointer field
			*n = yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
			return setNode(n, path, val, full)
		}
	}
	return fmt.Errorf("%w: %s: %q is not a mapping or list", ErrBadScenario, full, key)
}

// Clone returns a deep copy of the scenario.
func (s *Scenario) Clone() *Scenario {
	raw, err := yaml.Marshal(s)
	if err != nil {
		panic(err) // plain data always marshals
	}
	c := &Scenario{}
	if err := yaml.Unmarshal(raw, c); err != nil {
		panic(err)
	}
	return c
}

// Arm returns a copy of the scenario with the named arm's parameters set,
// named "<scenario>/<arm>".
func (s *Scenario) Arm(name string) (*Scenario, error) {
	for _, a := range s.Arms {
		if a.Name != name {
			continue
		}
		c := s.Clone()
		keys := make([]string, 0, len(a.Set))
		for k := range a.Set {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if err := c.Set(k, a.Set[k]); err != nil {
				return nil, fmt.Errorf("arm %s: %w", name, err)
			}
		}
		c.Name = s.Name + "/" + name
		c.Arms = nil
		return c, nil
	}
	return nil, fmt.Errorf("%w: %s has no arm %q", ErrBadScenario, s.Name, name)
}

func bad(field, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrBadScenario, field, fmt.Sprintf(format, args...))
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// check fills in defaults and checks every field, naming the first bad one.
func (s *Scenario) check() error {
	def := func(p *float64, v float64) {
		if *p == 0 {
			*p = v
		}
	}
	defI := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&s.DurationS, 600)
	if !(s.DurationS > 0) || !finite(s.DurationS) {
		return bad("duration_s", "must be > 0, is %v", s.DurationS)
	}
	def(&s.SampleS, s.DurationS/60)
	if !(s.SampleS > 0) || !finite(s.SampleS) {
		return bad("sample_s", "must be > 0, is %v", s.SampleS)
	}
	defI(&s.Model.Blocks, 32)
	def(&s.Model.BlockMB, 400)
	def(&s.Model.ActivationKB, 8)
	if s.Model.Blocks < 1 || s.Model.Blocks > 10000 {
		return bad("model.blocks", "must be 1..10000, is %d", s.Model.Blocks)
	}
	if !(s.Model.BlockMB > 0) || !(s.Model.ActivationKB > 0) {
		return bad("model", "block_mb and activation_kb must be > 0")
	}
	def(&s.Network.RouteFactor, 1.8)
	if !(s.Network.RouteFactor >= 1) || !finite(s.Network.RouteFactor) {
		return bad("network.route_factor", "must be >= 1, is %v", s.Network.RouteFactor)
	}
	if !(s.Network.CoordErrorMS >= 0) || !finite(s.Network.CoordErrorMS) {
		return bad("network.coord_error_ms", "must be >= 0, is %v", s.Network.CoordErrorMS)
	}
	if s.Routing.Spread == nil {
		v := true
		s.Routing.Spread = &v
	}
	if s.Routing.FreshLoad == nil {
		v := true
		s.Routing.FreshLoad = &v
	}
	if s.Network.HopOverheadUS == nil {
		v := 300.0
		s.Network.HopOverheadUS = &v
	}
	if v := *s.Network.HopOverheadUS; !(v >= 0) || !finite(v) {
		return bad("network.hop_overhead_us", "must be >= 0, is %v", v)
	}
	switch s.Placement {
	case "":
		s.Placement = "node"
	case "node", "random", "even":
	default:
		return bad("placement", "must be node, random or even, is %q", s.Placement)
	}
	def(&s.RebalanceS, 120)
	if s.RebalanceS < 0 && s.RebalanceS != -1 {
		return bad("rebalance_s", "must be > 0 or -1 (off), is %v", s.RebalanceS)
	}
	if s.PlacementSpread == nil {
		v := mesh.DefaultPlaceSpread
		s.PlacementSpread = &v
	}
	if v := *s.PlacementSpread; !(v >= 0) || !finite(v) {
		return bad("placement_spread", "must be >= 0, is %v", v)
	}
	defI(&s.Replicas, defaultReplicas)
	if s.Replicas < 1 {
		return bad("replicas", "must be >= 1, is %d", s.Replicas)
	}
	if err := s.checkWorkload(); err != nil {
		return err
	}
	c := &s.Churn
	if !(c.LeavePerHour >= 0) || c.LeavePerHour > 100 {
		return bad("churn.leave_per_hour", "must be 0..100 (a fraction per hour), is %v", c.LeavePerHour)
	}
	if !(c.CrashFraction >= 0 && c.CrashFraction <= 1) {
		return bad("churn.crash_fraction", "must be 0..1, is %v", c.CrashFraction)
	}
	def(&c.RejoinS, 60)
	if !(c.RejoinS > 0) {
		return bad("churn.rejoin_s", "must be > 0, is %v", c.RejoinS)
	}
	switch d := c.Session; {
	case d.Mean != 0 || d.Min != 0 || d.Max != 0:
		return bad("churn.session", "takes only dist (and sigma): its mean is 1/leave_per_hour hours")
	case d.Dist != "" && d.Dist != "exp" && d.Dist != "lognormal" && d.Dist != "const":
		return bad("churn.session.dist", "must be exp, lognormal or const, is %q", d.Dist)
	case !(d.Sigma >= 0) || d.Sigma > 4:
		return bad("churn.session.sigma", "must be 0..4, is %v", d.Sigma)
	}
	def(&s.DHT.RecordTTLS, mesh.DefaultRecordTTL.Seconds())
	def(&s.DHT.ViewRefreshS, mesh.DefaultViewRefresh.Seconds())
	defI(&s.DHT.BucketSize, 20)
	if !(s.DHT.RecordTTLS > 0) || !(s.DHT.ViewRefreshS > 0) || s.DHT.BucketSize < 2 {
		return bad("dht", "record_ttl_s and view_refresh_s must be > 0, bucket_size >= 2")
	}
	for i, a := range s.Arms {
		if a.Name == "" {
			return bad(fmt.Sprintf("arms.%d.name", i), "must be set")
		}
	}
	if s.Sweep != nil && (s.Sweep.Param == "" || len(s.Sweep.Values) == 0) {
		return bad("sweep", "needs param and values")
	}
	if len(s.Network.Nodes) > 0 {
		return s.checkExplicit()
	}
	return s.checkGeo()
}

func (s *Scenario) checkWorkload() error {
	w := &s.Workload
	if !(w.Rate > 0) || !finite(w.Rate) {
		return bad("workload.rate", "must be > 0 requests/s, is %v", w.Rate)
	}
	switch w.Arrivals {
	case "":
		w.Arrivals = "poisson"
	case "poisson", "uniform":
	default:
		return bad("workload.arrivals", "must be poisson or uniform, is %q", w.Arrivals)
	}
	if !(w.Diurnal >= 0 && w.Diurnal <= 1) {
		return bad("workload.diurnal", "must be 0..1, is %v", w.Diurnal)
	}
	if !(w.Generate >= 0 && w.Generate <= 1) {
		return bad("workload.generate", "must be 0..1, is %v", w.Generate)
	}
	if w.Prompt.Dist == "" {
		w.Prompt = Dist{Dist: "const", Mean: 128}
	}
	if w.Output.Dist == "" {
		w.Output = Dist{Dist: "const", Mean: 64}
	}
	if err := w.Prompt.check("workload.prompt"); err != nil {
		return err
	}
	if err := w.Output.check("workload.output"); err != nil {
		return err
	}
	if w.Entries == 0 {
		w.Entries = 64
	}
	if w.Entries < 1 {
		return bad("workload.entries", "must be >= 1, is %d", w.Entries)
	}
	if w.EntryLastMileMS == 0 {
		w.EntryLastMileMS = 5
	}
	if w.EntryBandwidthMbps == 0 {
		w.EntryBandwidthMbps = 100
	}
	if w.EntryLastMileMS < 0 || !(w.EntryBandwidthMbps > 0) {
		return bad("workload", "entry_last_mile_ms must be >= 0 and entry_bandwidth_mbps > 0")
	}
	if w.GatewayLastMileMS == 0 {
		w.GatewayLastMileMS = 0.2
	}
	if w.GatewayBandwidthMbps == 0 {
		w.GatewayBandwidthMbps = 10000
	}
	if w.GatewayLastMileMS < 0 || !(w.GatewayBandwidthMbps > 0) || !finite(w.GatewayLastMileMS) {
		return bad("workload", "gateway_last_mile_ms must be >= 0 and gateway_bandwidth_mbps > 0")
	}
	switch w.Decode {
	case "":
		w.Decode = DecodeRing
	case DecodeRing, DecodeRequester:
	default:
		return bad("workload.decode", "must be %s or %s, is %q", DecodeRing, DecodeRequester, w.Decode)
	}
	if w.StepTimeoutS == 0 {
		w.StepTimeoutS = 30
	}
	if w.MaxFailovers == 0 {
		w.MaxFailovers = 16
	}
	if !(w.StepTimeoutS > 0) || w.MaxFailovers < 0 || w.MaxRequests < 0 {
		return bad("workload", "step_timeout_s must be > 0, max_failovers and max_requests >= 0")
	}
	return nil
}

func (d *Dist) check(name string) error {
	switch d.Dist {
	case "const", "exp":
		if !(d.Mean >= 1) {
			return bad(name+".mean", "must be >= 1, is %v", d.Mean)
		}
	case "lognormal":
		if !(d.Mean >= 1) || !(d.Sigma >= 0) {
			return bad(name, "lognormal needs mean >= 1 and sigma >= 0")
		}
	case "uniform":
		if !(d.Min >= 1) || d.Max < d.Min {
			return bad(name, "uniform needs 1 <= min <= max")
		}
	default:
		return bad(name+".dist", "must be const, exp, uniform or lognormal, is %q", d.Dist)
	}
	if d.Max < 0 || d.Min < 0 {
		return bad(name, "min and max must be >= 0")
	}
	return nil
}

func (s *Scenario) checkGeo() error {
	if s.Peers < 1 {
		return bad("peers", "must be >= 1, is %d", s.Peers)
	}
	if len(s.Regions) == 0 {
		return bad("regions", "at least one region needed")
	}
	names := map[string]bool{}
	users, peers := 0.0, 0.0
	for i := range s.Regions {
		r := &s.Regions[i]
		f := fmt.Sprintf("regions.%d", i)
		if r.Name == "" || names[r.Name] {
			return bad(f+".name", "must be set and unique, is %q", r.Name)
		}
		names[r.Name] = true
		if !(r.Lat >= -90 && r.Lat <= 90) || !(r.Lon >= -180 && r.Lon <= 180) {
			return bad(f, "lat must be -90..90 and lon -180..180")
		}
		if !(r.Weight >= 0) || (r.PeerWeight != nil && !(*r.PeerWeight >= 0)) {
			return bad(f, "weight and peer_weight must be >= 0")
		}
		if r.RadiusKM == 0 {
			r.RadiusKM = 300
		}
		if r.RadiusKM < 0 {
			return bad(f+".radius_km", "must be >= 0")
		}
		users += r.Weight
		peers += r.peerWeight()
	}
	if !(users > 0) {
		return bad("regions", "some region needs weight > 0 (users)")
	}
	withUsers := 0
	for _, r := range s.Regions {
		if r.Weight > 0 {
			withUsers++
		}
	}
	if g := s.Workload.Gateway; g == "local" && names[g] {
		return bad("workload.gateway", "local is ambiguous: a region has that name")
	} else if g != "" && g != "local" && !names[g] {
		return bad("workload.gateway", "no region %q (a region's name, or local)", g)
	}
	if s.Workload.Entries < withUsers {
		return bad("workload.entries", "%d entry nodes for %d regions with users: each needs one", s.Workload.Entries, withUsers)
	}
	if !(peers > 0) {
		return bad("regions", "some region needs peer_weight > 0 (peers)")
	}
	if len(s.Classes) == 0 {
		return bad("classes", "at least one peer class needed")
	}
	share := 0.0
	for i := range s.Classes {
		c := &s.Classes[i]
		f := fmt.Sprintf("classes.%d", i)
		if c.Name == "" {
			return bad(f+".name", "must be set")
		}
		if !(c.Share >= 0) {
			return bad(f+".share", "must be >= 0")
		}
		share += c.Share
		if !(c.BlockMS > 0) || !finite(c.BlockMS) {
			return bad(f+".block_ms", "must be > 0, is %v", c.BlockMS)
		}
		if c.PrefillFactor == nil {
			v := 0.05
			c.PrefillFactor = &v
		}
		if !(*c.PrefillFactor >= 0) {
			return bad(f+".prefill_factor", "must be >= 0")
		}
		if !(c.MemoryGB > 0) {
			return bad(f+".memory_gb", "must be > 0, is %v", c.MemoryGB)
		}
		if c.BandwidthMbps == 0 {
			c.BandwidthMbps = 1000
		}
		if c.Slots == 0 {
			c.Slots = 8
		}
		if c.Sessions == 0 {
			c.Sessions = 256
		}
		if !(c.BandwidthMbps > 0) || c.LastMileMS < 0 || c.JitterMS < 0 || c.Slots < 1 || badQueue(c.Queue) || c.Sessions < -1 {
			return bad(f, "bandwidth_mbps > 0, last_mile_ms and jitter_ms >= 0, slots >= 1, queue and sessions >= -1 needed")
		}
		w := 0.0
		for _, rn := range c.Regions {
			if !names[rn] {
				return bad(f+".regions", "unknown region %q", rn)
			}
			w += s.region(rn).peerWeight()
		}
		if len(c.Regions) > 0 && !(w > 0) {
			return bad(f+".regions", "its regions have no peer_weight")
		}
	}
	if !(share > 0) {
		return bad("classes", "some class needs share > 0")
	}
	return nil
}

// badQueue reports whether a class's or node's queue is out of bounds
// (under -1).
func badQueue(q *int) bool { return q != nil && *q < -1 }

// queueOf is the queue a peer of slots slots gets: q, or 4 x slots when
// unset (the stage server's default).
func queueOf(q *int, slots int) int {
	if q == nil {
		return stageQueuePerSlot * slots
	}
	return *q
}

// defaultReplicas is the node's DefaultReplicas (node/join.go; the
// simulator may not import node): every block on two peers.
const defaultReplicas = 2

// stageQueuePerSlot is the stage server's queue per slot: it queues
// 4 x MaxInFlight passes by default (mesh.StageConfig).
const stageQueuePerSlot = 4

func (r *Region) peerWeight() float64 {
	if r.PeerWeight != nil {
		return *r.PeerWeight
	}
	return r.Weight
}

func (s *Scenario) region(name string) *Region {
	for i := range s.Regions {
		if s.Regions[i].Name == name {
			return &s.Regions[i]
		}
	}
	return nil
}

func (s *Scenario) checkExplicit() error {
	n := len(s.Network.Nodes)
	if s.Workload.Gateway != "" {
		return bad("workload.gateway", "needs the geography mode (regions): an explicit topology's requester is its entry node")
	}
	if len(s.Network.LatencyMS) != n {
		return bad("network.latency_ms", "needs %d rows (one per node), has %d", n, len(s.Network.LatencyMS))
	}
	for i, row := range s.Network.LatencyMS {
		if len(row) != n {
			return bad(fmt.Sprintf("network.latency_ms.%d", i), "needs %d entries, has %d", n, len(row))
		}
		for j, v := range row {
			if !(v >= 0) || !finite(v) {
				return bad(fmt.Sprintf("network.latency_ms.%d.%d", i, j), "must be >= 0, is %v", v)
			}
		}
	}
	req := false
	for i := range s.Network.Nodes {
		nd := &s.Network.Nodes[i]
		f := fmt.Sprintf("network.nodes.%d", i)
		if nd.Name == "" {
			nd.Name = fmt.Sprintf("node%d", i)
		}
		if nd.Start < 0 || nd.End > s.Model.Blocks || (nd.End != 0 && nd.End <= nd.Start) {
			return bad(f, "span [%d, %d) is not within the model's %d blocks", nd.Start, nd.End, s.Model.Blocks)
		}
		if nd.End > 0 {
			if len(nd.BlockUS) != 1 && len(nd.BlockUS) != nd.End-nd.Start {
				return bad(f+".block_us", "must be one number or a list of %d (one per served block) for a serving node, has %d",
					nd.End-nd.Start, len(nd.BlockUS))
			}
			for _, v := range nd.BlockUS {
				if !(v > 0) || !finite(v) {
					return bad(f+".block_us", "must be > 0 for a serving node, is %v", v)
				}
			}
		}
		if nd.PrefillFactor == nil {
			v := 0.05
			nd.PrefillFactor = &v
		}
		if nd.BandwidthMbps == 0 {
			nd.BandwidthMbps = 1000
		}
		if nd.Slots == 0 {
			nd.Slots = 8
		}
		if nd.Sessions == 0 {
			nd.Sessions = 256
		}
		if !(nd.BandwidthMbps > 0) || nd.Slots < 1 || badQueue(nd.Queue) || nd.Sessions < -1 || !(*nd.PrefillFactor >= 0) ||
			!(nd.JitterMS >= 0) || !finite(nd.JitterMS) {
			return bad(f, "bandwidth_mbps > 0, slots >= 1, queue and sessions >= -1, prefill_factor and jitter_ms >= 0 needed")
		}
		req = req || nd.Requester
	}
	if !req {
		return bad("network.nodes", "no node is a requester")
	}
	return nil
}
