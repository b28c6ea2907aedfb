package node

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Acceptance 3 of issue 4: flood a node that takes one step at a time. It
// turns the excess away busy at once, callers re-route to the other server
// of its span, every request completes with the right answer, nothing
// deadlocks, and memory comes back down.
func TestFloodGetsBusyAndReroutes(t *testing.T) {
	tm := startTestMesh(t, "0-4", "0-4", "5-9", "5-9")
	narrow := tm.servers[0]
	narrow.mesh.Serve(narrow, mesh.StageConfig{MaxInFlight: 1})
	m := tm.model

	local := localSpan(t, m)
	in := shards.RandomInputs(m.Manifest, 3, 1, 8)
	want, err := local.Run(in)
	if err != nil {
		t.Fatal(err)
	}

	runtime.GC()
	goroutines0 := runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heap0 := ms.HeapInuse

	const callers, each = 48, 4
	var wg sync.WaitGroup
	errs := make(chan error, callers*each)
	var mu sync.Mutex
	failovers := 0
	start := time.Now()
	for range callers {
		wg.Go(func() {
			for range each {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				// Prefer the narrow node: callers go to it first and must
				// be turned away to the other server of its span.
				res, err := tm.requester.Infer(ctx, m.ID, in, mesh.InferOptions{MaxFailovers: 32, Avoid: []peer.ID{tm.servers[1].mesh.ID()}})
				cancel()
				if err != nil {
					errs <- err
					continue
				}
				if d, err := protocol.MaxAbsDiff(want["logits"], res.Outputs["logits"]); err != nil || d > 1e-5 {
					errs <- fmt.Errorf("wrong answer: diff %v (%v)", d, err)
				}
				mu.Lock()
				failovers += res.Info.Failovers
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("a flooded request failed: %v", err)
	}
	st := narrow.mesh.StageStats()
	t.Logf("%d requests in %s: %d failovers; the narrow node ran %d steps, turned %d away busy, peak in flight %d",
		callers*each, time.Since(start).Round(time.Millisecond), failovers, st.Steps, st.Busy, st.PeakInFlight)
	if st.Busy == 0 || failovers == 0 {
		t.Fatalf("the flood never made the narrow node busy (busy %d, failovers %d)", st.Busy, failovers)
	}
	if st.PeakInFlight > 1 {
		t.Fatalf("the narrow node ran %d steps at once, limit 1", st.PeakInFlight)
	}

	// Bounded: goroutines and heap come back near where they were.
	time.Sleep(200 * time.Millisecond)
	runtime.GC()
	runtime.ReadMemStats(&ms)
	if g := runtime.NumGoroutine(); g > goroutines0+50 {
		t.Errorf("goroutines: %d before the flood, %d after", goroutines0, g)
	}
	if grew := int64(ms.HeapInuse) - int64(heap0); grew > 64<<20 {
		t.Errorf("heap grew by %d MiB over the flood", grew>>20)
	}
}
