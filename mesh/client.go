package mesh

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sort"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// InferOptions tune a request through the mesh. Zero values take the
// defaults named on each field.
type InferOptions struct {
	// StepTimeout bounds one step end to end (default 30 s); past it the
	// requester treats the hop that has not answered as failed. It is the
	// outer bound: a hop that makes no progress is failed over sooner, at
	// its progress deadline (HopProgressTimeout).
	StepTimeout time.Duration
	// ProgressFloor is the least time a hop is given to report after the
	// hop before it did (default ProgressFloor); a hop not yet seen to
	// complete a step on its span gets ProgressColdFloor/ProgressFloor
	// times as much. Tests lower it; a negative value turns progress
	// deadlines off (the step timeout alone applies).
	ProgressFloor time.Duration
	// MaxFailovers bounds how many times one step is re-routed (default 16).
	MaxFailovers int
	// FP16 sends float32 activations as float16 (half the bytes; not
	// bit-exact).
	FP16 bool
	// Avoid lists peers to leave out of routes while others cover their
	// blocks (an operator's preference; tests steer routes with it).
	Avoid []peer.ID
	// RequesterLoop makes a generation run its decode loop at the
	// requester (each token comes back before the next step goes out)
	// instead of as a decode ring (Session.Ring); for clients that feed
	// tokens of their own.
	RequesterLoop bool
	// Check, if set, vets a result before it is accepted (the model's
	// declared outputs, say); a result it refuses blames the last hop,
	// which is routed around like any failed hop.
	Check func(shards.Tensors) error
}

func (o *InferOptions) defaults() {
	if o.StepTimeout <= 0 {
		o.StepTimeout = 30 * time.Second
	}
	if o.MaxFailovers <= 0 {
		o.MaxFailovers = 16
	}
	if o.ProgressFloor == 0 {
		o.ProgressFloor = ProgressFloor
	}
}

// StepInfo says how a step travelled.
type StepInfo struct {
	Route     []protocol.Hop // the route of the step as finally completed
	HopMicros []int64        // compute time at each hop of Route
	Total     time.Duration  // end to end at the requester
	Failovers int            // hops replaced during the step (a decode ring: rings restarted on a new route)
	Resumes   int            // a decode ring's steps sent again on the same route after a hop answered busy
}

// call is one of this node's requests in flight: answers for it are
// delivered here.
type call struct {
	route []protocol.Hop
	ch    chan *protocol.Message
	// accusers: the sender of each error frame that names another hop than
	// its sender's (guarded by the stage's mutex). An error frame not in it
	// came from the hop it names, or from this node itself.
	accusers map[*protocol.Message]int
	ring     bool // a decode ring: its last hop sends to its first
}

// accuser returns the hop of c's route that sent error frame msg when that
// is not the hop msg names, or -1.
func (st *stage) accuser(c *call, msg *protocol.Message) int {
	st.mu.Lock()
	defer st.mu.Unlock()
	if j, ok := c.accusers[msg]; ok {
		return j
	}
	return -1
}

func (st *stage) register(id uint64, route []protocol.Hop) *call {
	c := &call{route: route, ch: make(chan *protocol.Message, len(route)+2)}
	st.mu.Lock()
	st.pending[id] = c
	st.mu.Unlock()
	return c
}

// registerRing registers a decode ring's request: many steps' frames
// come for it, so it buffers more of them.
func (st *stage) registerRing(id uint64, route []protocol.Hop) *call {
	c := &call{route: route, ch: make(chan *protocol.Message, 4*len(route)+16), ring: true}
	st.mu.Lock()
	st.pending[id] = c
	st.mu.Unlock()
	return c
}

func (st *stage) unregister(id uint64) {
	st.mu.Lock()
	delete(st.pending, id)
	st.mu.Unlock()
}

