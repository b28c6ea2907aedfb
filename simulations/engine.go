package simulations

// The engine: the simulated mesh and the handlers of its events. Routing,
// placement, rebalancing, bans and session replay are mesh's functions
// (mesh.PlanRouteTiered, mesh.Place, mesh.Rebalance, mesh.BanDuration,
// mesh.ReplayFrom...); this file only feeds them the simulated view and
// carries out their decisions on the virtual clock.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
)

// quicIdle is quic-go's idle timeout (libp2p keeps the default): a
// crashed peer's connections look alive this long, so a pass sent to it
// stalls; after it, a sender's new dial fails within the stage server's
// dialTimeout (mesh's linkDialTimeout) and the hop is reported
// unreachable.
const (
	quicIdle    = 30e9
	dialTimeout = 2e9
)

// dropGrace is how long a peer that moved keeps serving its old span (the
// node's dropGrace), so sessions on it finish or fail over cleanly.
const dropGrace = 30e9

// Independent random streams, one per concern, so that changing one part
// of a scenario (say churn) does not change the draws of another (the
// workload).
const (
	streamWorkload = iota + 1
	streamPeers
	streamChurn
	streamNetwork
	streamPlacement
	streamTimers
	streamCoords
	streamGateway
	streamRoute
	streamCapacity
)

type hop struct {
	peer       int32
	start, end int32
}

type request struct {
	entry          int32 // the node that runs it: the user's, or its gateway
	user           int32 // the user's own entry node (its place and region)
	gen, live      bool
	ring           bool // a generation run as a decode ring (workload.decode)
	prompt, output int32
	step           int32 // steps done (0: the prompt pass is next); a ring's: tokens the requester has
	failovers      int32 // of the step in flight
	retries        int32 // routing attempts that found no route
	from           int32 // the hop the step's attempts start at
	epoch          uint32
	// tokEpoch is a ring's epoch for its tokens on their way to the
	// requester: a failed step does not cancel them (they left the last
	// hop before it failed, and Session.ringOnce takes every one that
	// arrives before the failure's notice); the notice does.
	tokEpoch uint32
	arrive   int64
	sent     int64 // when the step's clock started: the attempt left the entry node; a ring's, its last token reached it
	firstTok int64
	out      int64   // gateway mode: the first token's way from the gateway to the user, ns
	route    []hop   // shared with the memo until replaced: never written in place
	held     []int32 // peers holding this session's state
	// ringStep is the step a ring has at its hops now (0: the prompt,
	// k: the one yielding token k; only one is ever there), and forced
	// how many of this ring's first steps replay tokens the requester
	// already has (after a failover)
	ringStep, forced int32
	// recv is how many of this ring's steps have brought their token to
	// the requester (forced ones too: Session.ringOnce's step); resumes the
	// busy answers in a row resumed on this route (maxRingResumes), and
	// pass the hops that answer a resumed step from what they kept (those
	// before the one that was busy).
	recv, resumes, pass int32
}

type simPeer struct {
	id          peer.ID
	class       int
	region      int
	ep          *endpoint
	micros      []float64 // per block of the model, µs per token
	prefill     float64
	capacity    int // blocks it can hold
	start, end  int
	slots       []int64 // when each slot is free
	queue       int
	waiting     []int64  // start times of queued passes, FIFO
	inflight    []flight // requests computing or queued here
	maxSessions int      // -1: no bound
	sessions    int      // open now
	online      bool
	gone        bool
	crashed     bool
	moving      bool
	joined      int64
	left        int64
	oldStart    int
	oldEnd      int
	movedAt     int64
	passes      int64
	busy        int64
	failed      int
	rec         record
	everOnline  bool
	replacement bool
}

// record is a peer's capacity record as last published to the DHT.
type record struct {
	seq        int
	start, end int
	load       protocol.Load
	published  int64
	expires    int64
	withdrawn  bool // a leaving peer's empty record
}

// flight is a request's pass at a peer, as of the request's epoch.
type flight struct {
	req   int32
	epoch uint32
}

type entryNode struct {
	id       peer.ID // the requester's own peer ID in explicit mode, "" otherwise
	self     int32   // its peer index in explicit mode, -1 otherwise
	ep       *endpoint
	region   int
	bans     map[int32]int64 // until
	banCount map[int32]int
	distrust map[int32]int // record seq distrusted
	memoV    int64
	memo     map[string][]routeMemo // up to routeDraws routes per key
	// seen is, per peer, the load its latest answer to this node said,
	// when it differed from the peer's record in the view (observe)
	seen map[int32]seenLoad
}

// seenLoad is a hop's load as its answer said it (protocol.HopLoad), and
// when.
type seenLoad struct {
	load protocol.HopLoad
	at   int64
}

// loadForget is mesh's loadForget (mesh/view.go, unexported there): an
// answer's load older than this no longer counts.
const loadForget = 10 * int64(mesh.LoadHalfLife)

// regionLat collects one users' region's latencies.
type regionLat struct {
	lat               Latencies
	completed, failed int
}

// routeDraws is how many routes the memo keeps per entry node, view, span
// and bans: mesh.PlanRoute draws each among near-equal routes
// (RouteRequest.Rand), as a node does for every request; past routeDraws
// draws, a request takes one of them at random, which costs a memo hit.
const routeDraws = 8

type routeMemo struct {
	hops []hop
	err  error
}

// view is what every node's View holds at one refresh: the records
// published before it and not expired. All nodes refresh on the same
// ViewRefresh ticks (a simplification: real nodes' refreshes are out of
// phase by up to one period).
type view struct {
	version int64
	cands   []mesh.RouteCandidate
	at      []int32 // per peer index, its position in cands or -1
	loaded  mesh.BlockTotals
	speeds  mesh.BlockTotals // loads zeroed, for rebalancing
	pools   map[int][]mesh.RouteCandidate
}

type sim struct {
	sc      *Scenario
	ctx     context.Context
	q       eventQueue
	now     int64
	end     int64
	net     network
	rWork   *rand.Rand
	rPeers  *rand.Rand
	rChurn  *rand.Rand
	rPlace  *rand.Rand
	rTimers *rand.Rand
	rRoute  *rand.Rand // mesh.RouteRequest.Rand; nil: deterministic routes

	peers    []*simPeer
	online   int
	entries  []*entryNode
	byRegion [][]int32 // entry nodes per region
	// gateways is, per entry node, the gateway node its users' requests
	// enter through (workload.gateway); nil: none
	gateways []int32
	regionEP []*endpoint
	// userWeights are the regions' shares of the users (nil in the
	// explicit mode)
	userWeights []float64
	// regionRadius is, per region, the farthest of its entry nodes from
	// its centre, in RTT
	regionRadius []time.Duration
	classMicro   [][]float64
	covered      []int32 // online servers per block
	// onlineCap is how many blocks the online peers can hold, all
	// together; lostAt, per block, when it lost its last online holder
	// (-1: it has one)
	onlineCap int
	lostAt    []int64
	evenNext  int

	reqs    []request
	free    []int32
	live    int
	arrived int

	v        *view
	ttl      int64
	refresh  int64
	timeout  int64
	actBytes float64

	// results
	events     int64
	completed  int
	failed     int
	tokens     int64
	failovers  int
	resumes    int
	replays    int
	hopsSum    int64
	routes     int64
	joins      int
	moves      int
	keeps      int // moves given up: the peer held a last copy (mesh.LastCopies)
	leaves     int
	lat        Latencies
	cur        Sample
	curE2E     []float64
	series     []Sample
	minCov     float64
	blocks     BlockLoss
	memoHits   int64
	failKinds  [4]int
	regionLat  []regionLat // per users' region
	routeCalls int64
	// capSum is, per block, the sum over the sample ticks of its online
	// holders' capacity, requests/s (sampleCapacity); capBase and capExtra
	// the workload's W_p = capBase + capExtra × prefill_p.
	capSum            []float64
	capBase, capExtra float64
	capSamples        int
	flowSum           float64 // Σ over the samples of flowCapacity
}

func newSim(ctx context.Context, sc *Scenario) (*sim, error) {
	seed := uint64(sc.Seed)
	stream := func(k uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15*k)) }
	s := &sim{sc: sc, ctx: ctx, end: int64(sc.DurationS * 1e9),
		rWork: stream(streamWorkload), rPeers: stream(streamPeers), rChurn: stream(streamChurn),
		rPlace: stream(streamPlacement), rTimers: stream(streamTimers), rRoute: stream(streamRoute),
		ttl: int64(sc.DHT.RecordTTLS * 1e9), refresh: int64(sc.DHT.ViewRefreshS * 1e9),
		timeout: int64(sc.Workload.StepTimeoutS * 1e9), actBytes: sc.Model.ActivationKB * 1000,
		covered: make([]int32, sc.Model.Blocks), lostAt: make([]int64, sc.Model.Blocks), minCov: 1}
	for b := range s.lostAt {
		s.lostAt[b] = -1
	}
	s.blocks.MinHolders = -1
	s.net = network{factor: sc.Network.RouteFactor, rng: stream(streamNetwork), coordErr: sc.Network.CoordErrorMS / 1e3,
		coordRng: stream(streamCoords), overhead: int64(*sc.Network.HopOverheadUS * 1e3)}
	if !*sc.Routing.Spread {
		s.rRoute = nil
	}
	if len(sc.Network.Nodes) > 0 {
		s.initExplicit()
	} else {
		s.initGeo()
	}
	s.q.push(event{t: 0, kind: evArrival})
	s.q.push(event{t: int64(sc.SampleS * 1e9), kind: evSample})
	return s, nil
}

