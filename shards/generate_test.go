package shards

import (
	"math"
	"testing"
)

// Top-p keeps only the most likely tokens whose probability adds up to p.
func TestTopP(t *testing.T) {
	// After temperature 1: token 3 has probability ~0.64, token 1 ~0.24,
	// the other two ~0.06 each.
	logits := []float32{0, 1, 0, 2}
	count := func(s Sampling) map[int64]int {
		seen := map[int64]int{}
		for i := range 2000 {
			seen[s.Pick(logits, i)]++
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

// Pick's draw depends on the seed and the token's index only: the same
// pair picks the same token whatever was drawn before (a failover's replay
// and the last hop of a route sample as a local run does), and over many
// indices the picks follow the distribution.
func TestPickByIndex(t *testing.T) {
	logits := []float32{0, 1, 0, 2}
	s := Sampling{Temperature: 1, Seed: 42}
	first := make([]int64, 500)
	for i := range first {
		first[i] = s.Pick(logits, i)
	}
	for i := len(first) - 1; i >= 0; i-- { // in another order: the same
		if got := s.Pick(logits, i); got != first[i] {
			t.Fatalf("index %d: %d, then %d", i, first[i], got)
		}
	}
	other, same := Sampling{Temperature: 1, Seed: 43}, 0
	for i := range first {
		if other.Pick(logits, i) == first[i] {
			same++
		}
	}
	if same == len(first) {
		t.Fatal("seeds 42 and 43 picked the same 500 tokens")
	}
	n := 0
	for i := range 20000 {
		if s.Pick(logits, i) == 3 {
			n++
		}
	}
	// p(3) = e^2 / (1 + e + 1 + e^2) = 0.6103
	want := math.Exp(2) / (2 + math.E + math.Exp(2))
	if got := float64(n) / 20000; math.Abs(got-want) > 0.02 {
		t.Fatalf("token 3 picked %.3f of the time, want %.3f", got, want)
	}
}
