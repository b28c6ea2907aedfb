package simulations

import (
	"context"
	"fmt"
	"math"
	"strings"
	"testing"
)

// chain3 is an explicit topology: a requester D ms one-way from each of
// three hops that serve a third of a 6-block model each (2 ms a pass) and
// are 2 ms apart, one generation a second (each done well before the next
// arrives: no queueing), no jitter. %[1]g is D, %[2]s the decode mode.
const chain3 = `
name: chain3
seed: 5
duration_s: 12
model: {blocks: 6, block_mb: 100, activation_kb: 4}
network:
  nodes:
    - {name: r, requester: true}
    - {name: h1, start: 0, end: 2, block_us: 1000}
    - {name: h2, start: 2, end: 4, block_us: 1000}
    - {name: h3, start: 4, end: 6, block_us: 1000}
  latency_ms:
    - [0, %[1]g, %[1]g, %[1]g]
    - [%[1]g, 0, 2, 2]
    - [%[1]g, 2, 0, 2]
    - [%[1]g, 2, 2, 0]
workload: {rate: 1, arrivals: uniform, generate: 1, prompt: {dist: const, mean: 20}, output: {dist: const, mean: 32},
  max_requests: 8, decode: %[2]s}
`

func chain(t *testing.T, oneWayMS float64, decode string) Summary {
	t.Helper()
	res := run(t, parse(t, fmt.Sprintf(chain3, oneWayMS, decode)))
	if s := res.Summary; s.Completed != 8 || s.Failed != 0 || s.Failovers != 0 || s.Hops != 3 {
		t.Fatalf("%s, requester %g ms away: %d completed, %d failed, %d failovers, %v hops", decode, oneWayMS, s.Completed, s.Failed,
			s.Failovers, s.Hops)
	}
	return res.Summary
}

// TestRingTiming: in a decode ring the per-token loop is hop 1 -> hop 2 ->
// hop 3 -> hop 1, so the requester's distance leaves the per-token time
// alone; in the requester loop every token pays the requester's round
// trip. Either way the first token pays it once (the prompt in, the token
// out), and the ring's first token is the requester loop's.
func TestRingTiming(t *testing.T) {
	const near, far = 2.0, 40.0
	rtt := 2 * (far - near) / 1e3 // what moving the requester adds to a round trip, s
	// Per message: the link, the 300 µs hop overhead and 4 KB at the
	// default 1000 Mbps (32 µs); per hop 2 ms of compute.
	const leg = 2e-3 + 300e-6 + 32e-6
	ringNear, ringFar := chain(t, near, DecodeRing), chain(t, far, DecodeRing)
	loopNear, loopFar := chain(t, near, DecodeRequester), chain(t, far, DecodeRequester)

	// The ring's period: three passes and three legs between hops (two
	// forward, one closing the ring), wherever the requester is.
	if want := 3*2e-3 + 3*leg; math.Abs(ringNear.PerToken.P50-want) > 1e-6 {
		t.Fatalf("ring per-token %v, want %v (3 passes + 3 hop legs)", ringNear.PerToken.P50, want)
	}
	if d := ringFar.PerToken.P50 - ringNear.PerToken.P50; math.Abs(d) > 1e-6 {
		t.Fatalf("ring per-token %v with the requester %g ms away, %v at %g ms: it moved %v", ringFar.PerToken.P50, far,
			ringNear.PerToken.P50, near, d)
	}
	// The requester loop: two legs between hops and two to and from the
	// requester per token.
	if want := 3*2e-3 + 2*leg + 2*(near/1e3+300e-6+32e-6); math.Abs(loopNear.PerToken.P50-want) > 1e-6 {
		t.Fatalf("requester-loop per-token %v, want %v", loopNear.PerToken.P50, want)
	}
	if d := loopFar.PerToken.P50 - loopNear.PerToken.P50; math.Abs(d-rtt) > 1e-6 {
		t.Fatalf("requester-loop per-token grew by %v moving the requester, want a round trip's growth %v", d, rtt)
	}
	// The first token: the same in both modes, and one round trip more
	// far away.
	for _, p := range [][2]Summary{{ringNear, loopNear}, {ringFar, loopFar}} {
		if math.Abs(p[0].TTFT.P50-p[1].TTFT.P50) > 1e-6 {
			t.Fatalf("TTFT %v in the ring, %v in the requester loop", p[0].TTFT.P50, p[1].TTFT.P50)
		}
	}
	if d := ringFar.TTFT.P50 - ringNear.TTFT.P50; math.Abs(d-rtt) > 1e-6 {
		t.Fatalf("ring TTFT grew by %v moving the requester, want %v", d, rtt)
	}
	// End to end: the ring pays the distance once, the loop once a token.
	if d := ringFar.E2E.P50 - ringNear.E2E.P50; math.Abs(d-rtt) > 1e-6 {
		t.Fatalf("ring e2e grew by %v, want %v", d, rtt)
	}
	if d := loopFar.E2E.P50 - loopNear.E2E.P50; math.Abs(d-32*rtt) > 1e-6 {
		t.Fatalf("requester-loop e2e grew by %v, want 32 round trips' %v", d, 32*rtt)
	}
}