func peerID(i int) peer.ID { return peer.ID("p" + fmt.Sprintf("%07d", i)) }

func peerIndex(id peer.ID) int32 {
	n, err := strconv.Atoi(string(id[1:]))
	if err != nil {
		panic("simulations: foreign peer ID " + string(id))
	}
	return int32(n)
}

func (s *sim) initExplicit() {
	sc := s.sc
	n := len(sc.Network.Nodes)
	s.net.explicit = make([][]int64, n)
	for i, row := range sc.Network.LatencyMS {
		s.net.explicit[i] = make([]int64, n)
		for j, v := range row {
			s.net.explicit[i][j] = int64(v * 1e6)
		}
	}
	coords := fitCoords(s.net.explicit, s.rPeers)
	for i := range coords {
		coords[i] = s.net.perturb(coords[i])
	}
	s.byRegion = [][]int32{nil}
	for i, nd := range sc.Network.Nodes {
		ep := &endpoint{node: i, bw: nd.BandwidthMbps * 1e6 / 8 / 1e9, jitter: nd.JitterMS * 1e6, coord: coords[i]}
		micros := make([]float64, sc.Model.Blocks)
		for b := range micros {
			// Blocks it does not serve never run here; they keep the
			// span's first figure.
			if len(nd.BlockUS) > 0 {
				micros[b] = nd.BlockUS.at(min(max(b-nd.Start, 0), max(nd.End-nd.Start-1, 0)))
			}
		}
		p := &simPeer{id: peerID(i), ep: ep, micros: micros, prefill: *nd.PrefillFactor, capacity: max(nd.End-nd.Start, 1),
			start: nd.Start, end: nd.End, slots: make([]int64, nd.Slots), queue: queueOf(nd.Queue, nd.Slots), maxSessions: nd.Sessions}
		s.peers = append(s.peers, p)
		s.goOnline(p)
		if nd.Requester {
			s.byRegion[0] = append(s.byRegion[0], int32(len(s.entries)))
			s.entries = append(s.entries, &entryNode{id: p.id, self: int32(i), ep: ep})
		}
	}
}

func (s *sim) initGeo() {
	sc := s.sc
	w := &sc.Workload
	for _, c := range sc.Classes {
		m := make([]float64, sc.Model.Blocks)
		for b := range m {
			m[b] = c.BlockMS * 1000
		}
		s.classMicro = append(s.classMicro, m)
	}
	s.byRegion = make([][]int32, len(sc.Regions))
	for _, r := range sc.Regions {
		ep := newEndpoint(r.Lat, r.Lon, w.EntryLastMileMS, 0, w.EntryBandwidthMbps)
		ep.coord = s.net.geoCoord(&ep)
		s.regionEP = append(s.regionEP, &ep)
	}
	// Entry nodes: spread over the regions by user weight, at least one
	// in each region that has users.
	s.regionLat = make([]regionLat, len(sc.Regions))
	s.userWeights = make([]float64, len(sc.Regions))
	for i, r := range sc.Regions {
		s.userWeights[i] = r.Weight
	}
	weights := s.userWeights
	var first []int // one entry node in each region with users first
	for i, r := range sc.Regions {
		if r.Weight > 0 {
			first = append(first, i)
		}
	}
	for i := range w.Entries {
		r := pick(s.rPeers, weights)
		if i < len(first) {
			r = first[i]
		}
		reg := &sc.Regions[r]
		lat, lon := place(s.rPeers, reg.Lat, reg.Lon, reg.RadiusKM)
		ep := newEndpoint(lat, lon, w.EntryLastMileMS, 0, w.EntryBandwidthMbps)
		ep.coord = s.net.perturb(s.net.geoCoord(&ep))
		s.byRegion[r] = append(s.byRegion[r], int32(len(s.entries)))
		s.entries = append(s.entries, &entryNode{self: -1, ep: &ep, region: r})
	}
	// Gateway nodes: one per entry node, placed as entry nodes are on the
	// gateway region's disc (gateway "local": the entry node's own
	// region's), from their own stream (the placement draws stay as they
	// are without a gateway).
	gws := make([][]int32, len(sc.Regions))
	if w.Gateway != "" {
		g := slices.IndexFunc(sc.Regions, func(r Region) bool { return r.Name == w.Gateway })
		k := uint64(streamGateway)
		rng := rand.New(rand.NewPCG(uint64(sc.Seed), 0x9e3779b97f4a7c15*k))
		for i := range w.Entries {
			r := g
			if r < 0 {
				r = s.entries[i].region
			}
			reg := &sc.Regions[r]
			lat, lon := place(rng, reg.Lat, reg.Lon, reg.RadiusKM)
			ep := newEndpoint(lat, lon, w.GatewayLastMileMS, 0, w.GatewayBandwidthMbps)
			ep.coord = s.net.perturb(s.net.geoCoord(&ep))
			gws[r] = append(gws[r], int32(len(s.entries)))
			s.gateways = append(s.gateways, int32(len(s.entries)))
			s.entries = append(s.entries, &entryNode{self: -1, ep: &ep, region: r})
		}
	}
	s.regionRadius = make([]time.Duration, len(sc.Regions))
	for r, es := range s.byRegion {
		centre := s.regionEP[r].coord.Vec
		es = append(slices.Clone(es), gws[r]...)
		for _, e := range es {
			d := 0.0
			for i, x := range s.entries[e].ep.coord.Vec {
				d += (x - centre[i]) * (x - centre[i])
			}
			s.regionRadius[r] = max(s.regionRadius[r], time.Duration(math.Ceil(math.Sqrt(d)*1e9)))
		}
	}
	shares := make([]float64, len(sc.Classes))
	for i, c := range sc.Classes {
		shares[i] = c.Share
	}
	// Initial peers join one after another, each placing itself on what
	// the ones before it serve (their records, loads all zero).
	totals := mesh.BlockTotals{Tput: make([]float64, sc.Model.Blocks), Count: make([]int, sc.Model.Blocks)}
	for range sc.Peers {
		c := pick(s.rPeers, shares)
		p := s.newPeer(c, s.classRegion(c))
		s.choose(p, totals)
		s.goOnline(p)
		for b := p.start; b < p.end; b++ {
			totals.Tput[b] += 1e6 / max(p.micros[b], 1)
			totals.Count[b]++
		}
	}
}

// pick draws an index with probability proportional to its weight.
func pick(rng *rand.Rand, w []float64) int {
	sum := 0.0
	for _, x := range w {
		sum += x
	}
	u := rng.Float64() * sum
	for i, x := range w {
		if u < x {
			return i
		}
		u -= x
	}
	for i := len(w) - 1; i >= 0; i-- {
		if w[i] > 0 {
			return i
		}
	}
	return 0
}

func (s *sim) classRegion(c int) int {
	sc := s.sc
	cl := &sc.Classes[c]
	if len(cl.Regions) == 0 {
		w := make([]float64, len(sc.Regions))
		for i := range sc.Regions {
			w[i] = sc.Regions[i].peerWeight()
		}
		return pick(s.rPeers, w)
	}
	w := make([]float64, len(cl.Regions))
	for i, n := range cl.Regions {
		w[i] = sc.region(n).peerWeight()
	}
	return slices.IndexFunc(sc.Regions, func(r Region) bool { return r.Name == cl.Regions[pick(s.rPeers, w)] })
}

func (s *sim) newPeer(c, r int) *simPeer {
	sc := s.sc
	cl := &sc.Classes[c]
	reg := &sc.Regions[r]
	lat, lon := place(s.rPeers, reg.Lat, reg.Lon, reg.RadiusKM)
	ep := newEndpoint(lat, lon, cl.LastMileMS, cl.JitterMS, cl.BandwidthMbps)
	ep.coord = s.net.perturb(s.net.geoCoord(&ep))
	capacity := int(max(1, min(float64(sc.Model.Blocks), math.Floor(cl.MemoryGB*1000/sc.Model.BlockMB))))
	p := &simPeer{id: peerID(len(s.peers)), class: c, region: r, ep: &ep, micros: s.classMicro[c], prefill: *cl.PrefillFactor,
		capacity: capacity, slots: make([]int64, cl.Slots), queue: queueOf(cl.Queue, cl.Slots), maxSessions: cl.Sessions}
	s.peers = append(s.peers, p)
	return p
}

