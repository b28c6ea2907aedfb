package mesh

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// DecoderProvider, when a SpanProvider implements it, gives the decoder
// spec of a model the node serves (nil when it has none): the last hop of a
// decode ring needs it to read the logits and build the next step's
// inputs.
type DecoderProvider interface {
	Decoder(model string) *shards.DecoderSpec
}

// ringBeat is how long a hop of a decode ring waits for the next step
// before it tells the requester it finished the last one. A ring that
// runs sends no heartbeats (the tokens show it lives, and every frame
// costs the cores the ring runs on); one that stalls gets, within
// ringBeat, a heartbeat from every hop that did its part, so the
// requester can tell which hop stalls.
const ringBeat = 250 * time.Millisecond

// deferBeat arms the heartbeat of a ring step done at this hop, replacing
// the previous step's.
func (st *stage) deferBeat(requester peer.ID, h *protocol.Header, progress *protocol.Message) {
	key := sessionKeyOf(requester, h)
	st.mu.Lock()
	defer st.mu.Unlock()
	hs := st.sessions[key]
	if hs == nil {
		return // closed meanwhile
	}
	if hs.beat != nil {
		hs.beat.Stop()
	}
	hs.beat = time.AfterFunc(ringBeat, func() {
		ctx, cancel := context.WithTimeout(st.m.ctx, 5*time.Second)
		defer cancel()
		st.send(ctx, requester, progress)
	})
}

// checkRing vets a ring request's parameters from its header.
func checkRing(h *protocol.Header) error {
	r := h.Ring
	switch {
	case h.Session == "":
		return errors.New("a decode ring needs a session")
	case r.Index < 0 || r.MaxTokens <= r.Index || r.Positions < 1:
		return fmt.Errorf("ring index %d, max tokens %d, positions %d", r.Index, r.MaxTokens, r.Positions)
	case len(r.Forced) > protocol.MaxRingForced || len(r.Eos) > 64 || len(r.HopMicros) != h.Hop:
		return fmt.Errorf("ring with %d forced and %d eos tokens, %d hops' times at hop %d", len(r.Forced), len(r.Eos), len(r.HopMicros), h.Hop)
	case !(r.Temperature >= 0) || math.IsInf(r.Temperature, 0) || r.TopK < 0 || !(r.TopP >= 0 && r.TopP <= 1):
		return fmt.Errorf("ring sampling temperature %g, top_k %d, top_p %g", r.Temperature, r.TopK, r.TopP)
	case r.StepMillis < 0:
		return fmt.Errorf("ring step_millis %d", r.StepMillis)
	}
	return nil
}