// redundant is chain3 with a spare second hop (s2, slower than h2, so
// routes avoid it until h2 fails) and one generation of 64 tokens.
const redundant = `
name: redundant
seed: 5
duration_s: 30
model: {blocks: 6, block_mb: 100, activation_kb: 4}
network:
  nodes:
    - {name: r, requester: true}
    - {name: h1, start: 0, end: 2, block_us: 1000}
    - {name: h2, start: 2, end: 4, block_us: 1000}
    - {name: h3, start: 4, end: 6, block_us: 1000}
    - {name: s2, start: 2, end: 4, block_us: 1500}
  latency_ms:
    - [0, %[1]g, %[1]g, %[1]g, %[1]g]
    - [%[1]g, 0, 2, 2, 2]
    - [%[1]g, 2, 0, 2, 2]
    - [%[1]g, 2, 2, 0, 2]
    - [%[1]g, 2, 2, 2, 0]
workload: {rate: 1, arrivals: uniform, generate: 1, prompt: {dist: const, mean: 20}, output: {dist: const, mean: 64},
  max_requests: 1, decode: %[2]s}
`

// failover runs one generation on redundant; with leaveAt > 0, h2 leaves
// gracefully then.
func failover(t *testing.T, oneWayMS float64, decode string, leaveAt float64) *Result {
	t.Helper()
	sc := parse(t, fmt.Sprintf(redundant, oneWayMS, decode))
	s, err := newSim(context.Background(), sc)
	if err != nil {
		t.Fatal(err)
	}
	if leaveAt > 0 {
		s.q.push(event{t: int64(leaveAt * 1e9), kind: evLeave, a: 2})
	}
	if err := s.run(nil); err != nil {
		t.Fatal(err)
	}
	res := s.collect()
	if res.Summary.Completed != 1 || res.Summary.Failed != 0 {
		t.Fatalf("%s, %g ms: %d completed, %d failed", decode, oneWayMS, res.Summary.Completed, res.Summary.Failed)
	}
	return res
}

// TestRingFailover: when a hop leaves mid-generation, the ring restarts on
// a new route and replays the prompt and the tokens so far as ring turns,
// so what the failover costs depends on the requester's distance by one
// one-way leg (the failure's notice; the restarted prompt's leg replaces
// the first one, the last token's way back is the same), not on how many
// tokens are replayed. The requester loop replays each step as a round
// trip from the requester: a round trip's growth per replayed token.
func TestRingFailover(t *testing.T) {
	const near, far = 2.0, 40.0
	rtt := 2 * (far - near) / 1e3
	cost := func(oneWayMS float64, decode string, leaveAt float64) (float64, int) {
		base := failover(t, oneWayMS, decode, 0)
		hit := failover(t, oneWayMS, decode, leaveAt)
		if hit.Summary.Failovers != 1 || hit.Summary.Replays < 10 || hit.Summary.Replays > 50 {
			t.Fatalf("%s, %g ms: %d failovers, %d replays", decode, oneWayMS, hit.Summary.Failovers, hit.Summary.Replays)
		}
		// The spare serves every step after the failure, replayed or
		// new, and none before: the prompt and 63 one-token steps (the
		// 64th token needs no step after it), two blocks each.
		if spare, want := passes(hit)["s2"], int64(2*(20+63)); spare != want {
			t.Fatalf("%s, %g ms: the spare ran %d block passes, want %d", decode, oneWayMS, spare, want)
		}
		return hit.Summary.E2E.P50 - base.Summary.E2E.P50, hit.Summary.Replays
	}
	// A third to a half of the way into each generation.
	ringNear, rn := cost(near, DecodeRing, 0.4)
	ringFar, rf := cost(far, DecodeRing, 0.4)
	if d := ringFar - ringNear; d < 0.5*(far-near)/1e3 || d > 2*(far-near)/1e3 {
		t.Fatalf("ring failover cost %v far, %v near (%d, %d tokens replayed): +%v, want about one one-way leg's growth %v",
			ringFar, ringNear, rf, rn, d, (far-near)/1e3)
	}
	loopNear, ln := cost(near, DecodeRequester, 0.55)
	loopFar, lf := cost(far, DecodeRequester, 2.8)
	if d := loopFar - loopNear; d < 0.8*float64(min(ln, lf))*rtt || d > 1.2*float64(max(ln, lf))*rtt+2*rtt {
		t.Fatalf("requester-loop failover cost %v far (%d replayed), %v near (%d): +%v, want about a round trip's growth %v per replay",
			loopFar, lf, loopNear, ln, d, rtt)
	}
}

