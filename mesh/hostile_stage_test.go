package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pprotocol "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Issue 12: one peer must never take the mesh down. These tests play a
// hostile peer built from this package and protocol/, writing raw frames on
// stage streams to a node over real libp2p QUIC on loopback.

// echoProvider serves every span of every model with echoRunner.
type echoProvider struct{}

func (echoProvider) Runner(model string, start, end int) (shards.Runner, error) {
	return echoRunner{}, nil
}

// echoRunner takes x (float32 [1, seq]) and hands it on as y.
type echoRunner struct{}

func (echoRunner) Run(in shards.Tensors) (shards.Tensors, error) {
	return shards.Tensors{"y": in["x"]}, nil
}
func (echoRunner) NewSession() shards.Session { return &echoSession{} }
func (echoRunner) Inputs() []shards.TensorSpec {
	return []shards.TensorSpec{{Name: "x", DType: protocol.Float32, Shape: []shards.Dim{{Size: 1}, {Param: "seq"}}}}
}

type echoSession struct{ steps int }

func (s *echoSession) Step(in shards.Tensors) (shards.Tensors, error) {
	s.steps++
	return shards.Tensors{"y": in["x"]}, nil
}
func (s *echoSession) Steps() int   { return s.steps }
func (s *echoSession) Close() error { return nil }

