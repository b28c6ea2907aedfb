package mesh

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/shards"
)

// Issue 15, acceptance 2: four requesters, each span served by three
// replicas, 32 generations at once from each requester. The decode rings
// spread over the replicas: every replica's step count is within 25 % of
// its span's mean, and busy answers are under 5 % of the steps. Every
// generation's tokens equal the local run's.
//
// It runs without the race detector (make test runs it so): under it,
// loopback RTTs measure tens of milliseconds, apart by as much, and routes
// rightly follow such differences more than the load.
func TestConcurrentGenerationsSpreadOverReplicas(t *testing.T) {
	if raceEnabled {
		t.Skip("a timing measurement: make test runs it without -race")
	}
	const (
		replicas   = 3
		requesters = 4
		perReq     = 32
		tokens     = 12
		// blockMicros is the compute time the servers advertise per
		// block: 1 ms, as a real model's layer takes on a CPU. (This
		// test model's take about 0.1 ms, the order of the noise in the
		// RTTs that loopback coordinates estimate: with that, routes
		// rightly follow the noise as much as the load.)
		blockMicros = 1000
		// nearEqual is how far apart a span's replicas may look
		// before the generations start.
		nearEqual = 300 * time.Microsecond
	)
	sm := newGPTServingMesh(t)             // 6 blocks: spans 0-2 and 3-5
	sm.coordEvery = 100 * time.Millisecond // coordinates settle in seconds, not tens
	first := sm.start(t, nil, nil)
	boot := []peer.AddrInfo{addrInfo(first)}
	spans := [][2]int{{0, 3}, {3, 6}}
	servers := make([][]*Mesh, len(spans))
	for i, s := range spans {
		for range replicas {
			servers[i] = append(servers[i], sm.start(t, boot, &s, gptSpan(sm, s[0], s[1], blockMicros)))
		}
	}
	reqs := []*Mesh{first}
	for len(reqs) < requesters {
		reqs = append(reqs, sm.start(t, boot, nil))
	}
	sm.connectAll(t)
	for _, r := range reqs {
		r.View().SetManifest(sm.model.ID, sm.model.Manifest)
		viewOf(t, r, sm, len(spans)*replicas)
	}
	// The replicas are equally near (loopback), but the network
	// coordinates the requesters estimate RTTs from need some rounds to
	// say so; until then they differ by milliseconds, more than the spans'
	// compute, and rightly send everyone to the replicas that look near.
	began := time.Now()
	waitFor(t, 60*time.Second, "the requesters see the replicas of each span as equally near", func() (bool, string) {
		for _, r := range reqs {
			mv, err := r.View().Model(context.Background(), sm.model.ID)
			if err != nil {
				return false, err.Error()
			}
			for _, s := range spans {
				lo, hi := time.Hour, time.Duration(0)
				for _, pv := range mv.Peers {
					if pv.Span.Start == s[0] {
						lo, hi = min(lo, pv.RTT), max(hi, pv.RTT)
					}
				}
				if hi-lo > nearEqual {
					return false, fmt.Sprintf("%s sees blocks %d-%d's replicas %s to %s away", r.ID().ShortString(), s[0], s[1]-1, lo, hi)
				}
			}
		}
		return true, ""
	})
	t.Logf("coordinates settled in %s", time.Since(began).Round(time.Millisecond))
	prompt := byteTokens("many hands make light work")
	want := localTokens(t, sm, prompt, tokens)[len(prompt):]
	spec := sm.model.Manifest.Decoder

	before := make([][]StageStats, len(spans))
	for i := range servers {
		for _, s := range servers[i] {
			before[i] = append(before[i], s.StageStats())
		}
	}
	var failovers, resumes atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, requesters*perReq)
	for _, r := range reqs {
		for range perReq {
			wg.Go(func() {
				s := r.NewSession(sm.model.ID, InferOptions{})
				defer s.Close()
				var got []int64
				err := s.Ring(context.Background(), RingOptions{Prompt: shards.StepInputs(spec, prompt, 0),
					Positions: len(prompt), MaxTokens: tokens, Decoder: spec}, func(tok RingToken) bool {
					got = append(got, tok.Token)
					failovers.Add(int64(tok.Info.Failovers))
					resumes.Add(int64(tok.Info.Resumes))
					return true
				})
				if err == nil && !slices.Equal(got, want) {
					err = fmt.Errorf("tokens %v, want %v", got, want)
				}
				errs <- err
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	var steps, busy uint64
	var report []string
	for i := range servers {
		var n []float64
		for j, s := range servers[i] {
			st := s.StageStats()
			d := st.Steps - before[i][j].Steps
			steps += d
			busy += st.Busy - before[i][j].Busy
			n = append(n, float64(d))
		}
		var mean float64
		for _, v := range n {
			mean += v / float64(len(n))
		}
		worst := 0.0
		for _, v := range n {
			worst = max(worst, math.Abs(v-mean)/mean)
		}
		report = append(report, fmt.Sprintf("blocks %d-%d: steps %v (mean %.0f, worst %.1f %% off)", spans[i][0], spans[i][1]-1, n, mean, 100*worst))
		if worst > 0.25 {
			t.Errorf("blocks %d-%d: a replica's steps are %.1f %% off their mean (%v), want within 25 %%", spans[i][0], spans[i][1]-1, 100*worst, n)
		}
	}
	t.Logf("%d generations of %d tokens; %s; busy answers %d of %d steps (%.2f %%); %d steps resumed, %d rings rebuilt",
		requesters*perReq, tokens, strings.Join(report, "; "), busy, steps, 100*float64(busy)/float64(max(steps, 1)),
		resumes.Load(), failovers.Load())
	if float64(busy) >= 0.05*float64(steps) {
		t.Errorf("busy answers %d of %d steps, want under 5 %%", busy, steps)
	}
}