// choose sets a new peer's span by the scenario's placement, given what
// the mesh serves (totals).
func (s *sim) choose(p *simPeer, totals mesh.BlockTotals) {
	blocks := s.sc.Model.Blocks
	n := p.capacity
	switch s.sc.Placement {
	case "random":
		p.start = s.rPlace.IntN(blocks - n + 1)
	case "even":
		p.start = s.evenNext
		if p.start+n > blocks {
			p.start = 0
		}
		s.evenNext = (p.start + n) % blocks
	default:
		agg, scale := mesh.AggregateCopies(totals, s.sc.Replicas)
		pl, err := mesh.Place(agg, s.placeRequest(p, scale))
		if err != nil {
			panic(err) // the scenario check rules this out
		}
		p.start = pl.Start
	}
	p.end = p.start + n
}

// placeRequest is what p asks mesh.Place and mesh.Rebalance, as a node
// does (node.place): its span and speed (its block times times scale, see
// mesh.AggregateCopies), the scenario's Replicas and PlacementSpread
// (the node's mesh.DefaultPlaceSpread by default).
func (s *sim) placeRequest(p *simPeer, scale float64) mesh.PlaceRequest {
	return mesh.PlaceRequest{Blocks: s.sc.Model.Blocks, Span: p.capacity, MyMicros: scaled(p.micros, scale), Self: p.id,
		Replicas: s.sc.Replicas, Spread: *s.sc.PlacementSpread, NoReason: true}
}

// scaled returns micros times scale (see mesh.AggregateCopies).
func scaled(micros []float64, scale float64) []float64 {
	out := make([]float64, len(micros))
	for i, m := range micros {
		out[i] = m * scale
	}
	return out
}

// goOnline puts a peer in the mesh and publishes its record.
func (s *sim) goOnline(p *simPeer) {
	p.online, p.everOnline, p.joined = true, true, s.now
	s.online++
	s.onlineCap += p.capacity
	s.cover(p.start, p.end, 1)
	s.publish(p)
	ttl3 := s.ttl / 3
	// The first republish comes at a random phase, so that peers that
	// started together do not republish together.
	s.q.push(event{t: s.now + 1 + s.rTimers.Int64N(ttl3), kind: evPublish, a: peerIndex(p.id)})
	if s.sc.Placement == "node" && s.sc.RebalanceS > 0 && len(s.sc.Network.Nodes) == 0 {
		s.scheduleRebalance(p)
	}
	if s.sc.Churn.LeavePerHour > 0 && len(s.sc.Network.Nodes) == 0 {
		session := s.sessionLength(s.now == 0)
		crash := uint8(0)
		if s.rChurn.Float64() < s.sc.Churn.CrashFraction {
			crash = 1
		}
		s.q.push(event{t: s.now + session, kind: evLeave, a: peerIndex(p.id), x: crash})
	}
}

// sessionLength draws how long a peer going online now stays, in ns: a
// session of mean 1/LeavePerHour hours shaped as Churn.Session says. A peer
// of the starting mesh is part-way through its session: it gets what is left
// of one drawn in proportion to its length (a renewal process in its steady
// state), so that peers leave at the set rate from the start rather than in
// a burst of the short sessions. Exponential sessions are memoryless: what
// is left of one is one.
func (s *sim) sessionLength(initial bool) int64 {
	mean := 3600 / s.sc.Churn.LeavePerHour
	d := s.sc.Churn.Session
	var v float64
	switch d.Dist {
	case "", "exp":
		v = s.rChurn.ExpFloat64() * mean
	case "const":
		v = mean
		if initial {
			v *= s.rChurn.Float64()
		}
	case "lognormal":
		mu := math.Log(mean) - d.Sigma*d.Sigma/2
		if initial {
			mu += d.Sigma * d.Sigma // the length-biased lognormal
		}
		v = math.Exp(mu + d.Sigma*s.rChurn.NormFloat64())
		if initial {
			v *= s.rChurn.Float64()
		}
	}
	return max(int64(v*1e9), 1)
}

func (s *sim) scheduleRebalance(p *simPeer) {
	every := int64(s.sc.RebalanceS * 1e9)
	s.q.push(event{t: s.now + every/2 + s.rTimers.Int64N(every/2+1), kind: evRebalance, a: peerIndex(p.id)})
}

// cover counts d more online holders of blocks [start, end), and the
// blocks that lose their last one (BlockLoss): online peers hold what they
// serve (a peer that moved drops its old span's blocks), so a block none
// of them holds is gone from the mesh.
func (s *sim) cover(start, end int, d int32) {
	for b := start; b < end; b++ {
		s.covered[b] += d
		switch {
		case s.covered[b] == 0 && d < 0:
			s.lostAt[b] = s.now
			s.blocks.Lost++
			if s.onlineCap >= s.sc.Model.Blocks {
				s.blocks.LostWithRoom++
			}
		case s.covered[b] == d && d > 0 && s.lostAt[b] >= 0:
			s.blocks.LostS += float64(s.now-s.lostAt[b]) / 1e9
			s.lostAt[b] = -1
		}
	}
}

func (s *sim) coverage() float64 {
	n := 0
	for _, c := range s.covered {
		if c > 0 {
			n++
		}
	}
	return float64(n) / float64(len(s.covered))
}

// publish writes p's record: its span and load now, for a RecordTTL.
func (s *sim) publish(p *simPeer) {
	busy := int32(0)
	for _, f := range p.slots {
		if f > s.now {
			busy++
		}
	}
	p.rec = record{seq: p.rec.seq + 1, start: p.start, end: p.end, published: s.now, expires: s.now + s.ttl,
		load: protocol.Load{InFlight: int(busy), Queued: s.queued(p)}}
}

func (s *sim) queued(p *simPeer) int {
	i := 0
	for i < len(p.waiting) && p.waiting[i] <= s.now {
		i++
	}
	p.waiting = p.waiting[i:]
	return len(p.waiting)
}

// currentView returns the view of the refresh tick at or before now,
// building it on first use.
func (s *sim) currentView() *view {
	version := s.now / s.refresh
	if s.v != nil && s.v.version == version {
		return s.v
	}
	at := version * s.refresh
	blocks := s.sc.Model.Blocks
	v := &view{version: version, pools: map[int][]mesh.RouteCandidate{},
		loaded: mesh.BlockTotals{Tput: make([]float64, blocks), Count: make([]int, blocks)},
		speeds: mesh.BlockTotals{Tput: make([]float64, blocks), Count: make([]int, blocks)}}
	if s.v != nil { // reuse the old view's memory: nothing else holds it
		v.cands, v.at = s.v.cands[:0], s.v.at[:0]
	}
	v.at = slices.Grow(v.at, len(s.peers))[:len(s.peers)]
	for i, p := range s.peers {
		v.at[i] = -1
		r := &p.rec
		if r.seq == 0 || r.withdrawn || r.published > at || r.expires <= at || r.end <= r.start {
			continue
		}
		v.at[i] = int32(len(v.cands))
		v.cands = append(v.cands, mesh.RouteCandidate{Peer: p.id, Start: r.start, End: r.end,
			BlockMicros: p.micros[r.start:r.end], Load: r.load, Coord: p.ep.coord})
		f := 1 + float64(r.load.InFlight+r.load.Queued)/mesh.RouteLoadSlots
		for b := r.start; b < r.end; b++ {
			t := 1e6 / max(p.micros[b], 1)
			v.speeds.Tput[b] += t
			v.speeds.Count[b]++
			v.loaded.Tput[b] += t / f
			v.loaded.Count[b]++
		}
	}
	s.v = v
	return v
}

// pool is the candidates for the entry nodes of region r in a view larger
// than mesh.MaxRouteCandidates: mesh.SelectCandidatesAround the region's
// centre, over the radius that holds its entry nodes, with twice
// mesh.RoutePerBlock per block. It holds what the selection each entry
// node's route makes (mesh.PlanRouteInView, from its own coordinate)
// would keep from the whole view, as long as an entry node has banned at
// most mesh.RoutePerBlock servers of a block, so the routes are the same
// (TestRoutesAreMeshRoutes checks it). It is computed once per region and
// view.
func (s *sim) pool(v *view, r int) []mesh.RouteCandidate {
	if c, ok := v.pools[r]; ok {
		return c
	}
	req := mesh.RouteRequest{Blocks: s.sc.Model.Blocks, From: *s.regionEP[r].coord, HaveFrom: true, Tokens: 1}
	c := mesh.SelectCandidatesAround(v.cands, req, 2*mesh.RoutePerBlock, s.regionRadius[r])
	v.pools[r] = c
	return c
}

// exclusions lists, in order, the peers an entry node has banned now, and
// drops bans that lapsed.
func (s *sim) exclusions(en *entryNode) []int32 {
	var out []int32
	for p, until := range en.bans {
		if until > s.now {
			out = append(out, p)
		} else {
			delete(en.bans, p)
		}
	}
	slices.Sort(out)
	return out
}