// deliver hands a progress, result or error to the request waiting for it,
// if the sender is a hop of that request's route.
func (st *stage) deliver(from peer.ID, msg *protocol.Message) {
	st.mu.Lock()
	c, ok := st.pending[msg.Header.ID]
	st.mu.Unlock()
	if !ok {
		return // late answer to a request already settled
	}
	h := msg.Header.Hop
	if h < 0 || h >= len(c.route) {
		return
	}
	switch msg.Kind {
	case protocol.KindProgress, protocol.KindResult:
		if c.route[h].Peer != from.String() {
			return
		}
		if l := msg.Header.Load; l != nil {
			st.m.view.observeLoad(from, *l, time.Now())
		}
	case protocol.KindError:
		// The failing hop reports, or this node itself; or a neighbour
		// accuses it: the hop before (it could not reach it) or after (it
		// sent malformed activations). An accusation is no proof: the
		// requester remembers who made it (Accusations).
		switch {
		case from == st.m.host.ID(), c.route[h].Peer == from.String():
		case h > 0 && c.route[h-1].Peer == from.String():
			st.markAccuser(c, msg, h-1)
		case h+1 < len(c.route) && c.route[h+1].Peer == from.String():
			st.markAccuser(c, msg, h+1)
		case c.ring && h == 0 && c.route[len(c.route)-1].Peer == from.String():
			// A decode ring's last hop feeds the first.
			st.markAccuser(c, msg, len(c.route)-1)
		default:
			return
		}
	default:
		return
	}
	select {
	case c.ch <- msg:
	default: // the requester stopped listening
	}
}

func (st *stage) markAccuser(c *call, msg *protocol.Message, j int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if c.accusers == nil {
		c.accusers = map[*protocol.Message]int{}
	}
	c.accusers[msg] = j
}

// AccusationError is an error a hop reported about another hop of the
// route. It is not proof against the accused: the requester routes the
// step around both, bans neither on the accuser's word, and keeps the
// accusation until the evidence confirms or refutes it (Accusations).
type AccusationError struct {
	Accuser int // the hop that reported, in the route the step ran on
	Accused int // the hop it named
	// Report is the error as reported, naming the accused.
	Report *protocol.RemoteError
	// By is the accuser's peer ID.
	By string
}

func (e *AccusationError) Error() string {
	return fmt.Sprintf("hop %d (%s) reports: %v", e.Accuser, e.By, e.Report)
}

func (e *AccusationError) Unwrap() error { return e.Report }

// failedHops returns the hops of a route a step's failure at hop failed
// puts in doubt: that hop; for an accusation, the accuser and the accused
// and those between.
func failedHops(failed int, err error) (lo, hi int) {
	var ac *AccusationError
	if errors.As(err, &ac) {
		return min(ac.Accuser, ac.Accused), max(ac.Accuser, ac.Accused)
	}
	return failed, failed
}

var idMu sync.Mutex
var lastID uint64

func nextID() uint64 {
	idMu.Lock()
	defer idMu.Unlock()
	lastID++
	return uint64(time.Now().UnixNano())<<8 ^ lastID
}

// route plans hops for blocks [start, end) of a model, avoiding banned
// peers and those the caller would rather not use.
func (m *Mesh) route(ctx context.Context, model cid.Cid, start, end int, avoid []peer.ID, d *doubts) ([]protocol.Hop, int, error) {
	return m.planRoute(ctx, model, start, end, avoid, d, nil)
}

