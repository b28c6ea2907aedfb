package node

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Issue 12, acceptance 2: a node under attack by 8 hostile peers, each
// holding 64 stage streams to it, keeps its memory bounded and keeps
// serving honest generations.
const (
	attackStreamsPerPeer = 64
	// attackFor is how long the attack lasts; the honest generations of
	// the attacked phase run from attackRamp after it starts to its end.
	attackFor  = 15 * time.Second
	attackRamp = time.Second
	// attackPrompt is the prompt length of a hostile session request: long
	// prompts make each session's KV cache and each step as costly as the
	// model's context allows.
	attackPrompt = 192
	// floodEvery paces one flooding stream's step-0 requests, and
	// reopenEvery a hostile stream the target reset (bounded rates: the
	// hostile peers share this process's two cores with the nodes).
	floodEvery  = 20 * time.Millisecond
	reopenEvery = 200 * time.Millisecond
	// trickleEvery is how often a trickling stream sends trickleBytes of
	// its declared body, inside the target's frame timeout.
	trickleEvery = 2 * time.Second
	trickleBytes = 64
	// maxFloodPerStream bounds the requests one flooding stream writes.
	maxFloodPerStream = 5000
)

// attacker is a hostile peer: a libp2p host of its own on loopback that
// speaks the stage protocol with frames it writes itself.
type attacker struct {
	h                     host.Host
	target                peer.AddrInfo
	route                 []protocol.Hop
	model                 string
	inputs                []protocol.NamedTensor // a step-0 request's tensors
	trickleHead           []byte                 // a request frame's head declaring ~200 MiB that fit the span
	noFlood               bool                   // flooding streams stay idle instead
	opened, reset, writes atomic.Uint64
	answers, busy         atomic.Uint64
	flooded               atomic.Uint64 // step-0 requests written
	roles                 [4]atomic.Uint64
	held                  [4]atomic.Uint64 // streams of each role the target kept over a second
}

func newAttacker(b *testing.B, target peer.AddrInfo) *attacker {
	b.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/udp/0/quic-v1"),
		libp2p.Transport(libp2pquic.NewTransport), libp2p.ResourceManager(&network.NullResourceManager{}),
		libp2p.DisableRelay())
	if err != nil {
		b.Fatal(err)
	}
	a := &attacker{h: h, target: target}
	// Answers to its requests (results, busy) come on streams the target
	// opens: read and count them, as a requester would.
	h.SetStreamHandler(libp2pprotocol.ID(protocol.StageProtocol), func(s network.Stream) {
		defer s.Reset()
		for {
			msg, err := protocol.ReadMessage(s, 16<<20)
			if err != nil {
				return
			}
			a.answers.Add(1)
			if msg.Kind == protocol.KindError && msg.Header.Code == protocol.CodeBusy {
				a.busy.Add(1)
			}
		}
	})
	return a
}

// run keeps attackStreamsPerPeer stage streams going to the target until
// ctx ends: stream i floods step-0 session requests (i%4 == 0), declares a
// huge body and trickles a few bytes of it within the frame timeout
// (i%4 == 1), declares one and sends nothing (i%4 == 2), or sends nothing
// at all (i%4 == 3). A stream the target resets is reopened after
// reopenEvery.
func (a *attacker) run(ctx context.Context, wg *sync.WaitGroup) {
	if err := a.h.Connect(ctx, a.target); err != nil {
		return
	}
	for i := range attackStreamsPerPeer {
		wg.Go(func() {
			for ctx.Err() == nil {
				s, err := a.h.NewStream(ctx, a.target.ID, libp2pprotocol.ID(protocol.StageProtocol))
				if err == nil {
					a.opened.Add(1)
					a.stream(ctx, s, i%4)
					s.Reset()
					a.reset.Add(1)
				}
				select {
				case <-ctx.Done():
				case <-time.After(reopenEvery):
				}
			}
		})
	}
}