// rawStageStream opens a stage stream from one node to another, as a
// hostile peer writing its own bytes does.
func rawStageStream(t testing.TB, from, to *testNode) network.Stream {
	t.Helper()
	s, err := from.Host().NewStream(context.Background(), to.ID(), libp2pprotocol.ID(protocol.StageProtocol))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// frameHead is the start of a request frame for server from requester
// whose header declares one float32 tensor x of the given bytes; none of
// the body follows.
func frameHead(t testing.TB, requester, server peer.ID, bytes int64) []byte {
	t.Helper()
	return frameHeadID(t, 1, requester, server, bytes)
}

// frameHeadID is frameHead for a request of the given ID.
func frameHeadID(t testing.TB, id uint64, requester, server peer.ID, bytes int64) []byte {
	t.Helper()
	h := protocol.Header{ID: id, Requester: requester.String(), Model: "m",
		Route:   []protocol.Hop{{Peer: server.String(), Start: 0, End: 1}},
		Tensors: []protocol.TensorMeta{{Name: "x", DType: protocol.Float32, Wire: protocol.Float32, Shape: []int64{1, bytes / 4}}}}
	b, err := protocol.FrameHead(protocol.KindRequest, &h, bytes)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// heapInUse is the process's live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// waitClosed reads s until the other side closes or resets it, and says
// how long that took from start; it fails the test past within.
func waitClosed(t testing.TB, s network.Stream, start time.Time, within time.Duration) time.Duration {
	t.Helper()
	s.SetReadDeadline(start.Add(within))
	_, err := io.Copy(io.Discard, s)
	if isTimeout(err) {
		t.Errorf("stream still open after %s", within)
	}
	return time.Since(start)
}

// Acceptance 1 of issue 12: 48 streams, each declaring a 250 MiB tensor
// and sending nothing more, grow the node's heap by far less than 32 MiB,
// and the node closes each within its frame timeout.
func TestStageHostileHeadersDoNotAllocate(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	const frameTimeout = time.Second
	server.Serve(echoProvider{}, StageConfig{FrameTimeout: frameTimeout, StreamIdle: 10 * time.Second, MaxStreamsPerPeer: 64})
	hostile := c.start(t, []peer.AddrInfo{addrInfo(server.Mesh)}, time.Minute)

	const streams, declared = 48, 250 << 20
	before := heapInUse()
	head := frameHead(t, hostile.ID(), server.ID(), declared)
	var opened []network.Stream
	start := time.Now()
	for range streams {
		s := rawStageStream(t, hostile, server)
		if _, err := s.Write(head); err != nil {
			t.Fatal(err)
		}
		opened = append(opened, s)
	}
	// Every header is in: the server is waiting in 48 bodies.
	time.Sleep(frameTimeout / 2)
	during := heapInUse()
	grew := int64(during) - int64(before)
	t.Logf("%d streams declaring %d MiB each (%d bytes sent each): heap %d -> %d MiB (%+d KiB)",
		streams, declared>>20, len(head), before>>20, during>>20, grew>>10)
	if grew > 32<<20 {
		t.Errorf("heap grew by %d MiB", grew>>20)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	for _, s := range opened {
		wg.Go(func() {
			d := waitClosed(t, s, start, frameTimeout+5*time.Second)
			mu.Lock()
			slowest = max(slowest, d)
			mu.Unlock()
		})
	}
	wg.Wait()
	t.Logf("all %d stalled streams closed by the server %s after the first header (frame timeout %s); stats %+v",
		streams, slowest.Round(time.Millisecond), frameTimeout, server.StageStats())
	if got := server.StageStats().StreamsTimedOut; got < streams {
		t.Errorf("%d streams timed out, want %d", got, streams)
	}
}

// The server resets at once the stage streams one peer opens past
// MaxStreamsPerPeer.
func TestStageStreamsPerPeerBounded(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	server.Serve(echoProvider{}, StageConfig{FrameTimeout: 5 * time.Second, MaxStreamsPerPeer: 4})
	hostile := c.start(t, []peer.AddrInfo{addrInfo(server.Mesh)}, time.Minute)
	head := frameHead(t, hostile.ID(), server.ID(), 250<<20)
	start := time.Now()
	for range 12 {
		s := rawStageStream(t, hostile, server)
		s.Write(head)
		defer s.Reset()
	}
	waitFor(t, 3*time.Second, "streams past the bound refused", func() (bool, string) {
		st := server.StageStats()
		return st.StreamsRefused == 8, fmt.Sprintf("%+v", st)
	})
	t.Logf("8 of 12 streams refused within %s", time.Since(start).Round(time.Millisecond))
}

// Acceptance 2 of issue 12: a stream that sends nothing is closed by the
// server once idle for StreamIdle.
func TestStageIdleStreamClosed(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	const idle = 1500 * time.Millisecond
	server.Serve(echoProvider{}, StageConfig{StreamIdle: idle})
	hostile := c.start(t, []peer.AddrInfo{addrInfo(server.Mesh)}, time.Minute)
	s := rawStageStream(t, hostile, server)
	start := time.Now()
	took := waitClosed(t, s, start, idle+5*time.Second) // the read sends the protocol's handshake, no frame
	t.Logf("idle stream closed by the server after %s (idle deadline %s)", took.Round(time.Millisecond), idle)
	if took < idle-200*time.Millisecond {
		t.Errorf("closed after %s, before the idle deadline %s", took, idle)
	}
}

// Acceptance 3 of issue 12: one peer opening 300 sessions gets busy past
// its quota while a second peer still opens sessions and steps them; when
// the hostile peer disconnects its sessions are freed at once, and every
// busy answer was counted.
func TestStageSessionQuota(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	server.Serve(echoProvider{}, StageConfig{MaxInFlight: 512})
	boot := []peer.AddrInfo{addrInfo(server.Mesh)}
	hostile := c.start(t, boot, time.Minute)
	honest := c.start(t, boot, time.Minute)
	quota := max(8, 256/4)

	route := []protocol.Hop{{Peer: server.ID().String(), Start: 0, End: 1}}
	x := protocol.NewTensor([]int64{1, 1}, []float32{7})
	request := func(from *testNode, id uint64, session string, step int) *protocol.Message {
		return &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: from.ID().String(),
			Model: "m", Session: session, Step: step, Route: route}, Tensors: []protocol.NamedTensor{{Name: "x", Tensor: x}}}
	}
	// The hostile peer writes 300 step-0 requests back to back on one raw
	// stream; it registers them only to count the answers.
	const attempts = 300
	var calls []*call
	for i := range attempts {
		calls = append(calls, hostile.stage.register(uint64(i+1), route))
	}
	s := rawStageStream(t, hostile, server)
	for i := range attempts {
		if err := protocol.WriteMessage(s, request(hostile, uint64(i+1), fmt.Sprintf("evil%03d", i), 0)); err != nil {
			t.Fatal(err)
		}
	}
	results, busy := 0, 0
	for i, c := range calls {
		select {
		case msg := <-c.ch:
			switch {
			case msg.Kind == protocol.KindResult:
				results++
			case msg.Kind == protocol.KindError && msg.Header.Code == protocol.CodeBusy:
				busy++
			default:
				t.Fatalf("request %d: %v %s %s", i, msg.Kind, msg.Header.Code, msg.Header.Message)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("request %d: no answer", i)
		}
	}
	stats := server.StageStats()
	t.Logf("hostile peer: %d sessions opened, %d busy answers; server: %+v", results, busy, stats)
	if results != quota || busy != attempts-quota {
		t.Errorf("hostile peer opened %d sessions and got %d busy, want %d and %d", results, busy, quota, attempts-quota)
	}
	if stats.Busy != uint64(busy) {
		t.Errorf("busy counter %d, hostile peer got %d busy answers", stats.Busy, busy)
	}

	// The honest peer finds room and steps its session.
	for step := range 3 {
		id := uint64(1000 + step)
		c := honest.stage.register(id, route)
		if err := honest.stage.send(context.Background(), server.ID(), request(honest, id, "honest", step)); err != nil {
			t.Fatal(err)
		}
		select {
		case msg := <-c.ch:
			if msg.Kind != protocol.KindResult {
				t.Fatalf("honest step %d: %v %s %s", step, msg.Kind, msg.Header.Code, msg.Header.Message)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("honest step %d: no answer", step)
		}
		honest.stage.unregister(id)
	}
	if got := server.StageStats().Sessions; got != quota+1 {
		t.Fatalf("%d sessions open, want %d", got, quota+1)
	}

	// The hostile peer leaves: its sessions go at once, the honest one stays.
	left := time.Now()
	if err := hostile.Close(); err != nil && !errors.Is(err, context.Canceled) {
		t.Log(err)
	}
	took := waitFor(t, 2*time.Second, "hostile sessions freed", func() (bool, string) {
		n := server.StageStats().Sessions
		return n == 1, fmt.Sprintf("%d sessions", n)
	})
	t.Logf("hostile peer's %d sessions freed %s after it left (closed in %s)", quota, took.Round(time.Millisecond), time.Since(left).Round(time.Millisecond))
}

// A request whose tensors do not fit the inputs of the span it asks for is
// refused from its header: its body (8 MiB here) is read and dropped
// without being kept, the requester gets bad_request, and the next frame
// on the same stream is served.
func TestStageRefusesTensorsTheSpanDoesNotTake(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	server.Serve(echoProvider{}, StageConfig{})
	peerNode := c.start(t, []peer.AddrInfo{addrInfo(server.Mesh)}, time.Minute)
	route := []protocol.Hop{{Peer: server.ID().String(), Start: 0, End: 1}}
	frame := func(id uint64, shape []int64) *protocol.Message {
		n := shape[0] * shape[1]
		return &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: peerNode.ID().String(),
			Model: "m", Route: route}, Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor(shape, make([]float32, n))}}}
	}
	bad, good := peerNode.stage.register(1, route), peerNode.stage.register(2, route)
	s := rawStageStream(t, peerNode, server)
	defer s.Close()
	if err := protocol.WriteMessage(s, frame(1, []int64{2, 1 << 20})); err != nil { // the span takes [1, seq]
		t.Fatal(err)
	}
	if err := protocol.WriteMessage(s, frame(2, []int64{1, 4})); err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		c    *call
		kind protocol.Kind
		code protocol.ErrorCode
	}{{bad, protocol.KindError, protocol.CodeBadRequest}, {good, protocol.KindResult, ""}} {
		select {
		case msg := <-w.c.ch:
			if msg.Kind != w.kind || msg.Header.Code != w.code {
				t.Fatalf("request %d: %v %s %s, want %v %s", msg.Header.ID, msg.Kind, msg.Header.Code, msg.Header.Message, w.kind, w.code)
			}
			t.Logf("request %d: %v %s %s", msg.Header.ID, msg.Kind, msg.Header.Code, msg.Header.Message)
		case <-time.After(10 * time.Second):
			t.Fatal("no answer")
		}
	}
}

