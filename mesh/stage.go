package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// SpanProvider gives the stage server a runner for blocks [start, end) of a
// model this node serves. The node implements it (loading sub-spans of
// what it serves on demand); ErrNotServed says it does not serve them.
type SpanProvider interface {
	Runner(model string, start, end int) (shards.Runner, error)
}

// ErrNotServed is returned by a SpanProvider for blocks it does not serve.
var ErrNotServed = errors.New("blocks not served here")

// StageConfig bounds what a node's stage server accepts. Zero values take
// the defaults named on each field.
type StageConfig struct {
	// MaxInFlight is how many steps may compute at once (default 8); one
	// more gets an immediate busy.
	MaxInFlight int
	// MaxSessions bounds open sessions (default 256), each holding its
	// blocks' KV cache; one more gets busy.
	MaxSessions int
	// SessionIdle closes a session unused this long (default 2 min).
	SessionIdle time.Duration
	// MaxFrameBytes bounds one stage frame this node accepts (default 256
	// MiB, at most protocol.MaxFrameBytes): a peer cannot make it allocate
	// more than this per stream.
	MaxFrameBytes int
}

func (c *StageConfig) defaults() {
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 8
	}
	if c.MaxSessions <= 0 {
		c.MaxSessions = 256
	}
	if c.SessionIdle <= 0 {
		c.SessionIdle = 2 * time.Minute
	}
	if c.MaxFrameBytes <= 0 || c.MaxFrameBytes > protocol.MaxFrameBytes {
		c.MaxFrameBytes = 256 << 20
	}
}

// stage is the serving side of the stage protocol, and the delivery of
// progress, results and errors to this node's own requests.
type stage struct {
	m        *Mesh
	cfg      StageConfig
	provider SpanProvider

	mu       sync.Mutex
	inFlight int
	stats    StageStats
	sessions map[sessionKey]*hopSession
	links    map[peer.ID]*link
	pending  map[uint64]*call // this node's requests awaiting answers
	// requests their requesters cancelled, not to be run or forwarded
	cancelled map[cancelKey]bool
}

type cancelKey struct {
	requester string
	id        uint64
}

// maxCancelled bounds the cancelled requests remembered.
const maxCancelled = 4096

func (st *stage) isCancelled(h *protocol.Header) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.cancelled[cancelKey{h.Requester, h.ID}]
}

// sessionKey identifies a session's state at a hop.
type sessionKey struct {
	requester, session, model string
	start, end                int
}

type hopSession struct {
	sess     shards.Session
	next     int // the step it expects
	lastUsed time.Time
	busy     bool
	// lastOut is what step next-1 produced. A requester that resumes a
	// step at this hop without knowing the hop had done it (its progress
	// was still on the way) gets these outputs again rather than a step
	// run twice, which would corrupt the KV cache.
	lastOut shards.Tensors
}

// link is an outgoing stream to a peer carrying frames of many requests;
// writes are serialised.
type link struct {
	mu sync.Mutex
	s  network.Stream
}

// linkDialTimeout bounds opening a stage stream to a peer: a peer that
// cannot be reached this fast is treated as failed and routed around (a
// live peer on a reachable address answers in milliseconds to a round
// trip or two).
const linkDialTimeout = 2 * time.Second

func newStage(m *Mesh) *stage {
	st := &stage{m: m, sessions: map[sessionKey]*hopSession{}, links: map[peer.ID]*link{}, pending: map[uint64]*call{},
		cancelled: map[cancelKey]bool{}}
	st.cfg.defaults()
	m.host.SetStreamHandler(protocol.StageProtocol, st.handleStream)
	return st
}

// Serve makes this node answer stage requests for the spans p provides.
func (m *Mesh) Serve(p SpanProvider, cfg StageConfig) {
	cfg.defaults()
	m.stage.mu.Lock()
	m.stage.provider, m.stage.cfg = p, cfg
	m.stage.mu.Unlock()
}