// ringTurn is the last hop's part of a decode ring: it picks the step's
// token (the next forced one, or sampled with the shards sampler at the
// ring's index), sends the next step to the first hop unless the ring
// stops here, and the token to the requester.
func (st *stage) ringTurn(ctx context.Context, requester peer.ID, h *protocol.Header, out []protocol.NamedTensor, micros int64) {
	r := *h.Ring.WithHop(micros)
	fail := func(code protocol.ErrorCode, err error) { st.fail(requester, h, code, err.Error()) }
	st.mu.Lock()
	dp, _ := st.provider.(DecoderProvider)
	st.mu.Unlock()
	var dec *shards.DecoderSpec
	if dp != nil {
		dec = dp.Decoder(h.Model)
	}
	if dec == nil || dec.MaxContext <= 0 {
		// Without a context window nothing would bound the positions a
		// requester claims, and the next step's inputs grow with them.
		fail(protocol.CodeBadRequest, errors.New("this hop cannot close a decode ring: the model has no decoder spec with a context window here"))
		return
	}
	var logits *protocol.Tensor
	for _, t := range out {
		if t.Name == dec.Logits {
			logits = t.Tensor
		}
	}
	last, err := shards.LastLogits(logits)
	if err != nil {
		fail(protocol.CodeInternal, err)
		return
	}
	var tok int64
	if len(r.Forced) > 0 {
		tok, r.Forced = r.Forced[0], r.Forced[1:]
	} else {
		tok = shards.Sampling{Temperature: r.Temperature, TopK: r.TopK, TopP: r.TopP, Seed: r.Seed}.Pick(last, r.Index)
	}
	r.Done = r.Index+1 >= r.MaxTokens || slices.Contains(r.Eos, tok) ||
		r.Positions+1 > dec.MaxContext || st.isCancelled(h)
	if !r.Done {
		// The next step first: it is the ring's critical path.
		next := &protocol.Message{Kind: protocol.KindRequest, Header: *h}
		next.Header.Hop, next.Header.Step, next.Header.Tensors, next.Header.Micros = 0, h.Step+1, nil, 0
		nr := r
		nr.Index, nr.Positions, nr.HopMicros = r.Index+1, r.Positions+1, nil
		next.Header.Ring = &nr
		if r.StepMillis > 0 {
			next.Header.Deadline = time.Now().Add(time.Duration(r.StepMillis) * time.Millisecond).UnixMilli()
		}
		in := ringInputs(dec, tok, r.Positions)
		for _, name := range sortedNames(in) {
			next.Tensors = append(next.Tensors, protocol.NamedTensor{Name: name, Tensor: in[name]})
		}
		first, err := peer.Decode(h.Route[0].Peer)
		if err == nil {
			err = st.send(ctx, first, next)
		}
		if err != nil {
			// Blame the first hop: we computed fine but cannot reach it.
			blamed := next.Header
			st.fail(requester, &blamed, protocol.CodeUnreachable, fmt.Sprintf("closing the decode ring: %v", err))
			return
		}
	}
	res := &protocol.Message{Kind: protocol.KindResult, Header: *h}
	res.Header.Tensors, res.Header.Micros, res.Header.Route = nil, micros, nil
	r.Forced = nil
	res.Header.Ring = &r
	res.Tensors = []protocol.NamedTensor{{Name: protocol.RingToken, Tensor: protocol.NewTensor([]int64{1}, []int64{tok})}}
	if err := st.send(ctx, requester, res); err != nil {
		st.m.log.Debug("ring token not delivered", "requester", requester, "err", err)
	}
}

// ringInputs are the inputs of a decode step for one token at position pos
// of a batch of one, as shards.StepInputs builds them for a local run.
func ringInputs(dec *shards.DecoderSpec, tok int64, pos int) shards.Tensors {
	tokens := make([]int64, pos+1)
	tokens[pos] = tok
	return shards.StepInputs(dec, tokens, pos)
}

// RingOptions describe a generation run as a decode ring (Session.Ring).
type RingOptions struct {
	// Prompt is the first step's inputs (the whole prompt, as
	// shards.StepInputs builds them) and Positions its length.
	Prompt    shards.Tensors
	Positions int
	Sampling  shards.Sampling
	// MaxTokens bounds the tokens generated; Eos tokens end the
	// generation (the eos token itself is the last one emitted).
	MaxTokens int
	Eos       []int64
	// Decoder, if set, lets a ring that a hop refused busy resume at the
	// refused step on the same route (the hops before it answer that step
	// again from what they kept) instead of restarting.
	Decoder *shards.DecoderSpec
}

// RingToken is one token of a decode ring, with how its step travelled.
type RingToken struct {
	Token int64
	Info  *StepInfo
}

// ErrRingReplay is returned when a failover would replay more tokens than
// a ring request can carry (protocol.MaxRingForced).
var ErrRingReplay = errors.New("too many tokens to replay in a decode ring")