// planRoute is route; with a session, the route chosen becomes the one it
// holds among this node's own sessions (see ownSessions) in the same step
// as the choice, so that sessions opened at the same moment each see the
// others' routes.
func (m *Mesh) planRoute(ctx context.Context, model cid.Cid, start, end int, avoid []peer.ID, d *doubts, s *Session) ([]protocol.Hop, int, error) {
	mv, err := m.view.Model(ctx, model)
	if err != nil {
		return nil, 0, err
	}
	// The view's count is the manifest's when this node has it, and never
	// one peer's against a majority; peers whose span does not fit it are
	// left out of mv (Ignored), the distrusted included.
	blocks := mv.Blocks
	if blocks == 0 {
		return nil, 0, fmt.Errorf("%w: nobody serves model %s", ErrNoRoute, model)
	}
	if end <= 0 {
		end = blocks
	}
	// Avoided peers first, then banned ones, are preferences: when leaving
	// them out leaves a span uncovered, they are let back in rather than
	// the request failing. Peers this node failed to reach since their last
	// record (the view's distrusted) come back last (PlanRouteTrusting).
	req := RouteRequest{Blocks: blocks, Start: start, End: end, Tokens: 1, From: m.coords.Self(), HaveFrom: true, Self: m.host.ID()}
	avoided, banned := map[peer.ID]bool{}, m.bans.set()
	for _, p := range avoid {
		avoided[p] = true
	}
	if d != nil {
		for _, p := range d.avoid {
			avoided[p] = true
		}
		for _, p := range d.shun {
			banned[p] = true
		}
	}
	// Each route is drawn among the near-equal ones, so that the requesters
	// sharing a view do not all pile onto its cheapest route.
	req.Rand = mrand.New(mrand.NewPCG(mrand.Uint64(), mrand.Uint64()))
	cands, distrusted := Candidates(mv), peerCandidates(mv.Distrusted)
	m.own.mu.Lock()
	defer m.own.mu.Unlock()
	WithOwnLoad(cands, m.own.n)
	WithOwnLoad(distrusted, m.own.n)
	r, err := PlanRouteTrusting(cands, distrusted, req, avoided, banned)
	if err != nil {
		return nil, blocks, err
	}
	hops := make([]protocol.Hop, len(r.Hops))
	for i, h := range r.Hops {
		hops[i] = protocol.Hop{Peer: h.Peer.String(), Start: h.Start, End: h.End}
	}
	if s != nil {
		m.own.swapLocked(s.held, hops)
		s.route, s.held = hops, hops
	}
	return hops, blocks, nil
}

// bans remembers peers that failed, each for a while growing with repeated
// failures.
type bans struct {
	mu    sync.Mutex
	until map[peer.ID]time.Time
	count map[peer.ID]int
	// accusations are the faults hops reported of other hops, until the
	// evidence settles them.
	accusations Accusations
}

func (b *bans) ban(p peer.ID, kind FailureKind) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.until == nil {
		b.until, b.count = map[peer.ID]time.Time{}, map[peer.ID]int{}
	}
	b.count[p]++
	b.until[p] = time.Now().Add(BanDuration(kind, b.count[p]))
}

// blame bans the peer of a failed hop for as long as BanDuration says and,
// when the failure distrusts it (unreachable, garbage), keeps it out of the
// view until it publishes again.
func (m *Mesh) blame(p string, err error) {
	id, derr := peer.Decode(p)
	if derr != nil || id == m.host.ID() {
		return
	}
	kind := ClassifyFailure(err)
	m.bans.ban(id, kind)
	if Distrusts(kind) {
		m.view.distrust(id)
	}
}

// doubts are the peers a request leaves out of its retries after an
// accusation, without banning them for other requests: the accused is
// avoided (as InferOptions.Avoid), the accuser shunned (as if banned).
// Both are let back in rather than the request failing.
type doubts struct {
	avoid, shun []peer.ID
}

// judge acts on the failure of a step at hop failed of route: it bans the
// peer the evidence points at (BanDuration), and adds to d the peers to
// leave out of the retries of this request. The evidence is a hop's report of
// its own fault, or this node's own observation (a stall, a refused
// result, a lost connection, a failure of its own hop): the accused is
// banned, and the accusations against it were right. A report about
// another hop is an accusation: neither is banned on it, both are left
// out of the retry, and the accusation waits for the evidence (vindicate).
// A hop whose accusations were refuted more often than confirmed is not
// believed: its report is its own failure.
func (m *Mesh) judge(route []protocol.Hop, failed int, err error, d *doubts) {
	if failed < 0 || failed >= len(route) {
		return
	}
	var ac *AccusationError
	if !errors.As(err, &ac) {
		if id, derr := peer.Decode(route[failed].Peer); derr == nil && ClassifyFailure(err) != FailBusy {
			m.bans.accusations.Confirm(id, time.Now())
		}
		m.blame(route[failed].Peer, err)
		return
	}
	accuser, err1 := peer.Decode(ac.By)
	accused, err2 := peer.Decode(ac.Report.Peer)
	if err1 != nil || err2 != nil {
		return
	}
	if m.bans.accusations.Liar(accuser) {
		m.log.Info("not believing a hop that accuses another; it is itself distrusted", "accuser", accuser, "accused", accused, "report", ac.Report)
		m.blame(ac.By, fmt.Errorf("%w: %v", ErrFalseAccusation, ac.Report))
		return
	}
	m.log.Info("a hop reports another's fault; routing around both, banning neither", "accuser", accuser, "accused", accused, "report", ac.Report)
	m.bans.accusations.Accuse(accuser, accused, time.Now())
	d.avoid = append(d.avoid, accused)
	d.shun = append(d.shun, accuser)
}