// Load is the stage server's current load, for the capacity record.
func (m *Mesh) Load() protocol.Load {
	m.stage.mu.Lock()
	defer m.stage.mu.Unlock()
	return protocol.Load{InFlight: m.stage.inFlight}
}

// handleStream reads frames until the stream ends; each is handled on its
// own goroutine so that one slow step does not hold up the others.
func (st *stage) handleStream(s network.Stream) {
	from := s.Conn().RemotePeer()
	defer s.Close()
	st.mu.Lock()
	limit := st.cfg.MaxFrameBytes
	st.mu.Unlock()
	for {
		msg, err := protocol.ReadMessage(s, limit)
		if err != nil {
			if !errors.Is(err, io.EOF) && st.m.ctx.Err() == nil {
				st.m.log.Debug("stage stream ended", "peer", from, "err", err)
				s.Reset()
			}
			return
		}
		if st.m.ctx.Err() != nil {
			s.Reset()
			return
		}
		st.dispatch(from, msg)
	}
}

// dispatch acts on a frame from a peer (or from this node itself): a
// request runs, a close ends its session, anything else answers one of our
// own requests.
func (st *stage) dispatch(from peer.ID, msg *protocol.Message) {
	switch msg.Kind {
	case protocol.KindRequest:
		st.m.wg.Go(func() { st.handleRequest(from, msg) })
	case protocol.KindClose:
		st.closeSession(from, msg)
	default:
		st.deliver(from, msg)
	}
}

// send writes a frame to a peer over the link to it, opening one if
// needed; a broken link is replaced once.
func (st *stage) send(ctx context.Context, to peer.ID, msg *protocol.Message) error {
	if to == st.m.host.ID() {
		// A hop of our own route (or our own request's answer): no stream.
		st.dispatch(to, msg)
		return nil
	}
	for attempt := 0; ; attempt++ {
		l, err := st.link(ctx, to)
		if err != nil {
			return err
		}
		l.mu.Lock()
		if dl, ok := ctx.Deadline(); ok {
			l.s.SetWriteDeadline(dl)
		} else {
			l.s.SetWriteDeadline(time.Now().Add(30 * time.Second))
		}
		err = protocol.WriteMessage(l.s, msg)
		l.mu.Unlock()
		if err == nil {
			return nil
		}
		st.dropLink(to, l)
		if attempt > 0 || ctx.Err() != nil || errors.Is(err, protocol.ErrBadFrame) {
			return err
		}
	}
}

func (st *stage) link(ctx context.Context, to peer.ID) (*link, error) {
	st.mu.Lock()
	l, ok := st.links[to]
	st.mu.Unlock()
	if ok {
		return l, nil
	}
	dctx, cancel := context.WithTimeout(ctx, linkDialTimeout)
	st.m.learnAddrs(dctx, to)
	s, err := st.m.host.NewStream(dctx, to, protocol.StageProtocol)
	cancel()
	if err != nil {
		return nil, err
	}
	// Frames also flow back on a stream we opened (a peer answers on any
	// link), so read it too.
	st.m.wg.Go(func() { st.handleStream(s) })
	st.mu.Lock()
	defer st.mu.Unlock()
	if old, ok := st.links[to]; ok { // lost a race: keep the first
		s.Close()
		return old, nil
	}
	l = &link{s: s}
	st.links[to] = l
	return l, nil
}

func (st *stage) dropLink(to peer.ID, l *link) {
	st.mu.Lock()
	if st.links[to] == l {
		delete(st.links, to)
	}
	st.mu.Unlock()
	l.s.Reset()
}