// Many identities, each under its per-peer quota, fill the session table:
// a peer holding less than its fair share still gets a session, the least
// recently used idle one of the biggest holder making room.
func TestStageSessionFairShare(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	server.Serve(echoProvider{}, StageConfig{MaxInFlight: 64, MaxSessions: 16, MaxSessionsPerPeer: 8})
	boot := []peer.AddrInfo{addrInfo(server.Mesh)}
	route := []protocol.Hop{{Peer: server.ID().String(), Start: 0, End: 1}}
	x := protocol.NewTensor([]int64{1, 1}, []float32{7})
	step := func(from *testNode, id uint64, session string, n int) *protocol.Message {
		t.Helper()
		call := from.stage.register(id, route)
		defer from.stage.unregister(id)
		msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: from.ID().String(),
			Model: "m", Session: session, Step: n, Route: route}, Tensors: []protocol.NamedTensor{{Name: "x", Tensor: x}}}
		if err := from.stage.send(context.Background(), server.ID(), msg); err != nil {
			t.Fatal(err)
		}
		select {
		case answer := <-call.ch:
			return answer
		case <-time.After(10 * time.Second):
			t.Fatalf("%s step %d: no answer", session, n)
		}
		return nil
	}
	// Two identities fill the table, 8 sessions each (their quota).
	for h := range 2 {
		hostile := c.start(t, boot, time.Minute)
		for i := range 8 {
			if a := step(hostile, uint64(i+1), fmt.Sprintf("evil%d-%d", h, i), 0); a.Kind != protocol.KindResult {
				t.Fatalf("hostile %d session %d: %v %s", h, i, a.Kind, a.Header.Message)
			}
		}
	}
	if got := server.StageStats().Sessions; got != 16 {
		t.Fatalf("%d sessions open, want the table full (16)", got)
	}
	honest := c.start(t, boot, time.Minute)
	for n := range 3 {
		if a := step(honest, uint64(100+n), "honest", n); a.Kind != protocol.KindResult {
			t.Fatalf("honest step %d with the table full: %v %s %s", n, a.Kind, a.Header.Code, a.Header.Message)
		}
	}
	if st := server.StageStats(); st.Evicted != 1 || st.Sessions != 16 {
		t.Fatalf("stats %+v: want one session evicted for the honest peer", st)
	}
}

