package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards"
)

// Acceptance 4 of issue 6, the part a test can hold: many concurrent API
// clients mixing every kind of request (passes, streamed and whole
// generations, chats, jobs, streams the client drops half-way) get only
// answers or 429s, and once they are gone the node is back where it
// started: no goroutine left behind, no heap kept. (The 200-client, 30 s
// figures are BenchmarkAPILoad's, in BENCHMARKS.md.)
func TestNoGrowthAfterLoad(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	base := "http://" + tm.requester.APIAddr()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()

	in := shards.StepInputs(tm.model.Manifest.Decoder, []int64{'a'}, 0)
	inferBody, _ := json.Marshal(InferRequest{Model: model, Inputs: in})
	batch := shards.StepInputs(tm.model.Manifest.Decoder, []int64{'a', 'b', 'c', 'd'}, 0)
	jobBody, _ := json.Marshal(map[string]any{"model": model, "inputs": batch, "micro_batch": 2})
	genBody := func(stream bool) []byte {
		b, _ := json.Marshal(map[string]any{"model": model, "prompt": "load", "max_tokens": 8, "stream": stream})
		return b
	}
	chatBody, _ := json.Marshal(map[string]any{"model": model, "max_tokens": 6,
		"messages": []map[string]string{{"role": "user", "content": "hi"}}})

	// One request of kind k; returns its status (0: the client dropped it
	// on purpose).
	call := func(k int) (int, error) {
		path, body := "/v1/infer", inferBody
		drop := false
		switch k % 6 {
		case 1:
			path, body = "/v1/generate", genBody(false)
		case 2:
			path, body = "/v1/generate", genBody(true)
		case 3:
			path, body = "/v1/chat/completions", chatBody
		case 4:
			path, body = "/v1/jobs", jobBody
		case 5:
			path, body, drop = "/v1/generate", genBody(true), true
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(r)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		if drop {
			var b [16]byte
			resp.Body.Read(b[:]) // the first bytes of the stream, then hang up
			cancel()
			return 0, nil
		}
		io.Copy(io.Discard, resp.Body)
		if k%6 == 4 && resp.StatusCode == http.StatusAccepted {
			return http.StatusOK, nil
		}
		return resp.StatusCode, nil
	}

	load := func(clients int, d time.Duration) (map[int]int, []error) {
		var mu sync.Mutex
		statuses := map[int]int{}
		var errs []error
		stop := time.Now().Add(d)
		var wg sync.WaitGroup
		for c := range clients {
			wg.Go(func() {
				for k := c; time.Now().Before(stop); k += clients {
					code, err := call(k)
					mu.Lock()
					if err != nil {
						errs = append(errs, err)
					} else {
						statuses[code]++
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		return statuses, errs
	}
	settle := func() (int, uint64) {
		client.CloseIdleConnections()
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return runtime.NumGoroutine(), ms.HeapInuse
	}

	// A warm-up round first: connections, sessions and caches that live as
	// long as the node are made here, not counted as growth.
	load(8, 500*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	g0, heap0 := settle()

	statuses, errs := load(64, 3*time.Second)
	if len(errs) > 0 {
		t.Fatalf("%d client errors, first: %v", len(errs), errs[0])
	}
	total := 0
	for code, n := range statuses {
		total += n
		if code != http.StatusOK && code != http.StatusTooManyRequests && code != 0 {
			t.Errorf("%d answers with status %d", n, code)
		}
	}
	if statuses[http.StatusOK] == 0 {
		t.Fatalf("no request succeeded: %v", statuses)
	}
	t.Logf("%d requests: %v (0: streams the client dropped)", total, statuses)

	// Jobs finish in the background and dropped streams end when the node
	// notices: give them a few seconds, bounded.
	var g1 int
	var heap1 uint64
	deadline := time.Now().Add(15 * time.Second)
	for {
		g1, heap1 = settle()
		if g1 <= g0+4 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	grown := float64(int64(heap1)-int64(heap0)) / (1 << 20)
	t.Logf("goroutines %d -> %d; heap in use %.1f -> %.1f MiB (%+.1f)", g0, g1, float64(heap0)/(1<<20), float64(heap1)/(1<<20), grown)
	if g1 > g0+4 {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Fatalf("goroutines grew from %d to %d after the load:\n%s", g0, g1, buf)
	}
	// Finished jobs keep their outputs for a while (jobRetention), a few KiB
	// each; anything like the load's traffic (hundreds of MiB) is a leak.
	if grown > 16 {
		t.Fatalf("heap in use grew by %.1f MiB after the load", grown)
	}
	// And the node still answers.
	var st Status
	resp, err := client.Get(base + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || st.ID == "" {
		t.Fatal(fmt.Errorf("status after the load: %v", err))
	}
}
