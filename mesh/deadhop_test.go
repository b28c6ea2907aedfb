package mesh

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// newGPTServingMesh is newServingMesh with a small GPT (6 blocks: embed, 4
// decoder layers, head) whose sessions keep a KV cache at each hop.
func newGPTServingMesh(t testing.TB) *servingMesh {
	t.Helper()
	m, err := build.GPT(build.GPTConfig{Layers: 4, Dim: 64, Heads: 4, Context: 64, Seed: 7}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	return servingMeshOf(t, m)
}

// serveWrapped starts a node advertising sp that runs blocks [start, end)
// of sm's model through wrap (a hop that hangs, or is slow).
func (sm *servingMesh) serveWrapped(t testing.TB, boot []peer.AddrInfo, start, end int, sp protocol.ServedSpan,
	wrap func(shards.Session) shards.Session) *Mesh {
	ms := sm.start(t, boot, nil, sp)
	p := &modelProvider{rt: sm.rt, model: sm.model, start: start, end: end, spans: map[[2]int]*shards.Span{}}
	sm.providers = append(sm.providers, p)
	ms.Serve(wrappedProvider{p, wrap}, StageConfig{})
	return ms
}

type wrappedProvider struct {
	inner SpanProvider
	wrap  func(shards.Session) shards.Session
}

func (w wrappedProvider) Runner(model string, start, end int) (shards.Runner, error) {
	r, err := w.inner.Runner(model, start, end)
	if err != nil {
		return nil, err
	}
	return wrappedRunner{r, w.wrap}, nil
}

func (w wrappedProvider) Decoder(model string) *shards.DecoderSpec {
	if dp, ok := w.inner.(DecoderProvider); ok {
		return dp.Decoder(model)
	}
	return nil
}

type wrappedRunner struct {
	shards.Runner
	wrap func(shards.Session) shards.Session
}

func (r wrappedRunner) NewSession() shards.Session { return r.wrap(r.Runner.NewSession()) }

// hangingSession stops answering once hang is set: it takes the step and
// never returns (until release closes), as a wedged or crashed-but-
// connected peer, or a hostile one that reads frames and never replies.
type hangingSession struct {
	shards.Session
	hang    *atomic.Bool
	release chan struct{}
}

func (s hangingSession) Step(in shards.Tensors) (shards.Tensors, error) {
	if s.hang.Load() {
		<-s.release
		return nil, errors.New("released")
	}
	return s.Session.Step(in)
}

// slowSession is an honest hop slower than it advertises: each step
// sleeps perToken for every position it carries before computing.
type slowSession struct {
	shards.Session
	perToken time.Duration
}

func (s slowSession) Step(in shards.Tensors) (shards.Tensors, error) {
	time.Sleep(s.perToken * time.Duration(tokensOf(in)))
	return s.Session.Step(in)
}

// meshDecoderSession adapts a mesh Session to shards.Session for a
// Decoder, timing each step and counting failovers.
type meshDecoderSession struct {
	s         *Session
	steps     int
	failovers int
	took      []time.Duration
}

func (a *meshDecoderSession) Step(in shards.Tensors) (shards.Tensors, error) {
	start := time.Now()
	out, info, err := a.s.Step(context.Background(), in)
	a.took = append(a.took, time.Since(start))
	if info != nil {
		a.failovers += info.Failovers
	}
	if err == nil {
		a.steps++
	}
	return out, err
}
func (a *meshDecoderSession) Steps() int   { return a.steps }
func (a *meshDecoderSession) Close() error { return a.s.Close() }

// localTokens generates n tokens after prompt on the whole model in this
// process: what an undisturbed run gives.
func localTokens(t testing.TB, sm *servingMesh, prompt []int64, n int) []int64 {
	sp, err := sm.rt.LoadSpan(sm.model, 0, len(sm.model.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	sess := sp.NewSession()
	defer sess.Close()
	dec, err := shards.NewDecoder(sm.model.Manifest.Decoder, sess, prompt, shards.Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	for range n {
		if _, err := dec.Next(); err != nil {
			t.Fatal(err)
		}
	}
	return dec.Tokens()
}

// gptSpan is span with each block advertised at micros.
func gptSpan(sm *servingMesh, start, end int, micros float64) protocol.ServedSpan {
	s := span(sm.model.ID, len(sm.model.Manifest.Blocks), start, end)
	for i := range s.BlockMicros {
		s.BlockMicros[i] = micros
	}
	return s
}

// byteTokens is text in the GPT's byte tokenizer.
func byteTokens(s string) []int64 {
	out := make([]int64, len(s))
	for i := range len(s) {
		out[i] = int64(s[i])
	}
	return out
}

// deadHopMesh starts a requester and servers of a 6-block GPT: blocks 0-1
// on dead (which stops answering once hang is set) and on backup, 2-3 and
// 4-5 on one server each, every one in the requester's view.
func deadHopMesh(t *testing.T) (sm *servingMesh, requester, dead, backup *Mesh, hang *atomic.Bool) {
	t.Helper()
	sm = newGPTServingMesh(t)
	requester = sm.start(t, nil, nil)
	boot := []peer.AddrInfo{addrInfo(requester)}
	hang, release := &atomic.Bool{}, make(chan struct{})
	t.Cleanup(func() { close(release) }) // before the meshes close (cleanups run last first)
	dead = sm.serveWrapped(t, boot, 0, 2, gptSpan(sm, 0, 2, 100), func(s shards.Session) shards.Session {
		return hangingSession{s, hang, release}
	})
	backup = sm.start(t, boot, &[2]int{0, 2}, gptSpan(sm, 0, 2, 100))
	sm.start(t, boot, &[2]int{2, 4}, gptSpan(sm, 2, 4, 100))
	sm.start(t, boot, &[2]int{4, 6}, gptSpan(sm, 4, 6, 100))
	sm.connectAll(t)
	requester.View().SetManifest(sm.model.ID, sm.model.Manifest)
	viewOf(t, requester, sm, 4)
	return sm, requester, dead, backup, hang
}

// Issue 12, finding 10: the first hop of a 3-hop generation stops
// answering mid-generation without closing its connection (no disconnect
// event comes). The requester fails it over at its progress deadline,
// scaled to its advertised time with the production floor (2 s), not at
// the 30 s step timeout: the generation completes with the tokens of an
// undisturbed run, and the longest step is a few seconds.
func TestDeadFirstHopFailsOverInAboutOneStep(t *testing.T) {
	sm, requester, dead, backup, hang := deadHopMesh(t)

	prompt := byteTokens("once upon a time, in a mesh")
	const n, hangAt = 16, 6
	want := localTokens(t, sm, prompt, n)

	// Production deadlines: step timeout 30 s, progress floor 2 s. The
	// route starts through the hop that will hang (the backup is avoided,
	// a preference let back in when the other is banned).
	ms := &meshDecoderSession{s: requester.NewSession(sm.model.ID, InferOptions{Avoid: []peer.ID{backup.ID()}})}
	defer ms.Close()
	dec, err := shards.NewDecoder(sm.model.Manifest.Decoder, ms, prompt, shards.Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if i == hangAt {
			if got := ms.s.Route()[0].Peer; got != dead.ID().String() {
				t.Fatalf("hop 0 is %s, want the hop about to hang", got)
			}
			hang.Store(true)
		}
		if _, err := dec.Next(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if got := dec.Tokens(); !slices.Equal(got, want) {
		t.Fatalf("tokens differ from an undisturbed run:\n got %v\nwant %v", got, want)
	}
	worst := slices.Max(ms.took[1:])
	t.Logf("steps: %v; longest gap between tokens %s (at the hang: %s); failovers %d", ms.took, worst, ms.took[hangAt], ms.failovers)
	if ms.failovers < 1 {
		t.Fatalf("no failover counted")
	}
	for _, h := range ms.s.Route() {
		if h.Peer == dead.ID().String() {
			t.Fatalf("route still through the dead hop: %v", ms.s.Route())
		}
	}
	if worst > 6*time.Second {
		t.Fatalf("generation stalled %s on a dead hop, want a few seconds", worst)
	}
}

// An honest hop three times slower than it advertises (40 ms per block,
// per token: the prompt's step takes about 4 s there, each later one 240
// ms) is not failed over, even with the progress floor lowered to 200 ms,
// under both: its deadline scales with its own advertised time and the
// step's tokens. (The other hops advertise 5 ms per block, a margin for a
// loaded test machine.)
func TestSlowHonestHopIsNotFailedOver(t *testing.T) {
	sm := newGPTServingMesh(t)
	requester := sm.start(t, nil, nil)
	boot := []peer.AddrInfo{addrInfo(requester)}
	const perBlock = 40 * time.Millisecond
	sm.start(t, boot, &[2]int{0, 2}, gptSpan(sm, 0, 2, 5000))
	slow := sm.serveWrapped(t, boot, 2, 4, gptSpan(sm, 2, 4, float64(perBlock.Microseconds())), func(s shards.Session) shards.Session {
		return slowSession{s, 3 * 2 * perBlock}
	})
	sm.start(t, boot, &[2]int{4, 6}, gptSpan(sm, 4, 6, 5000))
	sm.connectAll(t)
	requester.View().SetManifest(sm.model.ID, sm.model.Manifest)
	viewOf(t, requester, sm, 3)

	prompt := byteTokens("once upon a time")
	const n = 8
	want := localTokens(t, sm, prompt, n)
	ms := &meshDecoderSession{s: requester.NewSession(sm.model.ID, InferOptions{ProgressFloor: 200 * time.Millisecond})}
	defer ms.Close()
	dec, err := shards.NewDecoder(sm.model.Manifest.Decoder, ms, prompt, shards.Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if _, err := dec.Next(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	t.Logf("steps: %v; failovers %d", ms.took, ms.failovers)
	if got := dec.Tokens(); !slices.Equal(got, want) {
		t.Fatalf("tokens differ from an undisturbed run:\n got %v\nwant %v", got, want)
	}
	if ms.failovers != 0 {
		t.Fatalf("%d failovers of an honest slow hop", ms.failovers)
	}
	if !slices.ContainsFunc(ms.s.Route(), func(h protocol.Hop) bool { return h.Peer == slow.ID().String() }) {
		t.Fatalf("the slow hop left the route: %v", ms.s.Route())
	}
	// Slower than either floor alone allows: only the scaled deadline
	// kept the hop.
	if ms.took[0] < 3*2*perBlock*time.Duration(len(prompt)) || slices.Min(ms.took[1:]) < 3*2*perBlock {
		t.Fatalf("steps took %v: the hop was not slow", ms.took)
	}
}

func TestHopProgressTimeout(t *testing.T) {
	for _, c := range []struct {
		micros float64
		tokens int
		rtt    time.Duration
		want   time.Duration
	}{
		{0, 1, 0, ProgressFloor},
		{200, 1, 10 * time.Millisecond, ProgressFloor + 20*time.Millisecond + 2*time.Millisecond},
		{200, 0, 0, ProgressFloor + 2*time.Millisecond},                               // at least one token
		{1000, 512, 0, ProgressFloor + 5120*time.Millisecond},                         // a prompt: its tokens times the per-token time
		{100, 1, UnknownRTT, ProgressFloor + 2*ProgressUnknownRTT + time.Millisecond}, // unknown RTT
		{1e18, 1, 0, ProgressFloor + time.Hour},                                       // absurd claims are capped
	} {
		if got := HopProgressTimeout(c.micros, c.tokens, c.rtt, ProgressFloor); got != c.want {
			t.Errorf("HopProgressTimeout(%g, %d, %s) = %s, want %s", c.micros, c.tokens, c.rtt, got, c.want)
		}
	}
	for _, c := range []struct {
		in   shards.Tensors
		want int
	}{
		{shards.Tensors{"input_ids": {DType: protocol.Int64, Shape: []int64{1, 27}}, "attention_mask": {DType: protocol.Int64, Shape: []int64{1, 90}}}, 27},
		{shards.Tensors{"h2": {DType: protocol.Float32, Shape: []int64{2, 5, 64}}, "attention_mask": {DType: protocol.Int64, Shape: []int64{2, 90}}}, 10},
		{shards.Tensors{"x": {DType: protocol.Float32, Shape: []int64{1, 16}}}, 1},
	} {
		if got := tokensOf(c.in); got != c.want {
			t.Errorf("tokensOf(%v) = %d, want %d", c.in, got, c.want)
		}
	}
}

// The same in a decode ring on a route the requester has not used before:
// every hop is cold when the ring begins (a 10 s progress floor), but
// after the first token they have all reported, so a hop that dies later
// is failed over at the warm floor (2 s), not the cold one.
func TestDeadFirstHopFailsOverInARingOnANewRoute(t *testing.T) {
	sm, requester, dead, backup, hang := deadHopMesh(t)

	prompt := byteTokens("once upon a time, in a mesh")
	const n, hangAt = 16, 4
	want := localTokens(t, sm, prompt, n)[len(prompt):]
	spec := sm.model.Manifest.Decoder
	s := requester.NewSession(sm.model.ID, InferOptions{Avoid: []peer.ID{backup.ID()}})
	defer s.Close()
	var got []int64
	var gaps []time.Duration
	last, failovers := time.Now(), 0
	err := s.Ring(context.Background(), RingOptions{Prompt: shards.StepInputs(spec, prompt, 0), Positions: len(prompt),
		MaxTokens: n, Decoder: spec}, func(tok RingToken) bool {
		if len(got) == hangAt {
			if hop := tok.Info.Route[0].Peer; hop != dead.ID().String() {
				t.Errorf("hop 0 is %s, want the hop about to hang", hop)
			}
			hang.Store(true)
		}
		got = append(got, tok.Token)
		gaps = append(gaps, time.Since(last))
		last, failovers = time.Now(), failovers+tok.Info.Failovers
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("tokens differ from an undisturbed run:\n got %v\nwant %v", got, want)
	}
	worst := slices.Max(gaps[1:])
	t.Logf("gaps between tokens: %v; longest %s; failovers %d", gaps, worst, failovers)
	if failovers < 1 {
		t.Fatalf("no failover counted")
	}
	if worst > 6*time.Second {
		t.Fatalf("the ring stalled %s on a dead hop, want a few seconds", worst)
	}
}