// handleRequest runs one step at this hop and passes the outputs on.
func (st *stage) handleRequest(from peer.ID, msg *protocol.Message) {
	h := &msg.Header
	self := st.m.host.ID().String()
	requester, err := peer.Decode(h.Requester)
	if err != nil || h.Hop < 0 || h.Hop >= len(h.Route) || h.Route[h.Hop].Peer != self {
		st.m.log.Debug("dropped a stage request not for us", "from", from, "hop", h.Hop)
		return
	}
	// Only the requester (for the first hop) or the previous hop may send
	// a hop its inputs.
	if (h.Hop == 0 && from != requester) || (h.Hop > 0 && h.Route[h.Hop-1].Peer != from.String()) {
		st.fail(requester, h, protocol.CodeBadRequest, "request from a peer that is not the previous hop")
		return
	}
	ctx := st.m.ctx
	if h.Deadline > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, time.UnixMilli(h.Deadline))
		defer cancel()
		if ctx.Err() != nil {
			st.fail(requester, h, protocol.CodeDeadline, "deadline passed before the step started")
			return
		}
	}
	if st.isCancelled(h) {
		return
	}
	if !st.admit() {
		st.fail(requester, h, protocol.CodeBusy, fmt.Sprintf("%d steps in flight", st.cfg.MaxInFlight))
		return
	}
	start := time.Now()
	out, code, err := st.compute(requester, msg)
	st.release()
	if err != nil {
		var blame *blameError
		if errors.As(err, &blame) {
			blamed := *h
			blamed.Hop = blame.hop
			st.fail(requester, &blamed, code, blame.err.Error())
			return
		}
		st.fail(requester, h, code, err.Error())
		return
	}
	micros := time.Since(start).Microseconds()
	if st.isCancelled(h) {
		return
	}
	next := &protocol.Message{Kind: protocol.KindRequest, Header: *h, Tensors: out}
	next.Header.Tensors = nil
	next.Header.Micros = micros
	if h.Hop == len(h.Route)-1 {
		next.Kind = protocol.KindResult
		if err := st.send(ctx, requester, next); err != nil {
			st.m.log.Debug("result not delivered", "requester", requester, "err", err)
		}
		return
	}
	next.Header.Hop = h.Hop + 1
	nextPeer, err := peer.Decode(h.Route[h.Hop+1].Peer)
	if err != nil {
		st.fail(requester, h, protocol.CodeBadRequest, "bad next hop")
		return
	}
	if err := st.send(ctx, nextPeer, next); err != nil {
		// Blame the next hop: we computed fine but cannot reach it.
		st.fail(requester, &next.Header, protocol.CodeUnreachable, err.Error())
		return
	}
	// Progress tells the requester this hop is done (so it can tell which
	// hop stalls); for sessions it carries what was sent on, which the
	// requester keeps to rebuild a lost hop's state elsewhere.
	progress := &protocol.Message{Kind: protocol.KindProgress, Header: *h}
	progress.Header.Tensors, progress.Header.Micros, progress.Header.Route = nil, micros, nil
	if h.Session != "" {
		progress.Tensors = out
	}
	if err := st.send(ctx, requester, progress); err != nil {
		st.m.log.Debug("progress not delivered", "requester", requester, "err", err)
	}
}

func (st *stage) admit() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.inFlight >= st.cfg.MaxInFlight {
		st.stats.Busy++
		return false
	}
	st.inFlight++
	st.stats.Steps++
	st.stats.PeakInFlight = max(st.stats.PeakInFlight, st.inFlight)
	return true
}

// StageStats count what a node's stage server did.
type StageStats struct {
	Steps        uint64 // steps admitted
	Busy         uint64 // requests turned away busy
	PeakInFlight int    // most steps computing at once
	InFlight     int    // steps computing now
	Sessions     int    // sessions open now
}

// StageStats reports the stage server's counters.
func (m *Mesh) StageStats() StageStats {
	m.stage.mu.Lock()
	defer m.stage.mu.Unlock()
	s := m.stage.stats
	s.InFlight, s.Sessions = m.stage.inFlight, len(m.stage.sessions)
	return s
}

func (st *stage) release() {
	st.mu.Lock()
	st.inFlight--
	st.mu.Unlock()
}