// observe is the requester en's taking the load hop p (index i) says in
// its answer to a pass it just finished (the progress or result frame's
// protocol.HopLoad: its passes running and queued now), as mesh.View's
// observeLoad does; routing then blends it into the record's load
// (mesh.FreshLoad). The answer is taken when the hop sends it, a one-way
// leg before it reaches the requester. An answer that says what the
// peer's record in the view says is dropped (FreshLoad then gives the
// record's load at any age, as long as the record stays the same).
func (s *sim) observe(en *entryNode, i int32, p *simPeer) {
	if !*s.sc.Routing.FreshLoad {
		return
	}
	busy := 0
	for _, f := range p.slots {
		if f > s.now {
			busy++
		}
	}
	l := protocol.HopLoad{InFlight: busy, Queued: s.queued(p)}
	v := s.currentView()
	if k := v.at[i]; k < 0 || (v.cands[k].Load.InFlight == l.InFlight && v.cands[k].Load.Queued == l.Queued) {
		delete(en.seen, i)
		return
	}
	if en.seen == nil {
		en.seen = map[int32]seenLoad{}
	}
	en.seen[i] = seenLoad{load: l, at: s.now}
}

// freshLoads lists, in peer order, the loads en's routing assumes now
// where they differ from the view's records (mesh.FreshLoad of the
// record's and the latest answer's), and forgets answers past loadForget.
func (s *sim) freshLoads(en *entryNode, v *view) []freshLoad {
	var out []freshLoad
	for i, o := range en.seen {
		k := v.at[i]
		if s.now-o.at > loadForget || k < 0 {
			delete(en.seen, i)
			continue
		}
		rec := v.cands[k].Load
		if l := mesh.FreshLoad(rec, o.load, time.Duration(s.now-o.at)); l != rec {
			out = append(out, freshLoad{i, l})
		}
	}
	slices.SortFunc(out, func(a, b freshLoad) int { return int(a.peer - b.peer) })
	return out
}

type freshLoad struct {
	peer int32
	load protocol.Load
}

// withLoads returns cands with the fresh loads in place of the records'
// (a copy when any applies).
func withLoads(cands []mesh.RouteCandidate, fresh []freshLoad) []mesh.RouteCandidate {
	if len(fresh) == 0 {
		return cands
	}
	out := slices.Clone(cands)
	for j := range out {
		i := peerIndex(out[j].Peer)
		if k, found := slices.BinarySearchFunc(fresh, i, func(f freshLoad, i int32) int { return int(f.peer - i) }); found {
			out[j].Load = fresh[k].load
		}
	}
	return out
}

// route plans blocks [start, end) for a request of entry node en, as the
// node's (*Mesh).route does: mesh.PlanRouteTiered over the view, without
// its distrusted peers, with its bans, and mesh.PlanRouteTrusting's last
// resort when that finds no route, drawing it among near-equal routes
// from s.rRoute as a node draws each of its routes. Within one view and
// one set of bans the routes drawn follow the same distribution, so
// routeDraws of them are memoized per entry node, view, span and bans.
func (s *sim) route(en *entryNode, start, end int) ([]hop, error) {
	s.routeCalls++
	v := s.currentView()
	excl := s.exclusions(en)
	var distrusted []int32
	for p, seq := range en.distrust {
		if pp := s.peers[p]; pp.rec.seq != seq || pp.rec.expires <= s.now {
			delete(en.distrust, p) // it published again, or its record expired
		} else if v.at[p] >= 0 {
			distrusted = append(distrusted, p)
		}
	}
	slices.Sort(distrusted)
	fresh := s.freshLoads(en, v)
	key := make([]byte, 0, 16+4*(len(excl)+len(distrusted))+12*len(fresh))
	key = strconv.AppendInt(key, int64(start), 10)
	key = append(key, '-')
	key = strconv.AppendInt(key, int64(end), 10)
	for _, p := range excl {
		key = append(key, 'b')
		key = strconv.AppendInt(key, int64(p), 10)
	}
	for _, p := range distrusted {
		key = append(key, 'd')
		key = strconv.AppendInt(key, int64(p), 10)
	}
	for _, f := range fresh {
		key = append(key, 'l')
		key = strconv.AppendInt(key, int64(f.peer), 10)
		key = append(key, ':')
		key = strconv.AppendInt(key, int64(f.load.InFlight), 10)
		key = append(key, ':')
		key = strconv.AppendInt(key, int64(f.load.Queued), 10)
	}
	if en.memoV != v.version || en.memo == nil {
		en.memo, en.memoV = map[string][]routeMemo{}, v.version
	}
	if ms := en.memo[string(key)]; len(ms) > 0 && (s.rRoute == nil || len(ms) >= routeDraws) {
		s.memoHits++
		m := ms[0]
		if s.rRoute != nil {
			m = ms[s.rRoute.IntN(len(ms))]
		}
		return m.hops, m.err
	}
	cands := v.cands
	if len(cands) > mesh.MaxRouteCandidates && s.regionEP != nil {
		cands = s.pool(v, en.region)
	}
	if len(distrusted) > 0 { // out of the view, not merely banned
		cands = slices.DeleteFunc(slices.Clone(cands), func(c mesh.RouteCandidate) bool {
			_, found := slices.BinarySearch(distrusted, peerIndex(c.Peer))
			return found
		})
	}
	cands = withLoads(cands, fresh)
	var banned map[peer.ID]bool
	if len(excl) > 0 {
		banned = make(map[peer.ID]bool, len(excl))
		for _, p := range excl {
			banned[s.peers[p].id] = true
		}
	}
	req := mesh.RouteRequest{Blocks: s.sc.Model.Blocks, Start: start, End: end, From: *en.ep.coord, HaveFrom: true, Self: en.id, Tokens: 1,
		Rand: s.rRoute}
	r, err := mesh.PlanRouteInView(cands, len(v.cands), req, nil, banned)
	if errors.Is(err, mesh.ErrNoRoute) && len(v.cands) > mesh.MaxRouteCandidates {
		// The pool lacked what the whole view has (many bans, say).
		all := withLoads(v.cands, fresh)
		if len(distrusted) > 0 {
			all = slices.DeleteFunc(slices.Clone(all), func(c mesh.RouteCandidate) bool {
				_, found := slices.BinarySearch(distrusted, peerIndex(c.Peer))
				return found
			})
		}
		r, err = mesh.PlanRouteTiered(all, req, nil, banned)
	}
	if errors.Is(err, mesh.ErrNoRoute) && len(distrusted) > 0 {
		// The distrusted peers are the last resort, as the node's.
		var trusted, doubted []mesh.RouteCandidate
		for _, c := range withLoads(v.cands, fresh) {
			if _, found := slices.BinarySearch(distrusted, peerIndex(c.Peer)); found {
				doubted = append(doubted, c)
			} else {
				trusted = append(trusted, c)
			}
		}
		r, err = mesh.PlanRouteTrusting(trusted, doubted, req, nil, banned)
	}
	var hops []hop
	if err == nil {
		hops = make([]hop, len(r.Hops))
		for i, h := range r.Hops {
			hops[i] = hop{peer: peerIndex(h.Peer), start: int32(h.Start), end: int32(h.End)}
		}
	}
	en.memo[string(key)] = append(en.memo[string(key)], routeMemo{hops, err})
	return hops, err
}

// run processes events until the end of the scenario.
func (s *sim) run(progress func(done, total float64)) error {
	total := s.sc.DurationS
	for len(s.q.h) > 0 {
		ev := s.q.pop()
		if ev.t > s.end {
			break
		}
		s.now = ev.t
		s.events++
		if s.events&0xffff == 0 {
			if err := s.ctx.Err(); err != nil {
				return err
			}
			if progress != nil {
				progress(float64(s.now)/1e9, total)
			}
		}
		s.handle(ev)
	}
	s.now = s.end
	if progress != nil {
		progress(total, total)
	}
	return s.ctx.Err()
}

func (s *sim) handle(ev event) {
	switch ev.kind {
	case evArrival:
		s.arrival()
	case evSample:
		s.sample()
		s.q.push(event{t: s.now + int64(s.sc.SampleS*1e9), kind: evSample})
	case evPublish:
		if p := s.peers[ev.a]; p.online {
			s.publish(p)
			ttl3 := s.ttl / 3
			s.q.push(event{t: s.now + ttl3 - s.rTimers.Int64N(ttl3/10+1), kind: evPublish, a: ev.a})
		}
	case evLeave:
		s.leave(s.peers[ev.a], ev.x == 1)
	case evJoin:
		s.join(s.peers[ev.a])
	case evOnline:
		if p := s.peers[ev.a]; !p.gone {
			s.goOnline(p)
			s.joins++
		}
	case evRebalance:
		s.rebalance(s.peers[ev.a])
	case evMoved:
		s.moved(s.peers[ev.a])
	default:
		r := &s.reqs[ev.a]
		e := r.epoch
		if ev.kind == evResult && r.ring {
			e = r.tokEpoch
		}
		if !r.live || e != ev.e {
			if ev.kind == evDone {
				s.peers[ev.p].unqueue(flight{ev.a, ev.e})
			}
			return
		}
		switch ev.kind {
		case evHop:
			s.atHop(ev.a, int(ev.b))
		case evDone:
			s.done(ev.a, int(ev.b))
		case evResult:
			if s.reqs[ev.a].ring {
				s.ringResult(ev.a, ev.b)
			} else {
				s.result(ev.a)
			}
		case evFail:
			s.fail(ev.a, int(ev.b), mesh.FailureKind(ev.x))
		case evRetry:
			s.startStep(ev.a)
		}
	}
}

