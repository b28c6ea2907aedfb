package node

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// Acceptance 4 of issue 13: a client that drops a streamed chat mid-way
// leaves no running decode ring and no session at any hop within 2 s.
func TestDroppedStreamStopsTheRing(t *testing.T) {
	m, err := build.GPT(build.GPTConfig{Layers: 8, Dim: 64, Heads: 2, Context: 4096, Seed: 5}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	tm := startMeshOf(t, m, "0-3", "4-6", "7-9")
	last := tm.servers[2]
	const maxTokens = 4000
	body, _ := json.Marshal(map[string]any{"model": m.ID.String(), "stream": true, "max_tokens": maxTokens, "temperature": 0,
		"messages": []map[string]string{{"role": "user", "content": "tell me everything"}}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "POST", "http://"+tm.requester.APIAddr()+"/v1/chat/completions", strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	// Read a few tokens' events, then drop the connection.
	sc := bufio.NewScanner(resp.Body)
	events := 0
	for events < 5 && sc.Scan() {
		if strings.HasPrefix(sc.Text(), "data: ") {
			events++
		}
	}
	if events < 5 {
		t.Fatalf("only %d events before the stream ended: %v", events, sc.Err())
	}
	// The ring runs ahead of the client: the last hop steps on.
	first := last.mesh.StageStats().Steps
	for i := 0; last.mesh.StageStats().Steps < first+10; i++ {
		if i > 500 {
			t.Fatalf("the last hop ran %d steps in 5 s", last.mesh.StageStats().Steps-first)
		}
		time.Sleep(10 * time.Millisecond)
	}
	before := last.mesh.StageStats()
	cancel()
	resp.Body.Close()
	dropped := time.Now()

	deadline := dropped.Add(2 * time.Second)
	for {
		busy := false
		for _, n := range tm.servers {
			if st := n.mesh.StageStats(); st.Sessions > 0 || st.InFlight > 0 || st.Waiting > 0 {
				busy = true
			}
		}
		if !busy {
			break
		}
		if time.Now().After(deadline) {
			for i, n := range tm.servers {
				t.Errorf("hop %d: %+v", i, n.mesh.StageStats())
			}
			t.Fatal("sessions or steps still at the hops 2 s after the client left")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopped := time.Since(dropped)
	// The ring must not be running still, merely between steps: the last
	// hop's step count stays put from here on.
	settled := last.mesh.StageStats().Steps
	time.Sleep(300 * time.Millisecond)
	after := last.mesh.StageStats()
	t.Logf("client left after %d events; hops clear %s later; the last hop ran %d steps after the drop (max tokens %d)",
		events, stopped.Round(time.Millisecond), settled-before.Steps, maxTokens)
	if after.Steps != settled {
		t.Fatalf("the last hop ran %d more steps after the hops were clear: the ring still runs", after.Steps-settled)
	}
	if settled-before.Steps > maxTokens/2 {
		t.Fatalf("the last hop ran %d steps after the drop: the ring ran on", settled-before.Steps)
	}
}

// The API runs a decode ring by default; decode_loop "requester" runs the
// loop at the node, with the same tokens; anything else is a 400.
func TestAPIDecodeLoop(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	var tokens [][]int64
	for _, loop := range []string{"", "ring", "requester"} {
		resp := post(t, tm.requester, "/v1/generate", map[string]any{"model": model, "prompt": "loops", "max_tokens": 24,
			"temperature": 0.8, "seed": 3, "decode_loop": loop})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("decode_loop %q: %s", loop, resp.Status)
		}
		var g GenerateResponse
		if err := json.NewDecoder(resp.Body).Decode(&g); err != nil {
			t.Fatal(err)
		}
		if len(g.Tokens) != 24 {
			t.Fatalf("decode_loop %q: %d tokens", loop, len(g.Tokens))
		}
		tokens = append(tokens, g.Tokens)
	}
	for i := 1; i < len(tokens); i++ {
		if !slices.Equal(tokens[i], tokens[0]) {
			t.Fatalf("decode loops disagree: %v vs %v", tokens[i], tokens[0])
		}
	}
	resp := post(t, tm.requester, "/v1/generate", map[string]any{"model": model, "prompt": "loops", "decode_loop": "spiral"})
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("decode_loop spiral: %s, want 400", resp.Status)
	}
}

// A hop that answers a ring's step busy (at its limit) gets the step again
// on the same route after a pause: the hops before it answer it from what
// they kept, nothing is replayed, and the tokens stay those of the local
// run.
func TestRingResumesAtABusyHop(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	narrow := tm.servers[1]
	// One session at a time: a ring's first step there, which opens its
	// session, is refused busy while another ring holds it. (The later
	// steps of an open session wait for a slot rather than get busy: held
	// steps.)
	narrow.mesh.Serve(narrow, mesh.StageConfig{MaxInFlight: 1, MaxSessions: 1})
	const gens, tokens = 4, 16
	var wg sync.WaitGroup
	results := make([]*GenerateResult, gens)
	errs := make([]error, gens)
	prompts := make([][]int64, gens)
	for i := range gens {
		prompts[i] = toTokens(fmt.Sprintf("busy %d", i))
		wg.Go(func() {
			results[i], errs[i] = tm.requester.Generate(context.Background(), GenerateRequest{Model: tm.model.ID, Prompt: prompts[i], MaxTokens: tokens,
				Sampling: shards.Sampling{Temperature: 0.7, Seed: uint64(i)}}, nil)
		})
	}
	wg.Wait()
	resumes, restarts := 0, 0
	for i := range gens {
		if errs[i] != nil {
			t.Fatalf("generation %d: %v", i, errs[i])
		}
		want, _ := localGenerateWith(t, tm.model, prompts[i], tokens, shards.Sampling{Temperature: 0.7, Seed: uint64(i)})
		if !slices.Equal(results[i].Tokens, want) {
			t.Fatalf("generation %d: %v, local run %v", i, results[i].Tokens, want)
		}
		for _, s := range results[i].Steps {
			resumes += s.Resumes
			restarts += s.Failovers
		}
	}
	st := narrow.mesh.StageStats()
	t.Logf("%d rings through a hop that holds one session at a time: %d busy answers, %d steps resumed, %d rings restarted", gens, st.Busy, resumes, restarts)
	if st.Busy == 0 || resumes == 0 {
		t.Fatalf("the hop was never busy (%d) or no step resumed (%d): the test did not exercise resuming", st.Busy, resumes)
	}
}
