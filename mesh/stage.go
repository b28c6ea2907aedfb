package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
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

// ContextLimiter, when a SpanProvider implements it, gives the most
// positions a model's steps may cover (its context window; 0: no bound).
// A request whose symbolic dimensions (sequence, positions covered,
// batch) exceed it is refused from its header: a step's cost grows with
// the square of the positions it covers, and a frame small enough to
// pass every byte limit could otherwise ask a hop for hours of compute.
type ContextLimiter interface {
	MaxContext(model string) int
}

// ErrNotServed is returned by a SpanProvider for blocks it does not serve.
var ErrNotServed = errors.New("blocks not served here")

// StageConfig bounds what a node's stage server accepts. Zero values take
// the defaults named on each field.
type StageConfig struct {
	// MaxInFlight is how many steps may compute at once (default: the
	// CPUs Go may use, at least 2: more steps at once only share the same
	// cores). Steps past it wait their turn, fairly among sending peers.
	MaxInFlight int
	// MaxWaiting bounds the steps waiting for a compute slot (default 4 x
	// MaxInFlight); one more gets an immediate busy.
	MaxWaiting int
	// MaxSessions bounds open sessions (default 256), each holding its
	// blocks' KV cache; one more gets busy.
	MaxSessions int
	// SessionIdle closes a session unused this long (default 2 min).
	SessionIdle time.Duration
	// MaxFrameBytes bounds one stage frame this node accepts (default 256
	// MiB, at most protocol.MaxFrameBytes). Memory for a frame grows only
	// as its bytes arrive, and a request's tensors must also fit the
	// inputs of the span it asks for before any of its body is read.
	MaxFrameBytes int
	// MaxHeldBytes bounds the memory of the request frames this node holds
	// at once, arriving, waiting or computing, all peers together (default
	// 256 MiB, at least MaxFrameBytes/2). One peer may hold at most half of
	// it, so a peer sending large frames at full speed cannot fill it
	// alone; frames of at most smallFrameBytes (decode steps) count only
	// against their peer's half, so large frames never shut them out; and
	// a frame over the half is taken when the node holds no other, so a
	// long prompt still runs on a quiet node. A frame past these bounds is
	// answered busy from its header, its body dropped unkept.
	MaxHeldBytes int64
	// MaxInFlightPerPeer bounds the steps one sending peer may have
	// computing or waiting at once (default three quarters of MaxInFlight
	// + MaxWaiting, at least 1), so that others always find room; one
	// more gets busy.
	MaxInFlightPerPeer int
	// MaxSessionsPerPeer bounds the sessions one sending peer may hold
	// open here (default max(8, MaxSessions/4)); one more gets busy.
	MaxSessionsPerPeer int
	// MaxStreamsPerPeer bounds the stage streams one peer may have open to
	// this node at once (default 8; an honest peer uses one); one more is
	// reset at once.
	MaxStreamsPerPeer int
	// StreamIdle closes a stage stream on which no frame came (and, for a
	// stream this node opened, none was sent) for this long (default
	// protocol.StageStreamIdle). A node opens a new stream rather than
	// write on one unused for half of it.
	StreamIdle time.Duration
	// FrameTimeout resets a stage stream whose frame, once begun, delivers
	// no byte for this long (default protocol.StageFrameTimeout).
	FrameTimeout time.Duration
}

func (c *StageConfig) defaults() {
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = max(2, runtime.GOMAXPROCS(0))
	}
	if c.MaxWaiting <= 0 {
		c.MaxWaiting = 4 * c.MaxInFlight
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
	if c.MaxInFlightPerPeer <= 0 {
		all := c.MaxInFlight + c.MaxWaiting
		c.MaxInFlightPerPeer = max(1, all-all/4)
	}
	if c.MaxSessionsPerPeer <= 0 {
		c.MaxSessionsPerPeer = max(8, c.MaxSessions/4)
	}
	if c.MaxStreamsPerPeer <= 0 {
		c.MaxStreamsPerPeer = 8
	}
	if c.MaxHeldBytes <= 0 {
		c.MaxHeldBytes = max(256<<20, int64(c.MaxFrameBytes)/2)
	}
	if c.StreamIdle <= 0 {
		c.StreamIdle = protocol.StageStreamIdle
	}
	if c.FrameTimeout <= 0 {
		c.FrameTimeout = protocol.StageFrameTimeout
	}
}