func (p *simPeer) unqueue(f flight) {
	if i := slices.Index(p.inflight, f); i >= 0 {
		p.inflight[i] = p.inflight[len(p.inflight)-1]
		p.inflight = p.inflight[:len(p.inflight)-1]
	}
}

// diurnal is the rate factor of region r now.
func (s *sim) diurnal(r int) float64 {
	w := &s.sc.Workload
	if w.Diurnal == 0 || len(s.sc.Regions) == 0 {
		return 1
	}
	hour := w.StartHour + float64(s.now)/3.6e12 + s.sc.Regions[r].UTCOffset
	return 1 + w.Diurnal*math.Cos(2*math.Pi*(hour-w.PeakHour)/24)
}

// arrival creates a request and schedules the next: a Poisson process at
// the peak rate, thinned by each region's diurnal factor.
func (s *sim) arrival() {
	w := &s.sc.Workload
	peak := w.Rate * (1 + w.Diurnal)
	gap := 1 / peak
	if w.Arrivals == "poisson" {
		gap *= s.rWork.ExpFloat64()
	}
	next := s.now + int64(gap*1e9)
	region := 0
	if s.userWeights != nil {
		region = pick(s.rWork, s.userWeights)
	}
	accept := s.rWork.Float64()*(1+w.Diurnal) < s.diurnal(region)
	gen := s.rWork.Float64() < w.Generate
	prompt, output := w.Prompt.draw(s.rWork), w.Output.draw(s.rWork)
	entries := s.byRegion[region]
	e := entries[s.rWork.IntN(len(entries))]
	if accept {
		s.arrived++
	}
	if w.MaxRequests == 0 || s.arrived < w.MaxRequests {
		s.q.push(event{t: next, kind: evArrival})
	}
	if !accept {
		return
	}
	s.cur.Arrivals++
	var id int32
	if n := len(s.free); n > 0 {
		id = s.free[n-1]
		s.free = s.free[:n-1]
	} else {
		s.reqs = append(s.reqs, request{})
		id = int32(len(s.reqs) - 1)
	}
	s.reqs[id] = request{entry: e, user: e, gen: gen, ring: gen && w.Decode == DecodeRing, live: true, prompt: int32(prompt),
		output: int32(output), arrive: s.now, epoch: s.reqs[id].epoch + 1, tokEpoch: s.reqs[id].tokEpoch + 1}
	s.live++
	if s.gateways != nil {
		// The prompt goes to the gateway first, as the entry node would
		// send it to a first hop (its bytes over the user's access).
		r := &s.reqs[id]
		r.entry = s.gateways[e]
		t := s.now + s.net.oneWay(s.entries[e].ep, s.entries[r.entry].ep, s.actBytes*float64(prompt))
		s.q.push(event{t: t, kind: evRetry, a: id, e: r.epoch}) // evRetry: startStep, at the gateway
		return
	}
	s.startStep(id)
}

func (d *Dist) draw(rng *rand.Rand) int {
	var v float64
	switch d.Dist {
	case "const":
		v = d.Mean
	case "exp":
		v = rng.ExpFloat64() * d.Mean
	case "uniform":
		v = d.Min + rng.Float64()*(d.Max-d.Min+1)
	case "lognormal":
		mu := math.Log(d.Mean) - d.Sigma*d.Sigma/2
		v = math.Exp(mu + d.Sigma*rng.NormFloat64())
	}
	if d.Max > 0 {
		v = min(v, d.Max)
	}
	return max(1, int(max(v, d.Min)))
}

// tokens is how many tokens the step in flight pushes through each block.
func (r *request) tokens() int {
	if r.ring {
		if r.ringStep == 0 {
			return int(r.prompt)
		}
		return 1
	}
	if r.step == 0 {
		return int(r.prompt)
	}
	return 1
}

// passNs is the time of a pass of tokens through blocks [start, end) on p.
func (p *simPeer) passNs(start, end, tokens int) int64 {
	us := 0.0
	for b := start; b < end; b++ {
		us += p.micros[b]
	}
	return int64(us * (1 + float64(tokens-1)*p.prefill) * 1e3)
}

// startStep sends the step in flight from the entry node to the first hop,
// routing first when the request has no route (a first step, or a single
// pass after a failure: mesh.Infer routes again from scratch).
func (s *sim) startStep(id int32) {
	r := &s.reqs[id]
	en := s.entries[r.entry]
	if r.route == nil {
		hops, err := s.route(en, 0, s.sc.Model.Blocks)
		if err != nil {
			s.noRoute(id)
			return
		}
		r.route = hops
		s.hopsSum += int64(len(hops))
		s.routes++
	}
	r.sent = s.now
	first := s.peers[r.route[r.from].peer]
	s.q.push(event{t: s.now + s.net.oneWay(en.ep, first.ep, s.actBytes*float64(r.tokens())), kind: evHop, a: id, b: r.from, e: r.epoch})
}

// noRoute pauses and retries, as the node does when the view cannot cover
// the model (mesh.RetryPause), and gives up after MaxFailovers attempts
// (for a single pass, mesh.Infer counts failed runs and missing routes
// together).
func (s *sim) noRoute(id int32) {
	r := &s.reqs[id]
	if r.ring {
		// Session.ring: a missing route is a failover more, paused by
		// mesh.RetryPause of the failovers so far.
		if int(r.failovers) >= s.sc.Workload.MaxFailovers {
			s.finish(id, false)
			return
		}
		r.failovers++
		s.q.push(event{t: s.now + int64(mesh.RetryPause(int(r.failovers))), kind: evRetry, a: id, e: r.epoch})
		return
	}
	attempt := int(r.retries)
	if !r.gen {
		attempt += int(r.failovers)
	}
	if attempt >= s.sc.Workload.MaxFailovers {
		s.finish(id, false)
		return
	}
	pause := int64(mesh.RetryPause(attempt))
	r.retries++
	s.q.push(event{t: s.now + pause, kind: evRetry, a: id, e: r.epoch})
}

// failAt schedules the entry node's learning that hop h failed, and
// cancels what the request had in flight (its epoch moves on).
func (s *sim) failAt(id int32, h int, t int64, kind mesh.FailureKind) {
	r := &s.reqs[id]
	r.epoch++
	s.q.push(event{t: max(t, s.now), kind: evFail, a: id, b: int32(h), e: r.epoch, x: uint8(kind)})
}

// atHop: the step's activations reach hop h. The stage server runs them
// in a free slot, queues them if its queue has room, or answers busy.
func (s *sim) atHop(id int32, h int) {
	r := &s.reqs[id]
	hp := r.route[h]
	p := s.peers[hp.peer]
	en := s.entries[r.entry]
	if !p.online {
		p.failed++
		switch {
		case p.crashed && s.now-p.left < quicIdle:
			// Nobody answers, and the connection still looks alive: the
			// requester's attempt times out.
			s.failAt(id, h, r.sent+s.timeout, mesh.FailStall)
		case p.crashed:
			// The connection has timed out; a new dial fails.
			s.failAt(id, h, s.now+dialTimeout, mesh.FailHard)
		default:
			// The connection is closed or refused: the sender reports.
			s.failAt(id, h, s.now+s.net.oneWay(p.ep, en.ep, 0), mesh.FailHard)
		}
		return
	}
	start, end := int(hp.start), int(hp.end)
	if start < p.start || end > p.end {
		if !(p.movedAt+dropGrace > s.now && start >= p.oldStart && end <= p.oldEnd) {
			s.failAt(id, h, s.now+s.net.oneWay(p.ep, en.ep, 0), mesh.FailRefused)
			return
		}
	}
	if int32(h) < r.pass {
		// A resumed ring step before the hop that was busy: this hop ran
		// it already and answers from the output it kept, taking no slot.
		next := s.peers[r.route[h+1].peer]
		s.q.push(event{t: s.now + s.net.oneWay(p.ep, next.ep, s.actBytes*float64(r.tokens())), kind: evHop, a: id, b: int32(h + 1), e: r.epoch})
		return
	}
	held := r.gen && slices.Contains(r.held, hp.peer)
	if r.gen && !held {
		// The step opens the session's state here.
		if p.maxSessions >= 0 && p.sessions >= p.maxSessions {
			s.failAt(id, h, s.now+s.net.oneWay(p.ep, en.ep, 0), mesh.FailBusy)
			return
		}
		p.sessions++
		r.held = append(r.held, hp.peer)
	}
	slot := 0
	for i, f := range p.slots {
		if f < p.slots[slot] {
			slot = i
		}
	}
	begin := s.now
	if f := p.slots[slot]; f > s.now {
		// The next step of a session held here waits however many do, as
		// the stage server's held steps do (SPEC.md): only steps that open
		// a session, and single passes, meet the queue's bound. (A queue
		// of 0 is the stage server before it queued: busy at once.)
		if p.queue == 0 || (p.queue > 0 && !held && s.queued(p) >= p.queue) {
			s.failAt(id, h, s.now+s.net.oneWay(p.ep, en.ep, 0), mesh.FailBusy)
			return
		}
		begin = f
		p.waiting = append(p.waiting, f)
	}
	if begin-r.sent > s.timeout {
		s.failAt(id, h, r.sent+s.timeout, mesh.FailStall)
		return
	}
	d := p.passNs(start, end, r.tokens())
	p.slots[slot] = begin + d
	p.inflight = append(p.inflight, flight{id, r.epoch})
	s.q.push(event{t: begin + d, kind: evDone, a: id, b: int32(h), e: r.epoch, p: hp.peer})
}