// slowProvider's sessions take a while per step, like a loaded hop.
type lateProvider struct{ delay time.Duration }

func (p lateProvider) Runner(model string, start, end int) (shards.Runner, error) {
	return lateRunner{echoRunner{}, p.delay}, nil
}

type lateRunner struct {
	echoRunner
	delay time.Duration
}

func (r lateRunner) NewSession() shards.Session { return &lateSession{delay: r.delay} }

type lateSession struct {
	echoSession
	delay time.Duration
}

func (s *lateSession) Step(in shards.Tensors) (shards.Tensors, error) {
	time.Sleep(s.delay)
	return s.echoSession.Step(in)
}

// A step sent again while it still runs (a requester that gave up waiting
// on the hop and then let it back in) gets that step's outputs once they
// exist, not a refusal, and the step runs once.
func TestStageResentRunningStep(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	server.Serve(lateProvider{delay: 400 * time.Millisecond}, StageConfig{})
	requester := c.start(t, []peer.AddrInfo{addrInfo(server.Mesh)}, time.Minute)
	route := []protocol.Hop{{Peer: server.ID().String(), Start: 0, End: 1}}
	x := protocol.NewTensor([]int64{1, 2}, []float32{3, 4})
	var calls []*call
	for id := uint64(1); id <= 2; id++ {
		calls = append(calls, requester.stage.register(id, route))
		msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: requester.ID().String(),
			Model: "m", Session: "s1", Step: 0, Route: route}, Tensors: []protocol.NamedTensor{{Name: "x", Tensor: x}}}
		if err := requester.stage.send(context.Background(), server.ID(), msg); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // the first is running when the second comes
	}
	for i, cl := range calls {
		select {
		case msg := <-cl.ch:
			if msg.Kind != protocol.KindResult {
				t.Fatalf("request %d: %v %s %s", i+1, msg.Kind, msg.Header.Code, msg.Header.Message)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("request %d: no answer", i+1)
		}
	}
	if st := server.StageStats(); st.Sessions != 1 {
		t.Fatalf("stats %+v: want the one session", st)
	}
}