// stream plays one role on s until the target ends it or ctx does.
func (a *attacker) stream(ctx context.Context, s network.Stream, role int) {
	// Reading sees the target's reset (or its idle close) at once.
	ended := make(chan struct{})
	go func() {
		io.Copy(io.Discard, s)
		close(ended)
	}()
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	defer stop()
	write := func(b []byte) bool {
		_, err := s.Write(b)
		if err == nil {
			a.writes.Add(1)
		}
		return err == nil
	}
	wait := func(d time.Duration) bool {
		select {
		case <-ended:
			return false
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	if role == 0 && a.noFlood {
		role = 3
	}
	a.roles[role].Add(1)
	opened := time.Now()
	defer func() {
		if time.Since(opened) > time.Second {
			a.held[role].Add(1)
		}
	}()
	switch role {
	case 0: // step-0 requests, each opening a new session
		for range maxFloodPerStream {
			var sid [8]byte
			rand.Read(sid[:])
			msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 1, Requester: a.h.ID().String(),
				Model: a.model, Session: hex.EncodeToString(sid[:]), Route: a.route}, Tensors: a.inputs}
			if protocol.WriteMessage(s, msg) != nil {
				return
			}
			a.flooded.Add(1)
			if !wait(floodEvery) {
				return
			}
		}
	case 1: // a huge body, trickled
		if !write(a.trickleHead) {
			return
		}
		for range int(attackFor/trickleEvery) + 1 {
			if !wait(trickleEvery) || !write(make([]byte, trickleBytes)) {
				return
			}
		}
	case 2: // a huge body, none of it sent
		write(a.trickleHead)
	}
	select {
	case <-ended:
	case <-ctx.Done():
	}
}

// attackInputs are a hostile session's step-0 tensors for the span start
// of model: attackPrompt tokens.
func attackInputs(dec *shards.DecoderSpec) []protocol.NamedTensor {
	prompt := make([]int64, attackPrompt)
	for i := range prompt {
		prompt[i] = int64('a' + i%26)
	}
	in := shards.StepInputs(dec, prompt, 0)
	var out []protocol.NamedTensor
	for name, t := range in {
		out = append(out, protocol.NamedTensor{Name: name, Tensor: t})
	}
	slices.SortFunc(out, func(x, y protocol.NamedTensor) int { return strings.Compare(x.Name, y.Name) })
	return out
}

// hugeHead is the head of a request frame (its body not included) whose
// header declares tensors that fit specs, each tensor's last symbolic
// dimension sized so that the body is about bytes long.
func hugeHead(b *testing.B, requester peer.ID, model string, route []protocol.Hop, specs []shards.TensorSpec, bytes int64) []byte {
	b.Helper()
	per := int64(0) // body bytes per unit of the symbolic dimensions
	for _, s := range specs {
		per += int64(s.DType.Size())
	}
	n := bytes / max(per, 1)
	var metas []protocol.TensorMeta
	body := int64(0)
	for _, s := range specs {
		shape := make([]int64, len(s.Shape))
		last := -1 // the last symbolic dimension takes n, the others ("batch") 1
		for i, d := range s.Shape {
			shape[i] = d.Size
			if d.Param != "" {
				shape[i], last = 1, i
			}
		}
		if last >= 0 {
			shape[last] = n
		}
		metas = append(metas, protocol.TensorMeta{Name: s.Name, DType: s.DType, Wire: s.DType, Shape: shape})
		body += protocol.NumElements(shape) * int64(s.DType.Size())
	}
	h := protocol.Header{ID: 2, Requester: requester.String(), Model: model, Route: route, Tensors: metas}
	out, err := protocol.FrameHead(protocol.KindRequest, &h, body)
	if err != nil {
		b.Fatal(err)
	}
	return out
}

// rssBytes is this process's resident set (VmRSS), 0 if unknown.
func rssBytes() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// rssPeak samples rssBytes every 100 ms and keeps the largest since the
// last reset.
type rssPeak struct {
	max  atomic.Int64
	stop chan struct{}
	done chan struct{}
}

func startRSSPeak() *rssPeak {
	p := &rssPeak{stop: make(chan struct{}), done: make(chan struct{})}
	p.max.Store(rssBytes())
	go func() {
		defer close(p.done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				if r := rssBytes(); r > p.max.Load() {
					p.max.Store(r)
				}
			}
		}
	}()
	return p
}

// take returns the peak since the last take and starts a new one.
func (p *rssPeak) take() int64 { return p.max.Swap(rssBytes()) }

func (p *rssPeak) close() {
	close(p.stop)
	<-p.done
}

func pctMillis(d []time.Duration, p int) float64 {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[min(len(s)-1, len(s)*p/100)].Microseconds()) / 1000
}