// compute runs the hop's span on the message's tensors, in the request's
// session when it has one.
func (st *stage) compute(requester peer.ID, msg *protocol.Message) ([]protocol.NamedTensor, protocol.ErrorCode, error) {
	h := &msg.Header
	hop := h.Route[h.Hop]
	st.mu.Lock()
	provider := st.provider
	st.mu.Unlock()
	if provider == nil {
		return nil, protocol.CodeUnknownBlock, errors.New("this node serves nothing")
	}
	runner, err := provider.Runner(h.Model, hop.Start, hop.End)
	if err != nil {
		return nil, protocol.CodeUnknownBlock, err
	}
	inputs := msg.Map()
	if err := shards.CheckTensors(runner.Inputs(), inputs); err != nil {
		// Malformed activations are the sender's fault: blame the previous
		// hop (or, at the first hop, the requester's request).
		if h.Hop > 0 {
			return nil, protocol.CodeBadOutput, &blameError{hop: h.Hop - 1, err: fmt.Errorf("sent malformed activations: %w", err)}
		}
		return nil, protocol.CodeBadRequest, err
	}
	var out shards.Tensors
	if h.Session == "" {
		out, err = runner.Run(inputs)
	} else {
		key := sessionKey{requester: requester.String(), session: h.Session, model: h.Model, start: hop.Start, end: hop.End}
		hs, repeat, code, serr := st.session(key, runner, h.Step)
		if serr != nil {
			return nil, code, serr
		}
		if repeat != nil {
			out = repeat
		} else {
			out, err = hs.sess.Step(inputs)
			st.mu.Lock()
			hs.busy = false
			if err == nil {
				hs.next++
				hs.lastOut = out
			}
			hs.lastUsed = time.Now()
			st.mu.Unlock()
		}
	}
	if err != nil {
		return nil, protocol.CodeBadRequest, err
	}
	names := make([]protocol.NamedTensor, 0, len(out))
	for _, t := range sortedNames(out) {
		names = append(names, protocol.NamedTensor{Name: t, Tensor: out[t]})
	}
	return names, "", nil
}

// session finds or opens the hop's state for a session step. Steps must
// come in order: a step run twice would corrupt the KV cache, so a repeat
// of the last step returns its outputs (repeat) instead.
func (st *stage) session(key sessionKey, runner shards.Runner, step int) (_ *hopSession, repeat shards.Tensors, _ protocol.ErrorCode, _ error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	hs, ok := st.sessions[key]
	if !ok {
		if step != 0 {
			return nil, nil, protocol.CodeUnknownSession, fmt.Errorf("session %s: step %d but no state here", key.session, step)
		}
		if len(st.sessions) >= st.cfg.MaxSessions {
			st.expireLocked(time.Now())
			if len(st.sessions) >= st.cfg.MaxSessions {
				return nil, nil, protocol.CodeBusy, fmt.Errorf("%d sessions open", len(st.sessions))
			}
		}
		hs = &hopSession{sess: runner.NewSession()}
		st.sessions[key] = hs
	}
	if hs.busy {
		return nil, nil, protocol.CodeBadRequest, fmt.Errorf("session %s: step %d while another step runs", key.session, step)
	}
	hs.lastUsed = time.Now()
	if step == hs.next-1 && hs.lastOut != nil {
		return hs, hs.lastOut, "", nil
	}
	if step == 0 && hs.next > 0 {
		// The requester is replaying the session from its start here (this
		// peer was picked again to rebuild a span): start the state afresh.
		hs.sess.Close()
		hs.sess, hs.next, hs.lastOut = runner.NewSession(), 0, nil
	}
	if step != hs.next {
		return nil, nil, protocol.CodeBadRequest, fmt.Errorf("session %s: step %d, expected %d", key.session, step, hs.next)
	}
	hs.busy = true
	return hs, nil, "", nil
}