// done: hop h finished; its activations go to the next hop, or the result
// to the entry node.
func (s *sim) done(id int32, h int) {
	r := &s.reqs[id]
	hp := r.route[h]
	p := s.peers[hp.peer]
	p.unqueue(flight{id, r.epoch})
	t := r.tokens()
	p.passes += int64(hp.end-hp.start) * int64(t)
	p.busy += p.passNs(int(hp.start), int(hp.end), t)
	s.observe(s.entries[r.entry], hp.peer, p)
	if h+1 < len(r.route) {
		next := s.peers[r.route[h+1].peer]
		s.q.push(event{t: s.now + s.net.oneWay(p.ep, next.ep, s.actBytes*float64(t)), kind: evHop, a: id, b: int32(h + 1), e: r.epoch})
		return
	}
	if r.ring {
		s.ringTurn(id, p)
		return
	}
	en := s.entries[r.entry]
	s.q.push(event{t: s.now + s.net.oneWay(p.ep, en.ep, s.actBytes), kind: evResult, a: id, e: r.epoch})
}

// ringTurn is the last hop's part of a decode ring (mesh's stage
// ringTurn): the step's token is sampled here; unless the ring stops at it
// (its MaxTokens, the request's output), the next step, one token, goes
// straight to the first hop, and the token goes to the requester (ev.b:
// the step that yielded it). The requester's clock of the next step starts
// when the token reaches it, as Session.ringOnce resets its step timer.
func (s *sim) ringTurn(id int32, last *simPeer) {
	r := &s.reqs[id]
	en := s.entries[r.entry]
	k := r.ringStep
	r.pass = 0 // a resumed step has passed: every hop computes the next
	if k+1 < r.output {
		r.ringStep++
		r.from = 0
		first := s.peers[r.route[0].peer]
		s.q.push(event{t: s.now + s.net.oneWay(last.ep, first.ep, s.actBytes), kind: evHop, a: id, b: 0, e: r.epoch})
	}
	// The requester takes the tokens in order: one that overtakes the one
	// before it (jitter) waits for its turn, as Session.ringOnce keeps it
	// (r.sent is the one before's turn).
	t := max(s.now+s.net.oneWay(last.ep, en.ep, s.actBytes), r.sent)
	r.sent = t
	s.q.push(event{t: t, kind: evResult, a: id, b: k, e: r.tokEpoch})
}

func (s *sim) result(id int32) {
	r := &s.reqs[id]
	if r.step == 0 {
		if r.entry != r.user {
			// The gateway streams each token to the user as it has it:
			// every token, the last included, arrives one one-way leg
			// later, the same for all (the user's and gateway's ends add
			// no jitter of their own).
			r.out = s.net.oneWay(s.entries[r.entry].ep, s.entries[r.user].ep, s.actBytes)
		}
		r.firstTok = s.now + r.out
	}
	r.step++
	r.failovers = 0
	r.from = 0
	if r.gen {
		s.tokens++
		s.cur.Tokens++
	}
	if r.gen && r.step < r.output {
		s.startStep(id)
		return
	}
	s.finish(id, true)
}

// ringResult: the token of ring step k reaches the requester. A replayed
// (forced) one brings nothing new; a new one is emitted, and the last one
// ends the generation (the ring stopped at it).
func (s *sim) ringResult(id, k int32) {
	r := &s.reqs[id]
	// The ring moved on: a busy answer after this one is the first in a
	// row (mesh's SPEC, "Busy hops": up to 3 times in a row).
	r.recv, r.resumes = k+1, 0
	if k < r.forced {
		return
	}
	if r.step == 0 {
		if r.entry != r.user {
			r.out = s.net.oneWay(s.entries[r.entry].ep, s.entries[r.user].ep, s.actBytes)
		}
		r.firstTok = s.now + r.out
	}
	r.step++
	r.failovers = 0 // Session.ring counts a token's failovers
	s.tokens++
	s.cur.Tokens++
	if r.step >= r.output {
		s.finish(id, true)
	}
}

func (s *sim) finish(id int32, ok bool) {
	r := &s.reqs[id]
	if ok {
		s.completed++
		s.cur.Completed++
		end := s.now + r.out // at the user
		e2e := float64(end-r.arrive) / 1e9
		s.lat.E2E = append(s.lat.E2E, e2e)
		s.curE2E = append(s.curE2E, e2e)
		if r.gen {
			s.lat.TTFT = append(s.lat.TTFT, float64(r.firstTok-r.arrive)/1e9)
			if r.output > 1 {
				s.lat.PerToken = append(s.lat.PerToken, float64(end-r.firstTok)/1e9/float64(r.output-1))
			}
		}
	} else {
		s.failed++
		s.cur.Failed++
	}
	if s.userWeights != nil {
		rl := &s.regionLat[s.entries[r.user].region]
		if ok {
			rl.completed++
			rl.lat.E2E = append(rl.lat.E2E, s.lat.E2E[len(s.lat.E2E)-1])
			if r.gen {
				rl.lat.TTFT = append(rl.lat.TTFT, s.lat.TTFT[len(s.lat.TTFT)-1])
				if r.output > 1 {
					rl.lat.PerToken = append(rl.lat.PerToken, s.lat.PerToken[len(s.lat.PerToken)-1])
				}
			}
		} else {
			rl.failed++
		}
	}
	s.release(r, func(int32) bool { return true })
	r.live = false
	r.epoch++
	r.route = nil
	s.live--
	s.free = append(s.free, id)
}

// fail: the entry node learns hop h failed. It bans the peer
// (mesh.BanDuration, distrusting it when mesh.Distrusts says so) and
// fails over: a single pass is routed again from scratch (mesh.Infer); a
// session replaces the lost span from the hop mesh.ReplayFrom names,
// replays the completed steps there and resumes where mesh.ResumeFrom says
// (Session.Step).
func (s *sim) fail(id int32, h int, kind mesh.FailureKind) {
	r := &s.reqs[id]
	r.tokEpoch++ // tokens still on their way are dropped with the attempt
	if r.ring && kind == mesh.FailBusy && r.resumes < maxRingResumes {
		s.resumeRing(id, h)
		return
	}
	en := s.entries[r.entry]
	pi := r.route[h].peer
	if pi != en.self {
		if en.bans == nil {
			en.bans, en.banCount, en.distrust = map[int32]int64{}, map[int32]int{}, map[int32]int{}
		}
		en.banCount[pi]++
		en.bans[pi] = s.now + int64(mesh.BanDuration(kind, en.banCount[pi]))
		if mesh.Distrusts(kind) {
			en.distrust[pi] = s.peers[pi].rec.seq
		}
	}
	s.failovers++
	s.cur.Failovers++
	s.failKinds[kind]++
	r.failovers++
	if int(r.failovers) > s.sc.Workload.MaxFailovers {
		s.finish(id, false)
		return
	}
	if !r.gen {
		// mesh.Infer routes it all again.
		r.route = nil
		s.startStep(id)
		return
	}
	if r.ring {
		s.restartRing(id)
		return
	}
	s.replace(id, h)
}

// restartRing fails a decode ring over as Session.ring does: the old
// session closes at every hop, a new one starts on a new route (routed
// again whole, with the bans), and its ring replays the prompt and every
// token the requester has as forced steps, one ring turn each, before it
// samples new ones. More tokens than a ring request can carry
// (protocol.MaxRingForced) fail the generation (mesh.ErrRingReplay).
func (s *sim) restartRing(id int32) {
	r := &s.reqs[id]
	if int(r.step) > protocol.MaxRingForced {
		s.finish(id, false)
		return
	}
	s.release(r, func(int32) bool { return true })
	r.route = nil
	r.ringStep, r.forced, r.from = 0, r.step, 0
	r.recv, r.resumes, r.pass = 0, 0, 0
	s.replays += int(r.step)
	s.startStep(id)
}

// maxRingResumes is mesh's maxRingResumes (mesh/ring.go, unexported
// there): the busy answers in a row a ring resumes on its route before it
// restarts on another.
const maxRingResumes = 3