// vindicate records that every hop of route did its part in a step that
// succeeded: the accusations pending against them were wrong, and the
// peers that made more wrong accusations than right are banned and
// distrusted as liars.
func (m *Mesh) vindicate(route []protocol.Hop) {
	now := time.Now()
	for _, h := range route {
		id, err := peer.Decode(h.Peer)
		if err != nil {
			continue
		}
		for _, liar := range m.bans.accusations.Refute(id, now) {
			right, wrong := m.bans.accusations.Tally(liar)
			m.log.Info("a hop's accusations were refuted more often than confirmed; distrusting it", "peer", liar,
				"right", right, "wrong", wrong)
			m.blame(liar.String(), ErrFalseAccusation)
		}
	}
}

// set returns the peers banned now.
func (b *bans) set() map[peer.ID]bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[peer.ID]bool{}
	now := time.Now()
	for p, t := range b.until {
		if now.Before(t) {
			out[p] = true
		}
	}
	return out
}

// Infer runs one stateless pass of a model through the mesh: the request
// goes to the first hop, travels hop to hop, and the last hop returns the
// outputs. On a failure it bans the failing peer and retries on a new
// route.
func (m *Mesh) Infer(ctx context.Context, model cid.Cid, inputs shards.Tensors, opts InferOptions) (shards.Tensors, *StepInfo, error) {
	opts.defaults()
	info := &StepInfo{}
	start := time.Now()
	var lastErr error
	var d doubts // the peers accusations put in doubt during this request
	for attempt := 0; attempt <= opts.MaxFailovers; attempt++ {
		route, blocks, err := m.route(ctx, model, 0, 0, opts.Avoid, &d)
		if err != nil && blocks > 0 && errors.Is(err, ErrNoRoute) && attempt < opts.MaxFailovers {
			select { // peers were banned by earlier attempts: let busy bans lapse
			case <-time.After(RetryPause(attempt)):
				continue
			case <-ctx.Done():
				return nil, info, ctx.Err()
			}
		}
		if err != nil {
			return nil, info, errors.Join(err, lastErr)
		}
		out, micros, failed, err := m.runRoute(ctx, model, "", 0, route, inputs, opts)
		if err == nil {
			m.vindicate(route)
			info.Route, info.HopMicros, info.Total = route, micros, time.Since(start)
			return out, info, nil
		}
		if ctx.Err() != nil {
			return nil, info, ctx.Err()
		}
		var ac *AccusationError
		if failed == 0 && errors.Is(err, protocol.ErrBadRequest) && !errors.As(err, &ac) {
			return nil, info, err // the first hop refused our own inputs: no other hop will take them
		}
		lastErr = err
		if failed >= 0 {
			m.judge(route, failed, err, &d)
			info.Failovers++
		}
	}
	return nil, info, fmt.Errorf("gave up after %d failovers: %w", opts.MaxFailovers, lastErr)
}

// runRoute sends one step down route and waits for its result. On failure
// it returns the index of the hop that failed (-1 when none can be): the
// one to blame, or, with an *AccusationError, the hop that accused another
// (judge decides), and keeps the progress of the hops that answered in
// progress (for sessions).
func (m *Mesh) runRoute(ctx context.Context, model cid.Cid, session string, step int, route []protocol.Hop, inputs shards.Tensors,
	opts InferOptions) (shards.Tensors, []int64, int, error) {
	out, micros, _, failed, err := m.runRouteProgress(ctx, model, session, step, route, inputs, opts)
	return out, micros, failed, err
}