func (st *stage) closeSession(from peer.ID, msg *protocol.Message) {
	h := &msg.Header
	if from.String() != h.Requester {
		return // only the requester ends its sessions and cancels its requests
	}
	st.mu.Lock()
	if h.ID != 0 {
		// A cancelled request: remembered for a while so that a hop that
		// has yet to run it drops it.
		if len(st.cancelled) >= maxCancelled {
			clear(st.cancelled)
		}
		st.cancelled[cancelKey{h.Requester, h.ID}] = true
		if h.Session == "" {
			st.mu.Unlock()
			return
		}
	}
	for k, hs := range st.sessions {
		if k.requester == h.Requester && k.session == h.Session && !hs.busy {
			hs.sess.Close()
			delete(st.sessions, k)
		}
	}
	st.mu.Unlock()
}

// expireLocked closes sessions idle past SessionIdle.
func (st *stage) expireLocked(now time.Time) {
	for k, hs := range st.sessions {
		if !hs.busy && now.Sub(hs.lastUsed) > st.cfg.SessionIdle {
			hs.sess.Close()
			delete(st.sessions, k)
		}
	}
}

func (st *stage) expiryLoop() {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-st.m.ctx.Done():
			return
		case now := <-t.C:
			st.mu.Lock()
			st.expireLocked(now)
			st.mu.Unlock()
		}
	}
}

// fail reports an error at hop h.Hop to the requester.
func (st *stage) fail(requester peer.ID, h *protocol.Header, code protocol.ErrorCode, msg string) {
	e := &protocol.Message{Kind: protocol.KindError, Header: protocol.Header{ID: h.ID, Requester: h.Requester, Model: h.Model,
		Session: h.Session, Step: h.Step, Hop: h.Hop, Code: code, Message: msg}}
	if h.Hop >= 0 && h.Hop < len(h.Route) {
		e.Header.Route = []protocol.Hop{h.Route[h.Hop]} // names the failed hop
	}
	ctx, cancel := context.WithTimeout(st.m.ctx, 5*time.Second)
	defer cancel()
	if requester == st.m.host.ID() {
		st.deliver(requester, e)
		return
	}
	if err := st.send(ctx, requester, e); err != nil {
		st.m.log.Debug("error not delivered", "requester", requester, "err", err)
	}
}

func (st *stage) closeAll() {
	st.mu.Lock()
	defer st.mu.Unlock()
	for k, hs := range st.sessions {
		hs.sess.Close()
		delete(st.sessions, k)
	}
	for p, l := range st.links {
		l.s.Reset()
		delete(st.links, p)
	}
}

// blameError names another hop than the one reporting as the cause.
type blameError struct {
	hop int
	err error
}

func (e *blameError) Error() string { return e.err.Error() }

// peerGone fails at once the pending requests whose route holds a peer we
// just lost, at its first hop that has not reported, instead of waiting
// for their timeout.
func (st *stage) peerGone(p peer.ID) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for id, c := range st.pending {
		for h, hop := range c.route {
			if hop.Peer != p.String() {
				continue
			}
			msg := &protocol.Message{Kind: protocol.KindError, Header: protocol.Header{ID: id, Hop: h,
				Code: protocol.CodeUnreachable, Message: "disconnected"}}
			select {
			case c.ch <- msg:
			default:
			}
			break
		}
	}
}

// learnAddrs makes sure the peerstore has addresses for p before a dial: a
// hop asked to forward to a peer it never met finds them in its view's
// capacity records, or else through the DHT.
func (m *Mesh) learnAddrs(ctx context.Context, p peer.ID) {
	if len(m.host.Peerstore().Addrs(p)) > 0 || m.host.Network().Connectedness(p) == network.Connected {
		return
	}
	if addrs := m.view.addrs(p); len(addrs) > 0 {
		m.host.Peerstore().AddAddrs(p, addrs, 10*time.Minute)
		return
	}
	if ai, err := m.dht.FindPeer(ctx, p); err == nil {
		m.host.Peerstore().AddAddrs(p, ai.Addrs, 10*time.Minute)
	}
}