// Ring runs a generation as a decode ring: the route's last hop samples
// each token, feeds it to the first hop and streams it here, so this node
// is out of the per-token loop. emit gets each token in order (from this
// goroutine); returning false stops the ring. When a hop fails, the
// session restarts on a new route and replays the prompt and the tokens
// emitted so far, step by step as they first ran, with the sampler at the
// same index: the generation goes on as if nothing had happened. The
// session must be new; it is done after Ring.
func (s *Session) Ring(ctx context.Context, o RingOptions, emit func(RingToken) bool) error {
	if s.closed || s.steps > 0 {
		return errors.New("a decode ring needs a new session")
	}
	if o.MaxTokens <= 0 || o.Positions <= 0 {
		return fmt.Errorf("ring: max tokens %d, positions %d", o.MaxTokens, o.Positions)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Tokens arrive at the ring's pace and are emitted at the caller's:
	// the queue takes every token as it comes (memory grows with the
	// tokens made, never with MaxTokens), so a slow emit never holds up
	// the frames of the ring.
	q := &tokenQueue{ready: make(chan struct{}, 1)}
	errc := make(chan error, 1)
	go func() {
		defer q.close()
		errc <- s.ring(ctx, o, q)
	}()
	for {
		t, ok := q.pop()
		if !ok {
			return <-errc
		}
		if !emit(t) {
			cancel()
			<-errc
			return nil
		}
	}
}

// tokenQueue hands a ring's tokens from its watcher to the caller without
// ever blocking the watcher.
type tokenQueue struct {
	mu     sync.Mutex
	toks   []RingToken
	closed bool
	ready  chan struct{} // signalled after a push or close
}

func (q *tokenQueue) push(t RingToken) {
	q.mu.Lock()
	q.toks = append(q.toks, t)
	q.mu.Unlock()
	q.signal()
}

func (q *tokenQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

func (q *tokenQueue) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// pop waits for the next token; false once the queue is closed and empty.
func (q *tokenQueue) pop() (RingToken, bool) {
	for {
		q.mu.Lock()
		if len(q.toks) > 0 {
			t := q.toks[0]
			q.toks = q.toks[1:]
			q.mu.Unlock()
			return t, true
		}
		closed := q.closed
		q.mu.Unlock()
		if closed {
			return RingToken{}, false
		}
		<-q.ready
	}
}

// ring drives the ring until it is done, failing over as needed.
func (s *Session) ring(ctx context.Context, o RingOptions, toks *tokenQueue) error {
	var got []int64 // tokens emitted so far
	var d doubts
	// failovers and resumes count since the last new token: the bounds
	// (MaxFailovers, maxRingResumes in a row) are per token, as a
	// requester-driven step's are per step.
	failovers, resumes, from, progressAt := 0, 0, 0, 0
	var since ringTally // reported with the next token
	for {
		if s.route == nil {
			var dd *doubts
			if failovers > 0 {
				dd = &d
			}
			_, blocks, err := s.m.planRoute(ctx, s.model, 0, 0, s.opts.Avoid, dd, s)
			if err != nil {
				if blocks == 0 || !errors.Is(err, ErrNoRoute) || failovers >= s.opts.MaxFailovers {
					return err
				}
				failovers++
				select {
				case <-time.After(RetryPause(failovers)):
					continue
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}
		if len(got)-from > protocol.MaxRingForced {
			return fmt.Errorf("%w: %d (at most %d)", ErrRingReplay, len(got)-from, protocol.MaxRingForced)
		}
		failed, at, err := s.ringOnce(ctx, o, &got, from, &since, toks)
		if err == nil {
			s.steps = len(got)
			s.m.vindicate(s.route)
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if len(got) > progressAt {
			failovers, resumes, progressAt = 0, 0, len(got)
		}
		if failed < 0 || failovers >= s.opts.MaxFailovers {
			return err
		}
		failovers++
		if ClassifyFailure(err) == FailBusy && o.Decoder != nil && resumes < maxRingResumes {
			// A hop at its limit did not run the step: the state of every
			// hop is whole, so the step is sent again on the same route
			// after a pause rather than the ring rebuilt elsewhere.
			resumes++
			since.resumes++
			s.m.log.Debug("a ring hop was busy; resuming the step", "hop", failed, "step", at, "err", err)
			select {
			case <-time.After(RetryPause(resumes - 1)):
			case <-ctx.Done():
				return ctx.Err()
			}
			from = at
			continue
		}
		resumes, from = 0, 0
		since.failovers++
		_, f := failedHops(failed, err)
		s.m.log.Info("hop failed; restarting the decode ring on a new route", "hop", f, "peer", s.route[f].Peer,
			"tokens", len(got), "err", err)
		s.m.judge(s.route, failed, err, &d)
		// The hops' state is at different steps now: start a new session
		// (the old one closed everywhere) and replay into it.
		s.Close()
		fresh := s.m.NewSession(s.model, s.opts)
		s.id, s.route, s.closed = fresh.id, nil, false
	}
}

// ringTally counts what happened to a ring since its last token.
type ringTally struct {
	failovers int // rings restarted on a new route
	resumes   int // steps sent again on the same route after a busy hop
}

// maxRingResumes bounds the times a ring resumes a step a hop refused
// busy before it is rebuilt on another route.
const maxRingResumes = 3

// ringOnce runs one ring over s.route from step from (0: the prompt; the
// hops hold the state of the steps before it), forcing the tokens already
// in *got, and appends (and pushes on toks) each new token. On failure it
// returns the hop to blame, as runRouteProgress does, and the step that
// failed.
func (s *Session) ringOnce(ctx context.Context, o RingOptions, got *[]int64, from int, since *ringTally, toks *tokenQueue) (int, int, error) {
	m, route := s.m, s.route
	id := nextID()
	c := m.stage.registerRing(id, route)
	defer m.stage.unregister(id)
	forced := slices.Clone(*got)
	ring := &protocol.Ring{Temperature: o.Sampling.Temperature, TopK: o.Sampling.TopK, TopP: o.Sampling.TopP, Seed: o.Sampling.Seed,
		Index: from, MaxTokens: o.MaxTokens, Eos: o.Eos, Forced: forced[from:], Positions: o.Positions + from,
		StepMillis: s.opts.StepTimeout.Milliseconds()}
	msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: m.host.ID().String(),
		Model: s.model.String(), Session: s.id, Step: from, Route: route, FP16: s.opts.FP16, Ring: ring,
		Deadline: time.Now().Add(s.opts.StepTimeout).UnixMilli()}}
	in := o.Prompt
	if from > 0 {
		in = ringInputs(o.Decoder, forced[from-1], o.Positions+from-1)
	}
	for _, name := range sortedNames(in) {
		msg.Tensors = append(msg.Tensors, protocol.NamedTensor{Name: name, Tensor: in[name]})
	}
	first, err := peer.Decode(route[0].Peer)
	if err != nil {
		return 0, from, err
	}
	// Progress deadlines as for any step (HopProgressTimeout: the
	// prompt's for step 0, one token's after): the first hop that has not
	// reported the step must do so within its deadline of when the hop
	// before it finished (of when the step began, for hop 0). A running
	// ring sends no progress, so the check is made only when that time
	// (plus a heartbeat's wait) has passed: by then the hops that did
	// their part have said so (step 0 at once, later steps ringBeat after
	// finishing it), and the first that has not is the one that stalls.
	allowPrompt := m.progressTimeouts(ctx, s.model, route, tokensOf(o.Prompt), s.opts.ProgressFloor)
	allowToken := m.progressTimeouts(ctx, s.model, route, 1, s.opts.ProgressFloor)
	rewarmed := false
	stepTimer := time.NewTimer(s.opts.StepTimeout)
	defer stepTimer.Stop()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var deadline <-chan time.Time
	step, allow := from, allowPrompt
	if from > 0 {
		allow = allowToken
	}
	stepStart := time.Now()
	reported := make([]int, len(route))       // the last step each hop reported done
	finished := make([]time.Time, len(route)) // when each hop finished the current step, as far as known
	for i := range reported {
		reported[i] = -1
	}
	stalled := func() int {
		for h, r := range reported {
			if r < step {
				return h
			}
		}
		return len(route) - 1
	}
	// check returns the hop past its deadline, or how long until the
	// waited-on hop's deadline (0: none known; the step timeout bounds it).
	check := func() (late int, wait time.Duration) {
		f := stalled()
		if allow[f] <= 0 {
			return -1, 0
		}
		from := stepStart
		if f > 0 && !finished[f-1].IsZero() {
			from = finished[f-1]
		}
		left := allow[f] + ringBeat - time.Since(from)
		if left <= 0 {
			return f, 0
		}
		return -1, left
	}
	arm := func() {
		timer.Stop()
		deadline = nil
		if _, wait := check(); wait > 0 {
			timer.Reset(wait)
			deadline = timer.C
		}
	}
	micros := make([]int64, len(route))
	start := time.Now()
	early := map[int]*protocol.Message{} // tokens that came before their turn, by step
	// token takes the result of the current step: the token is checked
	// against the replay or emitted, and the ring moves on a step.
	token := func(a *protocol.Message) (done bool, failed int, err error) {
		h := a.Header.Hop
		v, verr := protocol.View[int64](a.Map()[protocol.RingToken])
		if verr != nil || len(v) != 1 {
			return false, h, &protocol.RemoteError{Code: protocol.CodeBadOutput, Message: "ring token malformed", Hop: h, Peer: route[h].Peer}
		}
		tok := v[0]
		reported[h] = step
		if hm := a.Header.Ring.HopMicros; len(hm) == len(route) {
			micros = hm
		}
		m.stage.markWarm(msg.Header.Model, route, h)
		if step < len(forced) {
			if tok != forced[step] {
				return false, h, &protocol.RemoteError{Code: protocol.CodeBadOutput, Hop: h, Peer: route[h].Peer,
					Message: fmt.Sprintf("replayed token %d of the ring is %d, was %d", step, tok, forced[step])}
			}
		} else {
			*got = append(*got, tok)
			toks.push(RingToken{Token: tok, Info: &StepInfo{Route: route, HopMicros: micros, Total: time.Since(start),
				Failovers: since.failovers, Resumes: since.resumes}})
			*since = ringTally{}
		}
		if a.Header.Ring.Done {
			return true, -1, nil
		}
		if !rewarmed {
			// The hops that reported this step are warm now: a hop cold
			// when the ring began (a new route) keeps no cold floor for
			// every later token.
			allowToken, rewarmed = m.progressTimeouts(ctx, s.model, route, 1, s.opts.ProgressFloor), true
		}
		step, allow = step+1, allowToken
		micros, start, stepStart = make([]int64, len(route)), time.Now(), time.Now()
		clear(finished)
		stepTimer.Reset(s.opts.StepTimeout)
		arm()
		return false, -1, nil
	}
	if err := m.stage.send(ctx, first, msg); err != nil {
		return 0, step, fmt.Errorf("hop 0: %w", err)
	}
	arm()
	for {
		select {
		case <-deadline:
			h, wait := check()
			if h < 0 {
				// The hops before the waited-on one reported meanwhile:
				// its own deadline counts from then.
				deadline = nil
				if wait > 0 {
					timer.Reset(wait)
					deadline = timer.C
				}
				continue
			}
			m.cancelRequest(id, "", route)
			return h, step, fmt.Errorf("%w: hop %d did not finish ring step %d in %s", ErrStall, h, step, allow[h].Round(time.Millisecond))
		case <-stepTimer.C:
			m.cancelRequest(id, "", route)
			return stalled(), step, fmt.Errorf("%w (%s, ring step %d)", ErrStall, s.opts.StepTimeout, step)
		case <-ctx.Done():
			m.cancelRequest(id, s.id, route)
			return -1, step, ctx.Err()
		case a := <-c.ch:
			h := a.Header.Hop
			switch a.Kind {
			case protocol.KindProgress:
				reported[h] = max(reported[h], a.Header.Step)
				if a.Header.Step == step {
					finished[h] = time.Now()
					if step > 0 {
						finished[h] = finished[h].Add(-ringBeat) // the heartbeat waited that long
					}
				}
				m.stage.markWarm(msg.Header.Model, route, h)
			case protocol.KindResult:
				if a.Header.Step < step || h != len(route)-1 || a.Header.Ring == nil {
					continue
				}
				if a.Header.Step > step {
					// The last hop sends the next step before this token,
					// so a later token can overtake it: keep it for its turn.
					if len(early) < len(route)+8 {
						early[a.Header.Step] = a
					}
					continue
				}
				for a != nil {
					done, failed, err := token(a)
					if err != nil {
						return failed, step, err
					}
					if done {
						return -1, step, nil
					}
					a = early[step]
					delete(early, step)
				}
			case protocol.KindError:
				report := &protocol.RemoteError{Code: a.Header.Code, Message: a.Header.Message, Hop: h, Peer: route[h].Peer}
				if j := m.stage.accuser(c, a); j >= 0 {
					return j, step, &AccusationError{Accuser: j, Accused: h, Report: report, By: route[j].Peer}
				}
				return h, step, report
			}
		}
	}
}
