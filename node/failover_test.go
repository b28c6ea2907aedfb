package node

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
)

// kill stops a node the way a crash would: no goodbye record.
func kill(n *Node) {
	n.cancel()
	if n.api != nil {
		n.api.Close()
	}
	n.mesh.Kill()
	n.wg.Wait()
	for _, s := range n.served {
		s.span.Close()
	}
}

// Acceptance 2 of issue 4 (and 1 of issue 13): every span served by two
// peers; over 100 generations of 64 tokens, half of them sampled with a
// seed, a random serving node is killed in the middle of every fifth one
// (and a fresh node takes its place). Every generation completes with the
// tokens of the local run.
func TestFailoverKeepsGenerationsExact(t *testing.T) {
	if testing.Short() {
		t.Skip("100 generations")
	}
	spans := []string{"0-4", "0-4", "5-9", "5-9"}
	tm := startTestMesh(t, spans...)
	dir := tm.model.Dir
	boot := []string{tm.requester.Status().Addrs[0]}
	rng := rand.New(rand.NewPCG(7, 7))

	var mu sync.Mutex
	live := map[*Node]string{}
	for i, n := range tm.servers {
		live[n] = spans[i]
	}
	const gens, tokens = 100, 64
	kills, failovers := 0, 0
	for g := range gens {
		prompt := []int64(nil)
		for _, b := range []byte(fmt.Sprintf("generation %d:", g)) {
			prompt = append(prompt, int64(b))
		}
		// Half the generations sample (seeded): a failover must replay
		// the sampler's position too, not only the tokens.
		var sampling shards.Sampling
		if g%2 == 1 {
			sampling = shards.Sampling{Temperature: 0.8, TopK: 50, Seed: uint64(g)}
		}
		want, _ := localGenerateWith(t, tm.model, prompt, tokens, sampling)
		killAt := -1
		if g%5 == 0 {
			killAt = 1 + rng.IntN(tokens-2)
		}
		var wg sync.WaitGroup
		emitted := 0
		emit := func(int64) {
			emitted++
			if emitted != killAt {
				return
			}
			mu.Lock()
			var servers []*Node
			for n := range live {
				servers = append(servers, n)
			}
			slices.SortFunc(servers, func(a, b *Node) int { return compareIDs(a, b) })
			victim := servers[rng.IntN(len(servers))]
			span := live[victim]
			delete(live, victim)
			mu.Unlock()
			delay := time.Duration(rng.IntN(1500)) * time.Microsecond
			kills++
			wg.Go(func() {
				time.Sleep(delay) // lands inside the next step, or just before it
				t0 := time.Now()
				kill(victim)
				t1 := time.Now()
				fresh := startTestNode(t, boot, dir+":"+span)
				if testing.Verbose() {
					t.Logf("kill %s, restart %s", t1.Sub(t0).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
				}
				mu.Lock()
				live[fresh] = span
				mu.Unlock()
			})
		}
		genStart := time.Now()
		res, err := tm.requester.Generate(context.Background(), GenerateRequest{Model: tm.model.ID, Prompt: prompt, MaxTokens: tokens,
			Sampling: sampling, Options: mesh.InferOptions{StepTimeout: 5 * time.Second, ProgressFloor: 500 * time.Millisecond}}, emit)
		genTook := time.Since(genStart)
		wg.Wait()
		if testing.Verbose() && time.Since(genStart) > time.Second {
			t.Logf("generation %d took %s (generation itself %s)", g, time.Since(genStart).Round(time.Millisecond), genTook.Round(time.Millisecond))
		}
		if err != nil {
			t.Fatalf("generation %d: %v", g, err)
		}
		if !slices.Equal(res.Tokens, want) {
			t.Fatalf("generation %d: tokens %v, local run %v", g, res.Tokens, want)
		}
		for _, s := range res.Steps {
			failovers += s.Failovers
		}
	}
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for n := range live {
			if !slices.Contains(tm.servers, n) {
				n.Close()
			}
		}
	})
	t.Logf("%d generations complete and exact; %d nodes killed mid-generation, %d hops re-routed", gens, kills, failovers)
	if failovers == 0 {
		t.Fatal("no failover happened: the test did not exercise it")
	}
}

func compareIDs(a, b *Node) int {
	x, y := a.mesh.ID(), b.mesh.ID()
	switch {
	case x < y:
		return -1
	case x > y:
		return 1
	}
	return 0
}