// stage is the serving side of the stage protocol, and the delivery of
// progress, results and errors to this node's own requests.
type stage struct {
	m        *Mesh
	cfg      StageConfig
	provider SpanProvider

	mu sync.Mutex
	// compute hands out compute slots; Serve replaces it, and a step
	// gives its slot back to the queue it took it from.
	compute  *fairQueue
	stats    StageStats
	sessions map[sessionKey]*hopSession
	// per sending peer: sessions held, inbound streams open, request frame
	// bytes held (see StageConfig.MaxHeldBytes; held is all peers')
	peerSessions map[peer.ID]int
	peerHeld     map[peer.ID]int64
	held         int64
	peerStreams  map[peer.ID]int
	links        map[peer.ID]*link
	pending      map[uint64]*call // this node's requests awaiting answers
	// requests their requesters cancelled, not to be run or forwarded
	cancelled map[cancelKey]bool
	// warm: the hops (peer, model, span, next peer) that answered one of
	// this node's requests: they have the span loaded and a link to the
	// next hop, so they get the normal progress deadline, not the cold one.
	warm map[warmKey]bool
}

type warmKey struct {
	peer, model string
	start, end  int
	next        string // the next hop's peer; "" for the last hop
}

// maxWarm bounds the warm hops remembered.
const maxWarm = 4096

func hopKey(model string, route []protocol.Hop, h int) warmKey {
	k := warmKey{peer: route[h].Peer, model: model, start: route[h].Start, end: route[h].End}
	if h+1 < len(route) {
		k.next = route[h+1].Peer
	}
	return k
}

// isWarm reports whether hop h of route answered one of this node's
// requests before, with the same span and next hop.
func (st *stage) isWarm(model string, route []protocol.Hop, h int) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.warm[hopKey(model, route, h)]
}

