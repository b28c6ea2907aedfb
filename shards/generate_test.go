package shards

import (
	"math/rand/v2"
	"testing"
)

// Top-p keeps only the most likely tokens whose probability adds up to p.
func TestTopP(t *testing.T) {
	// After temperature 1: token 3 has probability ~0.64, token 1 ~0.24,
	// the other two ~0.06 each.
	logits := []float32{0, 1, 0, 2}
	count := func(s Sampling) map[int64]int {
		rng := rand.New(rand.NewPCG(1, 2))
		seen := map[int64]int{}
		for range 2000 {
			seen[s.pick(logits, rng)]++
		}
		return seen
	}
	if got := count(Sampling{Temperature: 1, TopP: 0.5}); len(got) != 1 || got[3] != 2000 {
		t.Fatalf("top_p 0.5: picked %v, want only token 3", got)
	}
	if got := count(Sampling{Temperature: 1, TopP: 0.8}); len(got) != 2 || got[3] == 0 || got[1] == 0 {
		t.Fatalf("top_p 0.8: picked %v, want tokens 3 and 1", got)
	}
	if got := count(Sampling{Temperature: 1, TopP: 1}); len(got) != 4 {
		t.Fatalf("top_p 1: picked %v, want every token", got)
	}
	if got := count(Sampling{TopP: 0.1}); len(got) != 1 || got[3] != 2000 {
		t.Fatalf("greedy ignores top_p: picked %v", got)
	}
}