func (m *Mesh) runRouteProgress(ctx context.Context, model cid.Cid, session string, step int, route []protocol.Hop,
	inputs shards.Tensors, opts InferOptions) (shards.Tensors, []int64, []shards.Tensors, int, error) {
	id := nextID()
	c := m.stage.register(id, route)
	defer m.stage.unregister(id)
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, opts.StepTimeout)
	defer cancel()
	msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: m.host.ID().String(),
		Model: model.String(), Session: session, Step: step, Route: route, FP16: opts.FP16}}
	if dl, ok := ctx.Deadline(); ok {
		msg.Header.Deadline = dl.UnixMilli()
	}
	for _, name := range sortedNames(inputs) {
		msg.Tensors = append(msg.Tensors, protocol.NamedTensor{Name: name, Tensor: inputs[name]})
	}
	first, err := peer.Decode(route[0].Peer)
	if err != nil {
		return nil, nil, nil, 0, err
	}
	micros := make([]int64, len(route))
	progress := make([]shards.Tensors, len(route)) // progress[h]: what hop h sent on
	allow := m.progressTimeouts(ctx, model, route, tokensOf(inputs), opts.ProgressFloor)
	if err := m.stage.send(ctx, first, msg); err != nil {
		return nil, micros, progress, 0, fmt.Errorf("hop 0: %w", err)
	}
	// frontier is the first hop none of whose successors has reported: a
	// report from hop h shows every hop up to h did its part. The
	// frontier must report within its progress deadline, counted from
	// when the hop before it reported (or the request was sent).
	frontier := 0
	var deadline <-chan time.Time
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	arm := func() {
		timer.Stop()
		deadline = nil
		if allow[frontier] > 0 {
			timer.Reset(allow[frontier])
			deadline = timer.C
		}
	}
	arm()
	reported := func(h int) {
		m.stage.markWarm(msg.Header.Model, route, h)
		if h+1 > frontier && h+1 < len(route) {
			frontier = h + 1
			arm()
		}
	}
	for {
		select {
		case <-deadline:
			// A hop that stops answering (crashed without closing its
			// connection, wedged, or hostile) is failed over now rather than
			// at the step timeout.
			m.cancelRequest(id, "", route[frontier:]) // the request only: the session stays at the hops
			return nil, micros, progress, frontier, fmt.Errorf("%w: hop %d made no progress in %s", ErrStall, frontier,
				allow[frontier].Round(time.Millisecond))
		case <-ctx.Done():
			if err := parent.Err(); err != nil {
				// The caller gave up: tell the hops, so that those still
				// to run it drop the request instead of computing it.
				m.cancelRequest(id, session, route)
				return nil, micros, progress, -1, err
			}
			// Blame the first hop none of whose successors has reported.
			return nil, micros, progress, frontier, fmt.Errorf("%w (%s)", ErrStall, opts.StepTimeout)
		case a := <-c.ch:
			h := a.Header.Hop
			switch a.Kind {
			case protocol.KindProgress:
				micros[h], progress[h] = a.Header.Micros, a.Map()
				reported(h)
			case protocol.KindResult:
				micros[h] = a.Header.Micros
				reported(h)
				if session != "" {
					m.awaitProgress(c, ctx, progress, micros)
				}
				out := a.Map()
				if opts.Check != nil {
					if err := opts.Check(out); err != nil {
						return nil, micros, progress, h, &protocol.RemoteError{Code: protocol.CodeBadOutput,
							Message: "result refused: " + err.Error(), Hop: h, Peer: route[h].Peer}
					}
				}
				return out, micros, progress, -1, nil
			case protocol.KindError:
				if a.Header.Message == "disconnected" && h < len(route)-1 && progress[h] != nil {
					continue // that hop already did its part; its successor carries on
				}
				report := &protocol.RemoteError{Code: a.Header.Code, Message: a.Header.Message, Hop: h, Peer: route[h].Peer}
				if j := m.stage.accuser(c, a); j >= 0 {
					return nil, micros, progress, j, &AccusationError{Accuser: j, Accused: h, Report: report, By: route[j].Peer}
				}
				return nil, micros, progress, h, report
			}
		}
	}
}