// TestDecodeField: ring is the default, requester the alternative, and
// nothing else.
func TestDecodeField(t *testing.T) {
	if d := parse(t, small).Workload.Decode; d != DecodeRing {
		t.Fatalf("default decode %q, want ring", d)
	}
	sc := parse(t, small)
	if err := sc.Set("workload.decode", "requester"); err != nil || sc.Clone().Workload.Decode != DecodeRequester {
		t.Fatalf("Set decode requester: %v, %q", err, sc.Workload.Decode)
	}
	if err := sc.Set("workload.decode", "client"); err == nil || !strings.Contains(err.Error(), `workload.decode: must be ring or requester, is "client"`) {
		t.Fatalf("Set decode client: %v", err)
	}
	if p := run(t, sc).Params; !strings.Contains(strings.Join(p, "\n"), "decode: requester loop") {
		t.Fatalf("params %v name no requester loop", p)
	}
}

// narrow is chain3 with a middle hop of one slot and no queue (it answers
// busy at once when a step finds it computing), no spare for it, and
// max_requests generations arriving 5 ms apart: their rings collide at h2.
const narrow = `
name: narrow
seed: 5
duration_s: 20
model: {blocks: 6, block_mb: 100, activation_kb: 4}
network:
  nodes:
    - {name: r, requester: true}
    - {name: h1, start: 0, end: 2, block_us: 1000}
    - {name: h2, start: 2, end: 4, block_us: 1000, slots: 1, queue: 0}
    - {name: h3, start: 4, end: 6, block_us: 1000}
  latency_ms:
    - [0, 10, 10, 10]
    - [10, 0, 2, 2]
    - [10, 2, 0, 2]
    - [10, 2, 2, 0]
workload: {rate: 200, arrivals: uniform, generate: 1, prompt: {dist: const, mean: 20}, output: {dist: const, mean: 32},
  max_requests: %d}
`

// TestRingResumesAtABusyHop: rings that find a one-slot hop busy send the
// step again on the same route after mesh.RetryPause (Session.ring, SPEC
// "Busy hops"): every generation completes with no ring restarted and
// nothing replayed, and the hop before the busy one answers the resumed
// steps from what it kept, so every hop computes each step exactly once.
func TestRingResumesAtABusyHop(t *testing.T) {
	const gens = 4
	res := run(t, parse(t, fmt.Sprintf(narrow, gens)))
	s := res.Summary
	if s.Completed != gens || s.Failed != 0 {
		t.Fatalf("%d completed, %d failed, want %d and 0", s.Completed, s.Failed, gens)
	}
	if s.Resumes == 0 || s.Failovers != 0 || s.Busy != 0 || s.Replays != 0 {
		t.Fatalf("%d resumes, %d failovers (%d busy), %d replays: want resumes and no restart", s.Resumes, s.Failovers, s.Busy, s.Replays)
	}
	// Each hop: 2 blocks of the 20-token prompt and of 31 one-token steps
	// per generation.
	want := int64(gens * 2 * (20 + 31))
	for name, n := range passes(res) {
		if name != "r" && n != want {
			t.Fatalf("%s ran %d block passes, want %d (each step once): %v", name, n, want, passes(res))
		}
	}
	// Each resume pauses at least mesh.RetryPause(0), 100 ms, in some
	// generation's way.
	if s.E2E.Max < 0.1 {
		t.Fatalf("e2e max %v s with %d resumes: no pause", s.E2E.Max, s.Resumes)
	}
}

// TestHeldStepsWait: at a hop with one slot and room for one waiting step,
// the later steps of the sessions it holds wait their turn however many
// wait (held steps, as the stage server queues them): only a step that
// opens a session there may be refused busy: eight rings arriving 0.5 ms
// apart resume at most once each and none is rebuilt (counting every
// step against the bound, they resumed 17 times and two rings were
// rebuilt).
func TestHeldStepsWait(t *testing.T) {
	const gens = 8
	sc := strings.NewReplacer("slots: 1, queue: 0", "slots: 1, queue: 1", "rate: 200,", "rate: 2000,").Replace(fmt.Sprintf(narrow, gens))
	res := run(t, parse(t, sc))
	s := res.Summary
	if s.Completed != gens || s.Failed != 0 {
		t.Fatalf("%d completed, %d failed, want %d and 0", s.Completed, s.Failed, gens)
	}
	t.Logf("%d generations: %d resumes, %d failovers (%d busy)", gens, s.Resumes, s.Failovers, s.Busy)
	if s.Resumes > gens || s.Failovers != 0 {
		t.Fatalf("%d resumes, %d failovers: steps of held sessions were refused busy", s.Resumes, s.Failovers)
	}
}