// resumeRing is Session.ring's answer to a hop that refused a ring step
// busy (it ran nothing, and every hop's state is whole): after a pause of
// mesh.RetryPause(k), k the busy answers in a row before this one, the
// requester sends the step again to the first hop on the same route and
// session; the hops before the busy one answer it from what they kept (no
// compute, only the legs), the busy hop and those after it compute it.
// The step is the one whose token the requester waits for (a token in
// flight when the busy answer came is dropped with the attempt, as the
// node drops it). No ban, no judgement; it counts against MaxFailovers as
// the node counts it (failovers++ before the resume), but it is not a
// failover in the summary.
func (s *sim) resumeRing(id int32, h int) {
	r := &s.reqs[id]
	s.resumes++
	r.failovers++
	if int(r.failovers) > s.sc.Workload.MaxFailovers {
		s.finish(id, false)
		return
	}
	pause := int64(mesh.RetryPause(int(r.resumes)))
	r.resumes++
	r.ringStep, r.from, r.pass = r.recv, 0, int32(h)
	s.q.push(event{t: s.now + pause, kind: evRetry, a: id, e: r.epoch})
}

// replace re-routes a session's lost span and resumes the step.
func (s *sim) replace(id int32, f int) {
	r := &s.reqs[id]
	en := s.entries[r.entry]
	// The simulated requester always has every hop's inputs (progress
	// messages are never lost), so ReplayFrom and ResumeFrom answer f.
	whole := func(int) bool { return true }
	from := mesh.ReplayFrom(f, whole)
	hops, err := s.route(en, int(r.route[from].start), int(r.route[f].end))
	if err != nil {
		if int(r.failovers) >= s.sc.Workload.MaxFailovers {
			s.finish(id, false)
			return
		}
		// As Session.Step does: pause, then run the attempt again on the
		// route as it is, from the hop it started at; the failed hop fails
		// it again (a failover more) unless it came back.
		r.epoch++
		s.q.push(event{t: s.now + int64(mesh.RetryPause(int(r.failovers))), kind: evRetry, a: id, e: r.epoch})
		return
	}
	// The replaced hops' state is dropped (Session closes only at its end;
	// a dead or refusing hop holds none worth counting).
	gone := r.route[from : f+1]
	s.release(r, func(p int32) bool {
		return slices.ContainsFunc(gone, func(x hop) bool { return x.peer == p }) &&
			!slices.ContainsFunc(r.route[:from], func(x hop) bool { return x.peer == p }) &&
			!slices.ContainsFunc(r.route[f+1:], func(x hop) bool { return x.peer == p })
	})
	route := make([]hop, 0, len(r.route)-(f-from+1)+len(hops))
	route = append(append(append(route, r.route[:from]...), hops...), r.route[f+1:]...)
	// Replay the completed steps through the new hops, one after another,
	// each a round trip from the entry node: the prompt pass, then one
	// token per step.
	var replay int64
	steps := int(r.step)
	// trip is n round trips of a step of tokens (one drawn, n times: the
	// replay is a formula, not events); each hop runs its n passes.
	trip := func(tokens, n int) int64 {
		d := int64(0)
		prev := en.ep
		for _, hp := range hops {
			p := s.peers[hp.peer]
			d += s.net.oneWay(prev, p.ep, s.actBytes*float64(tokens)) + p.passNs(int(hp.start), int(hp.end), tokens)
			p.passes += int64(hp.end-hp.start) * int64(tokens) * int64(n)
			prev = p.ep
		}
		return int64(n) * (d + s.net.oneWay(prev, en.ep, s.actBytes*float64(tokens)))
	}
	if steps > 0 {
		replay += trip(int(r.prompt), 1)
		if steps > 1 {
			replay += trip(1, steps-1)
		}
		s.replays += steps
	}
	r.route = route
	r.from = int32(mesh.ResumeFrom(from, whole))
	r.sent = s.now + replay
	first := s.peers[route[r.from].peer]
	s.q.push(event{t: r.sent + s.net.oneWay(en.ep, first.ep, s.actBytes*float64(r.tokens())), kind: evHop, a: id,
		b: r.from, e: r.epoch})
}

// release closes the request's sessions at the peers drop says.
func (s *sim) release(r *request, drop func(int32) bool) {
	r.held = slices.DeleteFunc(r.held, func(p int32) bool {
		if drop(p) {
			s.peers[p].sessions--
			return true
		}
		return false
	})
}

// leave takes a peer out: a crash leaves its record to expire and its
// requests to stall; a graceful leave publishes an empty record and its
// requests fail over at once.
func (s *sim) leave(p *simPeer, crash bool) {
	if !p.online {
		return
	}
	p.online, p.gone, p.crashed, p.left = false, true, crash, s.now
	s.online--
	s.onlineCap -= p.capacity
	s.leaves++
	s.cover(p.start, p.end, -1)
	if !crash {
		p.rec = record{seq: p.rec.seq + 1, withdrawn: true, published: s.now, expires: s.now + s.ttl}
	}
	for _, fl := range p.inflight {
		id, r := fl.req, &s.reqs[fl.req]
		if !r.live || r.epoch != fl.epoch {
			continue
		}
		h := slices.IndexFunc(r.route, func(x hop) bool { return s.peers[x.peer] == p })
		p.failed++
		if crash {
			s.failAt(id, h, r.sent+s.timeout, mesh.FailStall)
		} else {
			s.failAt(id, h, s.now+s.net.oneWay(p.ep, s.entries[r.entry].ep, 0), mesh.FailHard)
		}
	}
	p.inflight = nil
	if s.sc.Churn.Replace {
		s.q.push(event{t: s.now + int64(s.rChurn.ExpFloat64()*s.sc.Churn.RejoinS*1e9), kind: evJoin, a: peerIndex(p.id)})
	}
}

// join starts a new peer like old (class and region): it looks the model
// up in the DHT, places itself on the view (mesh.Place), fetches its span
// and goes online.
func (s *sim) join(old *simPeer) {
	p := s.newPeer(old.class, old.region)
	p.replacement = true
	v := s.currentView()
	s.choose(p, v.loaded)
	lookup := s.dhtLookup(p, v)
	fetch := int64(float64(p.end-p.start) * s.sc.Model.BlockMB * 1e6 / p.ep.bw)
	s.q.push(event{t: s.now + 2*lookup + fetch, kind: evOnline, a: peerIndex(p.id)})
}

// dhtLookup is what a Kademlia lookup costs from p: about
// log2(N)/log2(k) + 1 hops, each a round trip to a random online peer
// (the XOR metric knows nothing of geography).
func (s *sim) dhtLookup(p *simPeer, v *view) int64 {
	n := max(len(v.cands), 2)
	hops := int(math.Ceil(math.Log2(float64(n))/math.Log2(float64(s.sc.DHT.BucketSize)))) + 1
	var d int64
	for range hops {
		if len(v.cands) == 0 {
			break
		}
		q := s.peers[peerIndex(v.cands[s.rChurn.IntN(len(v.cands))].Peer)]
		d += 2 * (s.net.propagation(p.ep, q.ep) + p.ep.lastMile + q.ep.lastMile)
	}
	return d
}

// rebalance is the node's periodic check (mesh.Rebalance on the view
// without this peer); a move fetches the new blocks, then switches.
func (s *sim) rebalance(p *simPeer) {
	if !p.online {
		return
	}
	defer s.scheduleRebalance(p)
	if p.moving {
		return
	}
	v := s.currentView()
	agg, scale := mesh.AggregateCopies(s.others(p, v, v.speeds), s.sc.Replicas)
	pl, move := mesh.Rebalance(agg, s.placeRequest(p, scale), [2]int{p.start, p.end})
	if !move {
		return
	}
	p.moving = true
	p.oldStart, p.oldEnd = pl.Start, pl.End // the target, until moved
	fresh := 0
	for b := pl.Start; b < pl.End; b++ {
		if b < p.start || b >= p.end {
			fresh++
		}
	}
	fetch := int64(float64(fresh) * s.sc.Model.BlockMB * 1e6 / p.ep.bw)
	s.q.push(event{t: s.now + fetch, kind: evMoved, a: peerIndex(p.id)})
}

// others is t, per-block totals of view v, without p's record.
func (s *sim) others(p *simPeer, v *view, t mesh.BlockTotals) mesh.BlockTotals {
	others := mesh.BlockTotals{Tput: slices.Clone(t.Tput), Count: slices.Clone(t.Count)}
	if i := v.at[peerIndex(p.id)]; i >= 0 {
		c := &v.cands[i]
		for b := c.Start; b < c.End; b++ {
			others.Count[b]--
			if others.Count[b] == 0 {
				others.Tput[b] = 0
			} else {
				others.Tput[b] -= 1e6 / max(p.micros[b], 1)
			}
		}
	}
	return others
}

func (s *sim) moved(p *simPeer) {
	if !p.online || !p.moving {
		return
	}
	p.moving = false
	ns, ne := p.oldStart, p.oldEnd
	// Before it drops its old span, the peer asks its view again whether
	// it holds the last copy of a block it would drop (others may have
	// moved off it meanwhile): then it stays (mesh.LastCopies).
	v := s.currentView()
	agg, _ := mesh.AggregateCopies(s.others(p, v, v.speeds), 1)
	if lost := mesh.LastCopies(agg, mesh.PlaceRequest{Blocks: s.sc.Model.Blocks, Self: p.id}, [2]int{p.start, p.end}, [2]int{ns, ne}); len(lost) > 0 {
		p.oldStart, p.oldEnd = p.start, p.end
		s.keeps++
		return
	}
	s.cover(ns, ne, 1) // the new span first: a block on both is never lost
	s.cover(p.start, p.end, -1)
	p.oldStart, p.oldEnd, p.movedAt = p.start, p.end, s.now
	p.start, p.end = ns, ne
	s.moves++
	s.publish(p)
}