// Request frames sent at full speed are held within MaxHeldBytes: one
// peer gets at most half of it, all peers together at most all of it,
// while small frames (decode steps) still pass; a frame over the half is
// taken when the node holds nothing else; every refusal is a busy answer
// from the header, and the stream stays usable.
func TestStageHeldFramesBounded(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	const limit = 64 << 20
	server.Serve(echoProvider{}, StageConfig{MaxHeldBytes: limit})
	boot := []peer.AddrInfo{addrInfo(server.Mesh)}
	a, b, honest := c.start(t, boot, time.Minute), c.start(t, boot, time.Minute), c.start(t, boot, time.Minute)
	route := []protocol.Hop{{Peer: server.ID().String(), Start: 0, End: 1}}

	// open starts a frame of the given size from p and sends all of its
	// body but the last byte, so that the server holds it.
	type open struct {
		s    network.Stream
		call *call
	}
	var nextID atomic.Uint64
	start := func(p *testNode, bytes int64) open {
		t.Helper()
		id := nextID.Add(1)
		cl := p.stage.register(id, route)
		head := frameHeadID(t, id, p.ID(), server.ID(), bytes)
		s := rawStageStream(t, p, server)
		if _, err := s.Write(head); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write(make([]byte, bytes-1)); err != nil {
			t.Fatal(err)
		}
		return open{s, cl}
	}
	finish := func(o open) {
		if _, err := o.s.Write([]byte{0}); err != nil {
			t.Fatal(err)
		}
	}
	answer := func(o open, want protocol.Kind, code protocol.ErrorCode) {
		t.Helper()
		select {
		case msg := <-o.call.ch:
			if msg.Kind != want || msg.Header.Code != code {
				t.Fatalf("answer %v %q %s, want %v %q", msg.Kind, msg.Header.Code, msg.Header.Message, want, code)
			}
			if code != "" {
				t.Logf("refused: %s", msg.Header.Message)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no answer")
		}
	}
	heldIs := func(want int64) {
		t.Helper()
		for range 500 {
			if server.StageStats().HeldBytes == want {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Fatalf("held %d bytes, want %d", server.StageStats().HeldBytes, want)
	}

	const big = 24 << 20
	a1 := start(a, big)
	heldIs(big)
	// A refused frame is answered once its body, dropped, is through.
	a2 := start(a, big) // a's second: over its half
	finish(a2)
	answer(a2, protocol.KindError, protocol.CodeBusy)
	b1 := start(b, big)
	heldIs(2 * big)
	// honest's large frame is over the node's limit; its small one passes.
	h1 := start(honest, big)
	finish(h1)
	answer(h1, protocol.KindError, protocol.CodeBusy)
	small := start(honest, 4<<10)
	finish(small)
	answer(small, protocol.KindResult, "")

	finish(a1)
	finish(b1)
	answer(a1, protocol.KindResult, "")
	answer(b1, protocol.KindResult, "")
	heldIs(0)
	// A frame over the half is taken by a quiet node.
	whole := start(a, limit-(1<<20))
	heldIs(limit - (1 << 20))
	finish(whole)
	answer(whole, protocol.KindResult, "")
	st := server.StageStats()
	t.Logf("server: %+v", st)
	if st.PeakHeldBytes > limit || st.Busy != 2 {
		t.Fatalf("peak held %d (limit %d), %d busy answers (want 2)", st.PeakHeldBytes, limit, st.Busy)
	}
}

// contextProvider is echoProvider for a model with a context window.
type contextProvider struct {
	echoProvider
	context int
}

func (p contextProvider) MaxContext(string) int { return p.context }

// A request covering more positions than the model's context is refused
// from its header (a small frame must not buy a huge attention), one
// within it runs.
func TestStageRefusesStepsPastTheContext(t *testing.T) {
	c := newCluster(t)
	server := c.start(t, nil, time.Minute)
	server.Serve(contextProvider{context: 16}, StageConfig{})
	requester := c.start(t, []peer.AddrInfo{addrInfo(server.Mesh)}, time.Minute)
	route := []protocol.Hop{{Peer: server.ID().String(), Start: 0, End: 1}}
	for i, w := range []struct {
		seq  int64
		code protocol.ErrorCode
	}{{17, protocol.CodeBadRequest}, {16, ""}} {
		id := uint64(i + 1)
		cl := requester.stage.register(id, route)
		msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id, Requester: requester.ID().String(), Model: "m", Route: route},
			Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{1, w.seq}, make([]float32, w.seq))}}}
		if err := requester.stage.send(context.Background(), server.ID(), msg); err != nil {
			t.Fatal(err)
		}
		select {
		case got := <-cl.ch:
			if got.Header.Code != w.code {
				t.Fatalf("seq %d: %v %q %s, want code %q", w.seq, got.Kind, got.Header.Code, got.Header.Message, w.code)
			}
			t.Logf("seq %d: %v %s %s", w.seq, got.Kind, got.Header.Code, got.Header.Message)
		case <-time.After(10 * time.Second):
			t.Fatalf("seq %d: no answer", w.seq)
		}
	}
}