func (st *stage) markWarm(model string, route []protocol.Hop, h int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.warm == nil || len(st.warm) >= maxWarm {
		st.warm = map[warmKey]bool{}
	}
	st.warm[hopKey(model, route, h)] = true
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

// sessionKeyOf is the key of the session a request's header names at its
// hop (h.Hop, already checked against h.Route).
func sessionKeyOf(requester peer.ID, h *protocol.Header) sessionKey {
	hop := h.Route[h.Hop]
	return sessionKey{requester: requester.String(), session: h.Session, model: h.Model, start: hop.Start, end: hop.End}
}

type hopSession struct {
	sess shards.Session
	// owner is the peer that opened it (the requester at the first hop,
	// the previous hop after): its quota holds the session.
	owner    peer.ID
	dropped  bool // removed while a step ran: that step closes it
	next     int  // the step it expects
	lastUsed time.Time
	busy     bool
	// waiting is set while the session's next step waits for a compute
	// slot (holdStep): one step per session waits past MaxWaiting.
	waiting bool
	// ran is closed when the running step (busy) ends.
	ran chan struct{}
	// beat sends a decode ring's heartbeat for the last step done here
	// unless the next step comes first (see deferBeat).
	beat *time.Timer
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
	// lastWrite is when a frame was last written (or the link opened);
	// guarded by the stage's mu.
	lastWrite time.Time
}

// linkDialTimeout bounds opening a stage stream to a peer: a peer that
// cannot be reached this fast is treated as failed and routed around (a
// live peer on a reachable address answers in milliseconds to a round
// trip or two).
const linkDialTimeout = 2 * time.Second

func newStage(m *Mesh) *stage {
	st := &stage{m: m, sessions: map[sessionKey]*hopSession{}, links: map[peer.ID]*link{}, pending: map[uint64]*call{},
		cancelled: map[cancelKey]bool{}, peerSessions: map[peer.ID]int{}, peerStreams: map[peer.ID]int{},
		peerHeld: map[peer.ID]int64{}}
	st.cfg.defaults()
	st.compute = newFairQueue(st.cfg.MaxInFlight, st.cfg.MaxWaiting, st.cfg.MaxInFlightPerPeer)
	m.host.SetStreamHandler(protocol.StageProtocol, m.unlessClosing(st.handleStream))
	return st
}

// Serve makes this node answer stage requests for the spans p provides.
func (m *Mesh) Serve(p SpanProvider, cfg StageConfig) {
	cfg.defaults()
	m.stage.mu.Lock()
	m.stage.provider, m.stage.cfg = p, cfg
	m.stage.compute = newFairQueue(cfg.MaxInFlight, cfg.MaxWaiting, cfg.MaxInFlightPerPeer)
	m.stage.mu.Unlock()
}

// Load is the stage server's current load, for the capacity record.
func (m *Mesh) Load() protocol.Load {
	m.stage.mu.Lock()
	q := m.stage.compute
	m.stage.mu.Unlock()
	running, waiting, _ := q.load()
	return protocol.Load{InFlight: running, Queued: waiting}
}

// handleStream reads frames on a stage stream a peer opened.
func (st *stage) handleStream(s network.Stream) { st.readLoop(s, nil) }

// readLoop reads frames until the stream ends, idles past StreamIdle or
// stalls inside a frame past FrameTimeout; each request is handled on its
// own goroutine so that one slow step does not hold up the others. l is
// the link when this node opened the stream (its writes keep it alive),
// nil for a stream a peer opened (at most MaxStreamsPerPeer of those per
// peer).
func (st *stage) readLoop(s network.Stream, l *link) {
	from := s.Conn().RemotePeer()
	st.mu.Lock()
	cfg := st.cfg
	if l == nil {
		if st.peerStreams[from] >= cfg.MaxStreamsPerPeer {
			st.stats.StreamsRefused++
			st.mu.Unlock()
			st.m.log.Debug("stage stream refused: too many from this peer", "peer", from)
			s.Reset()
			return
		}
		st.peerStreams[from]++
	}
	st.mu.Unlock()
	defer func() {
		st.mu.Lock()
		if l == nil {
			if st.peerStreams[from]--; st.peerStreams[from] <= 0 {
				delete(st.peerStreams, from)
			}
		} else if st.links[from] == l {
			delete(st.links, from) // the next frame to this peer opens a new link
		}
		st.mu.Unlock()
	}()
	r := &deadlineReader{s: s, idle: cfg.StreamIdle, progress: cfg.FrameTimeout}
	if l != nil {
		r.lastWrite = func() time.Time {
			st.mu.Lock()
			defer st.mu.Unlock()
			return l.lastWrite
		}
	}
	var holding int64 // the memory held for the request frame being read
	opts := protocol.ReadOptions{MaxBytes: cfg.MaxFrameBytes, Check: func(k protocol.Kind, h *protocol.Header) error {
		if err := st.check(from, k, h); err != nil || k != protocol.KindRequest {
			return err
		}
		n := frameMemory(h)
		if err := st.hold(from, n); err != nil {
			return err
		}
		holding = n
		return nil
	}}
	for {
		r.frameBoundary()
		holding = 0
		msg, err := protocol.ReadMessageWith(r, opts)
		if err != nil && holding > 0 {
			st.unhold(from, holding)
		}
		if errors.Is(err, protocol.ErrRefused) {
			if msg.Kind == protocol.KindRequest {
				st.m.spawn(func() { st.handleRequest(from, msg, err) })
			}
			continue
		}
		if err != nil {
			switch {
			case errors.Is(err, io.EOF) || st.m.ctx.Err() != nil:
				s.Close()
			case r.idled:
				st.m.log.Debug("stage stream idle: closed", "peer", from)
				st.countTimeout()
				s.Close()
			default:
				if r.stalled {
					st.countTimeout()
				}
				st.m.log.Debug("stage stream ended", "peer", from, "err", err)
				s.Reset()
			}
			return
		}
		if st.m.ctx.Err() != nil {
			st.unhold(from, holding)
			s.Reset()
			return
		}
		if held := holding; held > 0 {
			if !st.m.spawn(func() {
				defer st.unhold(from, held)
				st.handleRequest(from, msg, nil)
			}) {
				st.unhold(from, held)
			}
			continue
		}
		st.dispatch(from, msg)
	}
}

// smallFrameBytes is the largest request frame counted only against its
// peer's share of MaxHeldBytes: a decode step's activations are far less.
const smallFrameBytes = 1 << 20

// frameMemory is what a request frame's tensors take in memory once read
// (float16 on the wire is held as float32).
func frameMemory(h *protocol.Header) int64 {
	var n int64
	for _, t := range h.Tensors {
		n += protocol.NumElements(t.Shape) * int64(t.DType.Size())
	}
	return n
}

// hold takes n bytes of the held-frames budget for a request frame from
// a peer, or refuses it busy (see StageConfig.MaxHeldBytes).
func (st *stage) hold(from peer.ID, n int64) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	limit := st.cfg.MaxHeldBytes
	share, mine := limit/2, st.peerHeld[from]
	quiet := st.held == 0
	switch {
	case n <= smallFrameBytes && mine+n <= share:
	case n > smallFrameBytes && mine+n <= share && st.held+n <= limit:
	case quiet:
	default:
		return &refusal{code: protocol.CodeBusy, err: fmt.Errorf("no room for a %d MiB frame: request frames held %d MiB of %d, from this peer %d MiB of %d",
			(n+(1<<20)-1)>>20, st.held>>20, limit>>20, mine>>20, share>>20)}
	}
	st.held += n
	st.peerHeld[from] = mine + n
	st.stats.PeakHeldBytes = max(st.stats.PeakHeldBytes, st.held)
	return nil
}