// progressTimeouts returns, for each hop of route, how long it may take
// to report once the hop before it did (HopProgressTimeout): from its
// advertised block_micros for its span, tokens, the estimated RTT and
// floor (ProgressColdFloor's multiple of it for a hop not yet seen to
// complete a step on its span with the same next hop: it may be loading the
// span or dialling its successor). 0 means no deadline but the step's: a
// negative floor, or a hop whose timings this node does not know.
func (m *Mesh) progressTimeouts(ctx context.Context, model cid.Cid, route []protocol.Hop, tokens int, floor time.Duration) []time.Duration {
	allow := make([]time.Duration, len(route))
	if floor < 0 {
		return allow
	}
	mv, err := m.view.Model(ctx, model)
	if err != nil {
		return allow
	}
	byID := map[string]PeerView{}
	for _, pvs := range [][]PeerView{mv.Distrusted, mv.Peers} {
		for _, pv := range pvs {
			byID[pv.ID.String()] = pv
		}
	}
	for i, h := range route {
		pv, ok := byID[h.Peer]
		if !ok || h.Start < pv.Span.Start || h.End > pv.Span.End || len(pv.Span.BlockMicros) != pv.Span.End-pv.Span.Start {
			continue
		}
		var us float64
		for b := h.Start; b < h.End; b++ {
			us += max(pv.Span.BlockMicros[b-pv.Span.Start], 0)
		}
		f := floor
		if !m.stage.isWarm(model.String(), route, i) {
			f = floor * (ProgressColdFloor / ProgressFloor)
		}
		allow[i] = HopProgressTimeout(us, tokens, pv.RTT, f)
	}
	return allow
}

// tokensOf estimates how many token positions a step carries, which its
// compute time grows with: input_ids' elements when present (batch times
// sequence; a session's first step carries the whole prompt), else, for
// activations, the elements of each float tensor of rank 3 or more but its
// last dimension ([batch, seq, width]), the largest; at least 1.
func tokensOf(inputs shards.Tensors) int {
	if t, ok := inputs["input_ids"]; ok && t != nil {
		return int(max(protocol.NumElements(t.Shape), 1))
	}
	n := int64(1)
	for _, t := range inputs {
		if t == nil || len(t.Shape) < 3 || t.DType == protocol.Int64 || t.DType == protocol.Bool {
			continue
		}
		n = max(n, protocol.NumElements(t.Shape[:len(t.Shape)-1]))
	}
	return int(n)
}

// progressGrace is how long a requester waits, after a result, for the
// progress of earlier hops still on its way: the session history needs it.
const progressGrace = time.Second