// BenchmarkStageUnderAttack: honest greedy generations (8 prompts, 32
// tokens each, one at a time) through a 3-hop mesh on loopback of the
// 4-layer, dim-128 GPT, first unattacked, then while hostile peers each
// keep 64 stage streams to the first hop (floods of step-0 session
// requests, huge declared bodies trickled or never sent, idle streams) for
// 15 s, then once more after they leave. Reports the p50/p99 time of a
// generation step in both phases and their ratio (goal <= 2), the growth of
// the process's peak RSS over the unattacked phase's peak (goal < 256
// MiB; every node and the hostile peers run in this process), and the
// target's stage counters over the attack. It fails if an honest
// generation errors or its tokens differ from the unattacked run's.
//
// Sub-benchmarks: 8-peers is issue 12's attack; 3-peers the same from as
// many peers as the per-peer session quota (a quarter of the node's
// sessions) is meant to withstand; 8-peers-no-session-flood the 8 peers'
// stream attacks alone (their flooding streams stay idle).
//
// go test -run '^$' -bench StageUnderAttack -benchtime 1x ./node/
func BenchmarkStageUnderAttack(b *testing.B) {
	for _, c := range []struct {
		name    string
		peers   int
		noFlood bool
	}{{"8-peers", 8, false}, {"3-peers", 3, false}, {"8-peers-no-session-flood", 8, true}} {
		b.Run(c.name, func(b *testing.B) { stageUnderAttack(b, c.peers, c.noFlood) })
	}
}