func (s *sim) sample() {
	c := s.coverage()
	s.minCov = min(s.minCov, c)
	if h := int(slices.Min(s.covered)); s.blocks.MinHolders < 0 || h < s.blocks.MinHolders {
		s.blocks.MinHolders = h
	}
	s.sampleCapacity()
	smp := s.cur
	smp.T = float64(s.now) / 1e9
	smp.Peers = s.online
	smp.InFlight = s.live
	smp.Coverage = c
	if len(s.curE2E) > 0 {
		slices.Sort(s.curE2E)
		smp.P50 = quantile(s.curE2E, 0.5)
		smp.P95 = quantile(s.curE2E, 0.95)
	}
	s.series = append(s.series, smp)
	s.cur = Sample{}
	s.curE2E = s.curE2E[:0]
}

// quantile of sorted values, by the nearest rank.
func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func quantiles(v []float64) Quantiles {
	if len(v) == 0 {
		return Quantiles{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	sum := 0.0
	for _, x := range s {
		sum += x
	}
	return Quantiles{N: len(s), Mean: sum / float64(len(s)), P50: quantile(s, 0.5), P90: quantile(s, 0.9), P95: quantile(s, 0.95),
		P99: quantile(s, 0.99), Max: s[len(s)-1]}
}

func (s *sim) collect() *Result {
	sc := s.sc
	res := &Result{Scenario: sc.Name, Seed: sc.Seed, Duration: sc.DurationS, Params: s.params(), Series: s.series, Latencies: s.lat}
	sum := &res.Summary
	sum.Requests, sum.Completed, sum.Failed = s.arrived, s.completed, s.failed
	sum.Unfinished = max(0, s.arrived-s.completed-s.failed)
	if s.arrived > 0 {
		// Unfinished requests (still in flight at the end) are not completed.
		sum.CompletionRate = float64(s.completed) / float64(s.arrived)
	}
	sum.Throughput = float64(s.completed) / sc.DurationS
	sum.TokensPerSec = float64(s.tokens) / sc.DurationS
	sum.E2E, sum.TTFT, sum.PerToken = quantiles(s.lat.E2E), quantiles(s.lat.TTFT), quantiles(s.lat.PerToken)
	if s.routes > 0 {
		sum.Hops = float64(s.hopsSum) / float64(s.routes)
	}
	sum.Failovers, sum.Resumes, sum.Replays = s.failovers, s.resumes, s.replays
	sum.Busy, sum.Stalls = s.failKinds[mesh.FailBusy], s.failKinds[mesh.FailStall]
	sum.Unreachable, sum.Refused = s.failKinds[mesh.FailHard], s.failKinds[mesh.FailRefused]
	for i, rl := range s.regionLat {
		if sc.Regions[i].Weight > 0 {
			res.Regions = append(res.Regions, RegionStat{Region: sc.Regions[i].Name, Completed: rl.completed, Failed: rl.failed,
				E2E: quantiles(rl.lat.E2E), TTFT: quantiles(rl.lat.TTFT), PerToken: quantiles(rl.lat.PerToken)})
		}
	}
	sum.PeersEnd, sum.Joins, sum.Leaves, sum.Moves = s.online, s.joins, s.leaves, s.moves
	sum.MinCoverage = s.minCov
	sum.Blocks = s.blocks
	sum.Blocks.MovesGivenUp = s.keeps
	for _, t := range s.lostAt {
		if t >= 0 { // still lost at the end
			sum.Blocks.LostS += float64(s.end-t) / 1e9
		}
	}
	if h := int(slices.Min(s.covered)); sum.Blocks.MinHolders < 0 || h < sum.Blocks.MinHolders {
		sum.Blocks.MinHolders = h // and at the end
	}
	sum.Events = s.events
	for i := range s.reqs {
		if r := &s.reqs[i]; r.live {
			first := r.gen && r.step > 0 && r.firstTok <= s.end
			res.Latencies.Unfinished = append(res.Latencies.Unfinished, unfinishedAt(float64(s.end)/1e9, float64(r.arrive)/1e9,
				float64(r.firstTok)/1e9, first, r.gen, int(r.output)))
		}
	}
	loads := make([]peerLoad, 0, len(s.peers))
	for i, p := range s.peers {
		if !p.everOnline {
			continue
		}
		if !p.replacement {
			sum.PeersStart++
		}
		until := s.end
		if p.gone {
			until = p.left
		}
		online := float64(until-p.joined) / 1e9
		ps := PeerStat{ID: i, Passes: p.passes, Online: online, Failed: p.failed}
		if online > 0 {
			ps.Busy = float64(p.busy) / 1e9 / online / float64(len(p.slots))
		}
		if len(sc.Network.Nodes) > 0 {
			ps.Class, ps.Region = "node", sc.Network.Nodes[i].Name
		} else {
			ps.Class, ps.Region = sc.Classes[p.class].Name, sc.Regions[p.region].Name
		}
		res.Peers = append(res.Peers, ps)
		loads = append(loads, peerLoad{id: i, util: ps.Busy, ran: p.passes > 0, start: p.start, end: p.end})
	}
	sum.Load = loadSpread(loads, sc.Model.Blocks)
	sum.Capacity = s.capacity(sum.Throughput)
	return res
}

func (s *sim) params() []string {
	sc := s.sc
	out := []string{
		fmt.Sprintf("duration: %gs", sc.DurationS),
		fmt.Sprintf("model: %d blocks of %g MB, %g KB activations per token", sc.Model.Blocks, sc.Model.BlockMB, sc.Model.ActivationKB),
	}
	if len(sc.Network.Nodes) > 0 {
		out = append(out, fmt.Sprintf("topology: explicit, %d nodes", len(sc.Network.Nodes)))
	} else {
		out = append(out, fmt.Sprintf("peers: %d", sc.Peers))
		for _, c := range sc.Classes {
			out = append(out, fmt.Sprintf("class %s: share %g, %g ms/block, %g GB, %g Mbps, last mile %g ms", c.Name, c.Share, c.BlockMS,
				c.MemoryGB, c.BandwidthMbps, c.LastMileMS))
		}
		for _, r := range sc.Regions {
			out = append(out, fmt.Sprintf("region %s: users %g, peers %g", r.Name, r.Weight, r.peerWeight()))
		}
		out = append(out, fmt.Sprintf("placement: %s, rebalance every %gs", sc.Placement, sc.RebalanceS))
		churn := fmt.Sprintf("churn: %g/hour leave, %g crash, replace %v", sc.Churn.LeavePerHour, sc.Churn.CrashFraction, sc.Churn.Replace)
		if d := sc.Churn.Session; d.Dist != "" && d.Dist != "exp" {
			churn += fmt.Sprintf(", %s sessions", d.Dist)
			if d.Dist == "lognormal" {
				churn += fmt.Sprintf(" (sigma %g)", d.Sigma)
			}
		}
		out = append(out, churn)
	}
	w := &sc.Workload
	out = append(out, fmt.Sprintf("workload: %g req/s, diurnal %g, generate %g, prompt %s, output %s", w.Rate, w.Diurnal, w.Generate,
		w.Prompt.String(), w.Output.String()))
	if w.Generate > 0 {
		if w.Decode == DecodeRing {
			out = append(out, "decode: ring (the last hop sends each next step to the first hop and the token to the requester)")
		} else {
			out = append(out, "decode: requester loop (each step a round trip from the requester)")
		}
	}
	if w.Gateway != "" {
		where := "in " + w.Gateway
		if w.Gateway == "local" {
			where = "in each user's region"
		}
		out = append(out, fmt.Sprintf("gateway: %s (last mile %g ms, %g Mbps), requests run there and stream tokens to the users",
			where, w.GatewayLastMileMS, w.GatewayBandwidthMbps))
	}
	out = append(out, fmt.Sprintf("dht: record ttl %gs, view refresh %gs", sc.DHT.RecordTTLS, sc.DHT.ViewRefreshS))
	out = append(out, fmt.Sprintf("network: hop overhead %g µs per message", *sc.Network.HopOverheadUS))
	if !*sc.Routing.Spread {
		out = append(out, "routing: no spreading (every requester takes the best route of its view)")
	}
	return out
}

func (d Dist) String() string {
	switch d.Dist {
	case "uniform":
		return fmt.Sprintf("uniform %g-%g", d.Min, d.Max)
	case "lognormal":
		return fmt.Sprintf("lognormal mean %g sigma %g", d.Mean, d.Sigma)
	}
	return fmt.Sprintf("%s %g", d.Dist, d.Mean)
}