func (st *stage) unhold(from peer.ID, n int64) {
	if n <= 0 {
		return
	}
	st.mu.Lock()
	st.held -= n
	if st.peerHeld[from] -= n; st.peerHeld[from] <= 0 {
		delete(st.peerHeld, from)
	}
	st.mu.Unlock()
}

func (st *stage) countTimeout() {
	st.mu.Lock()
	st.stats.StreamsTimedOut++
	st.mu.Unlock()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// deadlineReader sets a stream's read deadline before each read: between
// frames the stream may idle for idle (counted from the last frame read,
// or the last frame written when lastWrite is set), inside a frame each
// read must bring bytes within progress.
type deadlineReader struct {
	s              network.Stream
	idle, progress time.Duration
	lastWrite      func() time.Time // nil: reads alone keep the stream alive
	boundary       bool             // no byte of the next frame read yet
	waitFrom       time.Time        // when the wait for the next frame began
	idled          bool             // the stream timed out between frames
	stalled        bool             // a frame brought no byte for progress
}

func (r *deadlineReader) frameBoundary() { r.boundary, r.waitFrom = true, time.Now() }

func (r *deadlineReader) Read(p []byte) (int, error) {
	if !r.boundary {
		r.s.SetReadDeadline(time.Now().Add(r.progress))
		n, err := r.s.Read(p)
		if err != nil && isTimeout(err) {
			r.stalled = true
		}
		return n, err
	}
	for {
		alive := r.waitFrom
		if r.lastWrite != nil {
			if w := r.lastWrite(); w.After(alive) {
				alive = w
			}
		}
		r.s.SetReadDeadline(alive.Add(r.idle))
		n, err := r.s.Read(p)
		if n > 0 {
			r.boundary = false
			return n, err
		}
		if err != nil && isTimeout(err) {
			// Nothing of a frame was read, so waiting again loses nothing:
			// do, if this node wrote on the stream meanwhile.
			if r.lastWrite != nil && time.Since(r.lastWrite()) < r.idle {
				continue
			}
			r.idled = true
		}
		if err != nil {
			return n, err
		}
	}
}

// check sees a frame's header before its body is read, and refuses (the
// body is then read and dropped, never kept) what this node would not use:
// a request whose tensors do not fit the inputs of the span it asks for
// (so the model's manifest, not only the protocol's limits, bounds what a
// request may make this node receive), an answer to no request of ours,
// or a close that carries tensors.
func (st *stage) check(from peer.ID, k protocol.Kind, h *protocol.Header) error {
	switch k {
	case protocol.KindRequest:
		if h.Hop < 0 || h.Hop >= len(h.Route) || h.Route[h.Hop].Peer != st.m.host.ID().String() {
			return &refusal{err: errors.New("request not for this node")}
		}
		st.mu.Lock()
		provider := st.provider
		st.mu.Unlock()
		if provider == nil {
			return &refusal{code: protocol.CodeUnknownBlock, err: errors.New("this node serves nothing")}
		}
		hop := h.Route[h.Hop]
		runner, err := provider.Runner(h.Model, hop.Start, hop.End)
		if err != nil {
			return &refusal{code: protocol.CodeUnknownBlock, err: err}
		}
		if err := fitsInputs(runner.Inputs(), h.Tensors); err != nil {
			return &refusal{code: protocol.CodeBadRequest, err: err}
		}
		if h.Ring != nil {
			if err := checkRing(h); err != nil {
				return &refusal{code: protocol.CodeBadRequest, err: err}
			}
		}
		if cl, ok := provider.(ContextLimiter); ok {
			if err := withinContext(runner.Inputs(), h.Tensors, cl.MaxContext(h.Model)); err != nil {
				return &refusal{code: protocol.CodeBadRequest, err: err}
			}
		}
		return nil
	case protocol.KindClose:
		if len(h.Tensors) > 0 {
			return &refusal{err: errors.New("close with tensors")}
		}
		return nil
	default:
		st.mu.Lock()
		c, ok := st.pending[h.ID]
		st.mu.Unlock()
		if len(h.Tensors) > 0 && (!ok || h.Hop < 0 || h.Hop >= len(c.route) || c.route[h.Hop].Peer != from.String()) {
			return &refusal{err: errors.New("tensors answering no request of ours")}
		}
		return nil
	}
}

// refusal is why check refused a frame; code, if set, is answered to a
// request's requester.
type refusal struct {
	code protocol.ErrorCode
	err  error
}

func (r *refusal) Error() string { return r.err.Error() }

// withinContext checks that no symbolic dimension of a request's declared
// tensors exceeds limit (0: no bound); fitsInputs has matched them to
// specs.
func withinContext(specs []shards.TensorSpec, metas []protocol.TensorMeta, limit int) error {
	if limit <= 0 {
		return nil
	}
	byName := make(map[string]shards.TensorSpec, len(specs))
	for _, s := range specs {
		byName[s.Name] = s
	}
	for _, m := range metas {
		for i, d := range byName[m.Name].Shape {
			if d.Param != "" && i < len(m.Shape) && m.Shape[i] > int64(limit) {
				return fmt.Errorf("tensor %q has %s = %d, past the model's context of %d positions", m.Name, d.Param, m.Shape[i], limit)
			}
		}
	}
	return nil
}

// fitsInputs checks a request's declared tensors against a span's inputs,
// as shards.CheckInputs does the tensors themselves: each input present
// once with its type, rank and fixed dimensions, symbolic dimensions of one
// name equal across them, and nothing else.
func fitsInputs(specs []shards.TensorSpec, metas []protocol.TensorMeta) error {
	byName := make(map[string]protocol.TensorMeta, len(metas))
	for _, m := range metas {
		if _, dup := byName[m.Name]; dup {
			return fmt.Errorf("tensor %q sent twice", m.Name)
		}
		byName[m.Name] = m
	}
	if len(byName) > len(specs) {
		return fmt.Errorf("%d tensors sent, the span takes %d", len(byName), len(specs))
	}
	bound := map[string]int64{}
	for _, spec := range specs {
		m, ok := byName[spec.Name]
		if !ok {
			return fmt.Errorf("missing tensor %q", spec.Name)
		}
		if m.DType != spec.DType || len(m.Shape) != len(spec.Shape) {
			return fmt.Errorf("tensor %q is %v%v, want %v of rank %d", spec.Name, m.DType, m.Shape, spec.DType, len(spec.Shape))
		}
		for i, d := range spec.Shape {
			switch {
			case d.Param == "":
				if m.Shape[i] != d.Size {
					return fmt.Errorf("tensor %q has dimension %d = %d, want %d", spec.Name, i, m.Shape[i], d.Size)
				}
			case d.Param != "?":
				if b, ok := bound[d.Param]; ok && b != m.Shape[i] {
					return fmt.Errorf("tensor %q has %s = %d, another input %d", spec.Name, d.Param, m.Shape[i], b)
				}
				bound[d.Param] = m.Shape[i]
			}
		}
	}
	return nil
}

// dispatch acts on a frame from a peer (or from this node itself): a
// request runs, a close ends its session, anything else answers one of our
// own requests.
func (st *stage) dispatch(from peer.ID, msg *protocol.Message) {
	switch msg.Kind {
	case protocol.KindRequest:
		st.m.spawn(func() { st.handleRequest(from, msg, nil) })
	case protocol.KindClose:
		st.closeSession(from, msg)
	default:
		st.deliver(from, msg)
	}
}

// send writes a frame to a peer over the link to it, opening one if
// needed; a broken link is replaced once.
func (st *stage) send(ctx context.Context, to peer.ID, msg *protocol.Message) error {
	if (msg.Kind == protocol.KindProgress || msg.Kind == protocol.KindResult) && msg.Header.Load == nil {
		// Every answer tells the requester how loaded this hop is now.
		l := st.m.Load()
		st.mu.Lock()
		free := max(st.cfg.MaxSessions-len(st.sessions), 0)
		st.mu.Unlock()
		c := *msg
		c.Header.Load = &protocol.HopLoad{InFlight: l.InFlight, Queued: l.Queued, FreeSessions: &free}
		msg = &c
	}
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
		st.mu.Lock()
		l.lastWrite = time.Now()
		st.mu.Unlock()
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
	if ok && time.Since(l.lastWrite) > st.cfg.StreamIdle/2 {
		// The peer may close a stream idle for StreamIdle; a frame must
		// never race that, so an idle link is closed and replaced.
		delete(st.links, to)
		old := l
		st.m.spawn(func() { old.mu.Lock(); old.s.Close(); old.mu.Unlock() })
		ok = false
	}
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
	st.mu.Lock()
	defer st.mu.Unlock()
	if old, ok := st.links[to]; ok { // lost a race: keep the first
		s.Close()
		return old, nil
	}
	l = &link{s: s, lastWrite: time.Now()}
	st.links[to] = l
	// Frames also flow back on a stream we opened (a peer answers on any
	// link), so read it too.
	if !st.m.spawn(func() { st.readLoop(s, l) }) {
		s.Reset() // shutting down
	}
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
// refused, if set, is why check refused the request's tensors (the
// message then has none): it is answered once the request is known to be
// for this node and from a peer allowed to send it.
func (st *stage) handleRequest(from peer.ID, msg *protocol.Message, refused error) {
	h := &msg.Header
	self := st.m.host.ID().String()
	requester, err := peer.Decode(h.Requester)
	if err != nil || h.Hop < 0 || h.Hop >= len(h.Route) || h.Route[h.Hop].Peer != self {
		st.m.log.Debug("dropped a stage request not for us", "from", from, "hop", h.Hop)
		return
	}
	// Only the requester (for the first hop) or the previous hop may send
	// a hop its inputs.
	// In a decode ring, the first hop's later steps come from the last hop.
	ringFeed := h.Ring != nil && h.Step > 0 && h.Route[len(h.Route)-1].Peer == from.String()
	if (h.Hop == 0 && from != requester && !ringFeed) || (h.Hop > 0 && h.Route[h.Hop-1].Peer != from.String()) {
		st.fail(requester, h, protocol.CodeBadRequest, "request from a peer that is not the previous hop")
		return
	}
	if refused != nil {
		var r *refusal
		if !errors.As(refused, &r) || r.code == "" {
			return
		}
		if r.code == protocol.CodeBadRequest && h.Hop > 0 {
			// As in compute: malformed activations blame the previous hop.
			blamed := *h
			blamed.Hop = h.Hop - 1
			st.fail(requester, &blamed, protocol.CodeBadOutput, "sent malformed activations: "+r.err.Error())
			return
		}
		st.fail(requester, h, r.code, r.err.Error())
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
		st.m.log.Debug("stage request cancelled before it ran", "id", h.ID, "step", h.Step, "hop", h.Hop)
		return
	}
	st.mu.Lock()
	q := st.compute
	st.mu.Unlock()
	held := st.holdStep(requester, h)
	why, err := q.acquire(ctx, from, held != nil)
	st.unholdStep(held)
	if why != "" {
		st.fail(requester, h, protocol.CodeBusy, why)
		return
	}
	if err != nil {
		if st.m.ctx.Err() == nil && !st.isCancelled(h) {
			st.fail(requester, h, protocol.CodeDeadline, "deadline passed waiting for a compute slot")
		}
		return
	}
	st.countStep()
	start := time.Now()
	out, code, err := st.run(from, requester, msg)
	q.release(from, time.Since(start).Microseconds())
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
		st.m.log.Debug("stage request cancelled while it ran", "id", h.ID, "step", h.Step, "hop", h.Hop)
		return
	}
	next := &protocol.Message{Kind: protocol.KindRequest, Header: *h, Tensors: out}
	next.Header.Tensors = nil
	next.Header.Micros = micros
	if h.Hop == len(h.Route)-1 && h.Ring != nil {
		st.ringTurn(ctx, requester, h, out, micros)
		return
	}
	if h.Hop == len(h.Route)-1 {
		next.Kind = protocol.KindResult
		if err := st.send(ctx, requester, next); err != nil {
			st.m.log.Debug("result not delivered", "requester", requester, "err", err)
		}
		return
	}
	next.Header.Hop = h.Hop + 1
	if h.Ring != nil {
		next.Header.Ring = h.Ring.WithHop(micros)
	}
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
	if h.Session != "" && h.Ring == nil {
		progress.Tensors = out
	}
	if h.Ring != nil && h.Step > 0 {
		// A ring's requester replays tokens, not activations, after a
		// failover, and sees the ring live from its tokens: progress is
		// only a heartbeat, sent when the next step is late (ringBeat).
		st.deferBeat(requester, h, progress)
		return
	}
	if err := st.send(ctx, requester, progress); err != nil {
		st.m.log.Debug("progress not delivered", "requester", requester, "err", err)
	}
}

// holdStep reports, as the session to release with unholdStep, whether
// h is the next step of a session this hop holds, idle now, with no other
// step of it waiting (nil if not). Such a step waits for a compute slot
// however many wait: sessions are admitted against MaxSessions (and per
// peer), each has at most one such step waiting, and refusing it busy
// would only make its generation pause and send it again, the work the
// same and the session's KV cache held meanwhile. Under load the waiting
// bound then refuses what adds work: new sessions and single passes, which
// routing sends elsewhere.
func (st *stage) holdStep(requester peer.ID, h *protocol.Header) *hopSession {
	if h.Session == "" || h.Step == 0 {
		return nil
	}
	key := sessionKeyOf(requester, h)
	st.mu.Lock()
	defer st.mu.Unlock()
	hs := st.sessions[key]
	if hs == nil || hs.busy || hs.waiting || hs.dropped || h.Step != hs.next {
		return nil
	}
	hs.waiting = true
	return hs
}

func (st *stage) unholdStep(hs *hopSession) {
	if hs == nil {
		return
	}
	st.mu.Lock()
	hs.waiting = false
	st.mu.Unlock()
}

func (st *stage) countStep() {
	st.mu.Lock()
	st.stats.Steps++
	st.mu.Unlock()
}

// StageStats count what a node's stage server did.
type StageStats struct {
	Steps           uint64 // steps admitted
	Busy            uint64 // requests answered busy (compute slots or sessions full, overall or for the peer)
	StreamsRefused  uint64 // inbound stage streams reset at once: the peer had MaxStreamsPerPeer open
	StreamsTimedOut uint64 // stage streams closed idle or reset for a stalled frame
	Evicted         uint64 // sessions dropped from a full table for a peer under its fair share
	PeakInFlight    int    // most steps computing at once
	InFlight        int    // steps computing now
	Waiting         int    // steps waiting for a compute slot now
	HeldBytes       int64  // memory of the request frames held now
	PeakHeldBytes   int64  // the most ever held at once
	Sessions        int    // sessions open now
}

// StageStats reports the stage server's counters.
func (m *Mesh) StageStats() StageStats {
	m.stage.mu.Lock()
	defer m.stage.mu.Unlock()
	s := m.stage.stats
	s.InFlight, s.Waiting, s.PeakInFlight = m.stage.compute.load()
	s.Sessions, s.HeldBytes = len(m.stage.sessions), m.stage.held
	return s
}

// run runs the hop's span on the message's tensors, in the request's
// session when it has one.
func (st *stage) run(from, requester peer.ID, msg *protocol.Message) ([]protocol.NamedTensor, protocol.ErrorCode, error) {
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
		hs, repeat, code, serr := st.session(sessionKeyOf(requester, h), from, runner, h.Step)
		if serr != nil {
			return nil, code, serr
		}
		if repeat != nil {
			out = repeat
		} else {
			out, err = hs.sess.Step(inputs)
			st.mu.Lock()
			hs.busy = false
			close(hs.ran)
			if hs.dropped {
				hs.sess.Close() // removed while it ran
			}
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
func (st *stage) session(key sessionKey, from peer.ID, runner shards.Runner, step int) (_ *hopSession, repeat shards.Tensors, _ protocol.ErrorCode, _ error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	hs, ok := st.sessions[key]
	if !ok {
		if step != 0 {
			return nil, nil, protocol.CodeUnknownSession, fmt.Errorf("session %s: step %d but no state here", key.session, step)
		}
		if len(st.sessions) >= st.cfg.MaxSessions || st.peerSessions[from] >= st.cfg.MaxSessionsPerPeer {
			st.expireLocked(time.Now())
		}
		if len(st.sessions) >= st.cfg.MaxSessions && !st.evictForLocked(from) {
			return nil, nil, protocol.CodeBusy, fmt.Errorf("%d sessions open", len(st.sessions))
		}
		if n := st.peerSessions[from]; n >= st.cfg.MaxSessionsPerPeer {
			return nil, nil, protocol.CodeBusy, fmt.Errorf("%d sessions open from this peer", n)
		}
		hs = &hopSession{sess: runner.NewSession(), owner: from}
		st.sessions[key] = hs
		st.peerSessions[from]++
	}
	for hs.busy {
		if step != hs.next {
			return nil, nil, protocol.CodeBadRequest, fmt.Errorf("session %s: step %d while another step runs", key.session, step)
		}
		// The step now running, sent again: a requester that gave up
		// waiting on this hop (a progress deadline) and let it back in.
		// It gets that step's outputs once they exist, not a refusal.
		ran := hs.ran
		st.mu.Unlock()
		<-ran
		st.mu.Lock()
		if hs.dropped || st.sessions[key] != hs {
			return nil, nil, protocol.CodeUnknownSession, fmt.Errorf("session %s: dropped while step %d ran", key.session, step)
		}
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
	hs.busy, hs.ran = true, make(chan struct{})
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
		if k.requester == h.Requester && k.session == h.Session {
			st.removeLocked(k, hs) // a step running now closes it when done
		}
	}
	st.mu.Unlock()
}

// evictForLocked makes room in a full session table for a peer holding
// less than its fair share (the table divided among the peers holding
// sessions, this one included): it drops the least recently used idle
// session of the peer holding the most, when that is over the fair
// share. The per-peer quota alone bounds one identity, not many: peers
// that each stay under it could together fill the table and shut everyone
// else out. It reports whether a session was dropped.
func (st *stage) evictForLocked(from peer.ID) bool {
	owners := len(st.peerSessions)
	if st.peerSessions[from] == 0 {
		owners++
	}
	share := st.cfg.MaxSessions / owners
	if st.peerSessions[from] >= share {
		return false
	}
	var most peer.ID
	for p, n := range st.peerSessions {
		if n > st.peerSessions[most] {
			most = p
		}
	}
	if st.peerSessions[most] <= share {
		return false
	}
	var victim *hopSession
	var victimKey sessionKey
	for k, hs := range st.sessions {
		if hs.owner == most && !hs.busy && (victim == nil || hs.lastUsed.Before(victim.lastUsed)) {
			victim, victimKey = hs, k
		}
	}
	if victim == nil {
		return false
	}
	st.removeLocked(victimKey, victim)
	st.stats.Evicted++
	return true
}

// removeLocked drops a session and frees its owner's quota; a session
// whose step is running is closed when the step ends.
func (st *stage) removeLocked(k sessionKey, hs *hopSession) {
	delete(st.sessions, k)
	if hs.beat != nil {
		hs.beat.Stop()
	}
	if st.peerSessions[hs.owner]--; st.peerSessions[hs.owner] <= 0 {
		delete(st.peerSessions, hs.owner)
	}
	if hs.busy {
		hs.dropped = true
		return
	}
	hs.sess.Close()
}

// expireLocked closes sessions idle past SessionIdle.
func (st *stage) expireLocked(now time.Time) {
	for k, hs := range st.sessions {
		if !hs.busy && now.Sub(hs.lastUsed) > st.cfg.SessionIdle {
			st.removeLocked(k, hs)
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
	if code == protocol.CodeBusy {
		st.mu.Lock()
		st.stats.Busy++
		st.mu.Unlock()
	}
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
		st.removeLocked(k, hs)
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
	st.dropSessionsOf(p)
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

// dropSessionsOf frees at once the sessions of a peer that disconnected:
// those it requested, and those it opened (as the previous hop) for a
// requester this node is not connected to either. A session whose
// requester is still here survives its previous hop: the requester may be
// failing that hop over and go on with this one's state.
func (st *stage) dropSessionsOf(p peer.ID) {
	st.mu.Lock()
	requesters := map[string]bool{}
	for k, hs := range st.sessions {
		if hs.owner == p && k.requester != p.String() {
			requesters[k.requester] = false
		}
	}
	st.mu.Unlock()
	for r := range requesters {
		id, err := peer.Decode(r)
		requesters[r] = err == nil && st.m.host.Network().Connectedness(id) == network.Connected
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	for k, hs := range st.sessions {
		if k.requester == p.String() || (hs.owner == p && !requesters[k.requester]) {
			st.removeLocked(k, hs)
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