func stageUnderAttack(b *testing.B, peers int, noFlood bool) {
	m := benchGPT(b, 4, 128)
	req, servers := benchMesh(b, m, nil, "0-1", "2-3", "4-5")
	target := servers[0] // the first hop of every honest route
	const tokens = 32
	var prompts [][]int64
	for i := range 8 {
		prompts = append(prompts, toTokens(fmt.Sprintf("honest prompt %d: the mesh", i)))
	}
	// round runs every prompt once, starting none past stopAt (if set);
	// want (nil the first time) is checked.
	round := func(want [][]int64, stopAt time.Time) (got [][]int64, steps []time.Duration, failed []string) {
		for i, p := range prompts {
			if !stopAt.IsZero() && time.Now().After(stopAt) {
				break
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			res, err := req.Generate(ctx, GenerateRequest{Model: m.ID, Prompt: p, MaxTokens: tokens}, nil)
			cancel()
			switch {
			case err != nil:
				failed = append(failed, fmt.Sprintf("prompt %d: %v", i, err))
				got = append(got, nil)
				continue
			case want != nil && !slices.Equal(res.Tokens, want[i]):
				failed = append(failed, fmt.Sprintf("prompt %d: tokens %v, unattacked %v", i, res.Tokens, want[i]))
			}
			got = append(got, res.Tokens)
			for j, s := range res.Steps {
				steps = append(steps, s.Total)
				if s.Total > 500*time.Millisecond {
					b.Logf("prompt %d step %d: %s, %d failovers, hop micros %v", i, j, s.Total.Round(time.Millisecond), s.Failovers, s.HopMicros)
				}
			}
		}
		return got, steps, failed
	}

	targetInfo, err := peer.AddrInfoFromString(target.Status().Addrs[0])
	if err != nil {
		b.Fatal(err)
	}
	route := []protocol.Hop{{Peer: target.mesh.ID().String(), Start: 0, End: 2}}
	runner, err := target.Runner(m.ID.String(), 0, 2)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		want, _, failed := round(nil, time.Time{}) // warm: connections, spans, routes
		if len(failed) > 0 {
			b.Fatalf("unattacked: %v", failed)
		}
		// What earlier sub-benchmarks left in this process goes back to
		// the OS first, so that the baseline is this mesh's.
		debug.FreeOSMemory()
		rss := startRSSPeak()
		var calm []time.Duration
		for range 2 {
			_, steps, failed := round(want, time.Time{})
			if len(failed) > 0 {
				b.Fatalf("unattacked: %v", failed)
			}
			calm = append(calm, steps...)
		}
		rssCalm := rss.take()
		before := target.mesh.StageStats()

		var attackers []*attacker
		for range peers {
			a := newAttacker(b, *targetInfo)
			a.noFlood = noFlood
			a.model, a.route, a.inputs = m.ID.String(), route, attackInputs(m.Manifest.Decoder)
			a.trickleHead = hugeHead(b, a.h.ID(), a.model, route, runner.Inputs(), 200<<20)
			attackers = append(attackers, a)
		}
		ctx, cancel := context.WithTimeout(context.Background(), attackFor)
		var wg sync.WaitGroup
		start := time.Now()
		for _, a := range attackers {
			wg.Go(func() { a.run(ctx, &wg) })
		}
		var peakSessions atomic.Int64
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			for ctx.Err() == nil {
				peakSessions.Store(max(peakSessions.Load(), int64(target.mesh.StageStats().Sessions)))
				time.Sleep(100 * time.Millisecond)
			}
		}()
		time.Sleep(attackRamp)
		var attacked []time.Duration
		var attackFailed []string // the first few
		failedN, generations := 0, 0
		var firstFailure time.Duration
		rounds := 0
		// No generation starts in the attack's last second, so that all of
		// them run under it.
		stopAt := start.Add(attackFor - time.Second)
		for rounds == 0 || time.Now().Before(stopAt) {
			_, steps, failed := round(want, stopAt)
			attacked = append(attacked, steps...)
			if failedN == 0 && len(failed) > 0 {
				firstFailure = time.Since(start)
			}
			failedN += len(failed)
			generations += len(steps)/tokens + len(failed)
			attackFailed = append(attackFailed, failed[:min(len(failed), 3-min(3, len(attackFailed)))]...)
			rounds++
		}
		during := target.mesh.StageStats()
		cancel()
		<-sampled
		wg.Wait()
		rssAttack := rss.take()
		var opened, resets, writes, answers, busy, flooded uint64
		var roles, held [4]uint64
		for _, a := range attackers {
			opened += a.opened.Load()
			resets += a.reset.Load()
			writes += a.writes.Load()
			flooded += a.flooded.Load()
			for r := range roles {
				roles[r] += a.roles[r].Load()
				held[r] += a.held[r].Load()
			}
			answers += a.answers.Load()
			busy += a.busy.Load()
			a.h.Close()
		}
		attackTook := time.Since(start)
		// After: the hostile peers are gone; their sessions are freed.
		_, _, afterFailed := round(want, time.Time{})
		rss.close()

		p99calm, p99attack := pctMillis(calm, 99), pctMillis(attacked, 99)
		firstFailed := ""
		if failedN > 0 {
			firstFailed = fmt.Sprintf(" (the first %s after the attack began)", firstFailure.Round(time.Millisecond))
		}
		growth := float64(rssAttack-rssCalm) / (1 << 20)
		b.ReportMetric(pctMillis(calm, 50), "p50_ms_unattacked")
		b.ReportMetric(p99calm, "p99_ms_unattacked")
		b.ReportMetric(pctMillis(attacked, 50), "p50_ms_attacked")
		b.ReportMetric(p99attack, "p99_ms_attacked")
		b.ReportMetric(p99attack/p99calm, "p99_ratio")
		b.ReportMetric(float64(rssCalm)/(1<<20), "rss_MiB_unattacked")
		b.ReportMetric(growth, "rss_MiB_growth")
		b.ReportMetric(float64(during.StreamsRefused-before.StreamsRefused), "streams_refused")
		b.ReportMetric(float64(during.StreamsTimedOut-before.StreamsTimedOut), "streams_timed_out")
		b.ReportMetric(float64(during.Busy-before.Busy), "busy")
		b.ReportMetric(float64(peakSessions.Load()), "peak_sessions")
		b.ReportMetric(float64(failedN), "honest_failed")
		b.Logf("unattacked: %d steps p50 %.2f ms p99 %.2f ms; attacked (%d rounds, %s): %d steps p50 %.2f ms p99 %.2f ms, ratio %.2f; %d of %d honest generations failed%s",
			len(calm), pctMillis(calm, 50), p99calm, rounds, attackTook.Round(time.Millisecond), len(attacked), pctMillis(attacked, 50), p99attack, p99attack/p99calm,
			failedN, generations, firstFailed)
		b.Logf("RSS peak %d MiB unattacked, %d MiB attacked (%+.1f MiB); target during the attack: %+d steps, %+d busy, %+d streams refused, %+d timed out, peak %d sessions",
			rssCalm>>20, rssAttack>>20, growth, during.Steps-before.Steps, during.Busy-before.Busy,
			during.StreamsRefused-before.StreamsRefused, during.StreamsTimedOut-before.StreamsTimedOut, peakSessions.Load())
		b.Logf("hostile peers: %d streams opened (by role flood/trickle/silent/idle %v, of which held over 1 s %v), %d ended, %d step-0 requests and %d huge heads and trickles written, %d answers received (%d busy)",
			opened, roles, held, resets, flooded, writes, answers, busy)
		if failedN > 0 || len(afterFailed) > 0 {
			b.Fatalf("honest generations failed: %d under attack (first: %q); %d after it %q", failedN, attackFailed, len(afterFailed), afterFailed)
		}
	}
}