// awaitProgress collects the progress messages a result overtook.
func (m *Mesh) awaitProgress(c *call, ctx context.Context, progress []shards.Tensors, micros []int64) {
	missing := func() bool {
		for h := 0; h < len(progress)-1; h++ {
			if progress[h] == nil {
				return true
			}
		}
		return false
	}
	t := time.NewTimer(progressGrace)
	defer t.Stop()
	for missing() {
		select {
		case a := <-c.ch:
			if a.Kind == protocol.KindProgress && a.Header.Hop < len(progress)-1 {
				progress[a.Header.Hop], micros[a.Header.Hop] = a.Map(), a.Header.Micros
			}
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// cancelRequest sends a close for request id to every hop of its route
// (best effort, in the background).
func (m *Mesh) cancelRequest(id uint64, session string, route []protocol.Hop) {
	msg := &protocol.Message{Kind: protocol.KindClose, Header: protocol.Header{ID: id, Requester: m.host.ID().String(), Session: session}}
	m.spawn(func() {
		ctx, cancel := context.WithTimeout(m.ctx, 2*time.Second)
		defer cancel()
		for _, h := range route {
			if p, err := peer.Decode(h.Peer); err == nil {
				m.stage.send(ctx, p, msg)
			}
		}
	})
}

// Session is a generation (or any stateful stream) through the mesh: each
// hop keeps its blocks' state (KV cache) between steps. The requester keeps
// what each hop was sent, so when a hop fails it re-routes just that span,
// replays the history there to rebuild the state, and carries on: the
// outputs are those of an uninterrupted run. A Session is used by one
// goroutine at a time.
type Session struct {
	m       *Mesh
	model   cid.Cid
	id      string
	opts    InferOptions
	route   []protocol.Hop
	held    []protocol.Hop     // the route counted in m.own, until Close
	history [][]shards.Tensors // history[h][s]: inputs hop h got at step s
	steps   int
	closed  bool
}

// NewSession starts a session for a model; the route is chosen at the first
// step.
func (m *Mesh) NewSession(model cid.Cid, opts InferOptions) *Session {
	opts.defaults()
	var b [16]byte
	rand.Read(b[:])
	return &Session{m: m, model: model, id: hex.EncodeToString(b[:]), opts: opts}
}

// setRoute makes route the session's, counted among this node's own
// sessions on its peers (for routing) until it changes or Close.
func (s *Session) setRoute(route []protocol.Hop) {
	s.m.own.swap(s.held, route)
	s.route, s.held = route, route
}

// Route is the session's current route.
func (s *Session) Route() []protocol.Hop { return s.route }

// Step runs one step: its inputs go down the route; each hop updates its
// state; the outputs come back.
func (s *Session) Step(ctx context.Context, inputs shards.Tensors) (shards.Tensors, *StepInfo, error) {
	if s.closed {
		return nil, nil, errors.New("session closed")
	}
	start := time.Now()
	info := &StepInfo{}
	for attempt := 0; s.route == nil; attempt++ {
		_, blocks, err := s.m.planRoute(ctx, s.model, 0, 0, s.opts.Avoid, nil, s)
		if err != nil {
			// A model the mesh serves but cannot cover right now (peers
			// leaving and joining) is worth waiting for a little.
			if blocks == 0 || !errors.Is(err, ErrNoRoute) || attempt >= s.opts.MaxFailovers {
				return nil, info, err
			}
			select {
			case <-time.After(RetryPause(attempt)):
				continue
			case <-ctx.Done():
				return nil, info, ctx.Err()
			}
		}
		s.history = make([][]shards.Tensors, len(s.route))
	}
	// from: the hop this attempt starts at; in: what it gets; d: the peers
	// accusations put in doubt during this step.
	from, in := 0, inputs
	var d doubts
	micros := make([]int64, len(s.route))
	for {
		sub := s.route[from:]
		out, subMicros, progress, failed, err := s.m.runRouteProgress(ctx, s.model, s.id, s.steps, sub, in, s.opts)
		copy(micros[from:], subMicros)
		// Record what each hop of the attempt was sent (for later replays).
		s.record(from, in, progress)
		if err == nil {
			s.steps++
			s.m.vindicate(s.route)
			info.Route, info.HopMicros, info.Total = s.route, micros, time.Since(start)
			return out, info, nil
		}
		if ctx.Err() != nil {
			return nil, info, ctx.Err()
		}
		if failed < 0 || info.Failovers >= s.opts.MaxFailovers {
			return nil, info, err
		}
		// The hops in doubt: the failed one; for an accusation, the accuser
		// and the accused (judge bans neither on the accuser's word).
		lo, f := failedHops(failed, err)
		lo, f = from+lo, from+f
		s.m.log.Info("hop failed; re-routing its span", "hop", f, "peer", s.route[f].Peer, "blocks",
			fmt.Sprintf("%d-%d", s.route[lo].Start, s.route[f].End-1), "err", err)
		s.m.judge(s.route[from:], failed, err, &d)
		info.Failovers++
		// Replaying needs every past input of the first replaced hop; when
		// some never reached us, replace from an earlier hop whose history
		// is whole (the first hop's always is: it is what we sent).
		r := ReplayFrom(lo, s.complete)
		if rerr := s.replace(ctx, r, f, &d); rerr != nil {
			s.m.log.Info("could not replace the hop yet", "err", rerr)
			if info.Failovers >= s.opts.MaxFailovers {
				return nil, info, errors.Join(err, rerr)
			}
			// Try again after a pause: busy bans lapse, the view learns
			// of new peers.
			select {
			case <-time.After(RetryPause(info.Failovers)):
			case <-ctx.Done():
				return nil, info, ctx.Err()
			}
			continue
		}
		// Resume the step at the replacement with what hop r was sent, or
		// earlier when its input for this step never arrived (the hops
		// before it had not reported yet): from the last hop whose input
		// we know.
		from = ResumeFrom(r, func(h int) bool { return len(s.history[h]) > s.steps })
		in = s.history[from][s.steps]
		micros = append(micros[:0:0], make([]int64, len(s.route))...)
	}
}

// record stores the inputs of hops from, from+1, ... for the current step:
// hop from got in, hop from+i+1 got what hop from+i sent on.
func (s *Session) record(from int, in shards.Tensors, progress []shards.Tensors) {
	put := func(h int, t shards.Tensors) {
		for len(s.history[h]) <= s.steps {
			s.history[h] = append(s.history[h], nil)
		}
		s.history[h][s.steps] = t
	}
	put(from, in)
	for i, p := range progress {
		if p != nil && from+i+1 < len(s.route) {
			put(from+i+1, p)
		}
	}
}

// complete reports whether the inputs of hop h are known for every
// completed step.
func (s *Session) complete(h int) bool {
	if len(s.history[h]) < s.steps {
		return false
	}
	for _, in := range s.history[h][:s.steps] {
		if in == nil {
			return false
		}
	}
	return true
}

// replace re-routes the span of hops r..f around banned and avoided peers,
// replays the session history of hop r on the new hops to rebuild their
// state, and splices them into the route. A replay's failure adds to d
// the peers it puts in doubt.
func (s *Session) replace(ctx context.Context, r, f int, d *doubts) error {
	old := protocol.Hop{Peer: s.route[f].Peer, Start: s.route[r].Start, End: s.route[f].End}
	hops, _, err := s.m.route(ctx, s.model, old.Start, old.End, s.opts.Avoid, d)
	if err != nil {
		return err
	}
	last := f
	f = r // below, f is the first replaced hop
	// Replay every completed step through the new hops, in order; the last
	// new hop returns its outputs to us (which the old hop f+1 already has).
	// The progress of the new hops is their successors' input history.
	newHist := make([][]shards.Tensors, len(hops))
	newHist[0] = s.history[f][:s.steps]
	replay := s.opts
	replay.Check = nil // a replay's result is an inner activation, not the model's output
	for step := 0; step < s.steps; step++ {
		_, _, progress, failed, err := s.m.runRouteProgress(ctx, s.model, s.id, step, hops, s.history[f][step], replay)
		if err != nil {
			s.m.judge(hops, failed, err, d)
			return fmt.Errorf("replaying step %d of blocks %d-%d on %v: %w", step, old.Start, old.End-1, hops, err)
		}
		for i := 0; i+1 < len(hops); i++ {
			newHist[i+1] = append(newHist[i+1], progress[i])
		}
	}
	// Hop f's input for the step in flight, if it was recorded, stays with
	// the first new hop.
	if len(s.history[f]) > s.steps {
		newHist[0] = append(newHist[0], s.history[f][s.steps])
	}
	route := append(append(append([]protocol.Hop{}, s.route[:f]...), hops...), s.route[last+1:]...)
	history := append(append(append([][]shards.Tensors{}, s.history[:f]...), newHist...), s.history[last+1:]...)
	s.setRoute(route)
	s.history = history
	return nil
}

// Close ends the session at every hop (best effort) and forgets its
// history.
func (s *Session) Close() error {
	if s.closed {
		return nil
	}
	s.closed = true
	s.m.own.swap(s.held, nil)
	s.held = nil
	// The hops are told in the background, each on its own: a dead hop
	// (the usual reason a ring restarts) costs a dial timeout, which
	// neither the failover nor the other hops should wait for.
	msg := &protocol.Message{Kind: protocol.KindClose, Header: protocol.Header{Requester: s.m.host.ID().String(),
		Model: s.model.String(), Session: s.id}}
	for _, h := range s.route {
		if p, err := peer.Decode(h.Peer); err == nil {
			go func() {
				ctx, cancel := context.WithTimeout(s.m.ctx, closeTimeout)
				defer cancel()
				s.m.stage.send(ctx, p, msg)
			}()
		}
	}
	s.history = nil
	return nil
}

// closeTimeout bounds telling one hop that a session is over.
const closeTimeout = 2 * time.Second

func sortedNames(t shards.Tensors) []string {
	names := make([]string, 0, len(t))
	for n := range t {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
