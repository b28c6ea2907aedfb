package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// BenchmarkMeshScale starts a mesh of N nodes on loopback with the default
// timings (record TTL 5 min, view refresh 5 s) and reports:
//   - join_ms: from a new node's start to its span being in every other
//     node's view;
//   - cold_lookup_p50_ms, cold_lookup_p95_ms: a view refresh of a model
//     from the DHT (provider lookup + record fetches);
//   - warm_lookup_p50_us, warm_lookup_p95_us: a lookup answered from the
//     view's cache;
//   - heap_MB_per_node, rss_MB_per_node: memory per node.
//
// Run: go test -run '^$' -bench MeshScale -benchtime 1x ./mesh/
// (one iteration per size and -count 1: memory figures of a second
// iteration in the same process include the first one's leftovers).
func BenchmarkMeshScale(b *testing.B) {
	for _, n := range []int{10, 50} {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			for b.Loop() {
				meshScale(b, n)
			}
		})
	}
}

func meshScale(b *testing.B, n int) {
	model := testModel(b, "scale")
	const blocks = 8
	heap0, rss0 := memNow()
	c := newCluster(b)
	start := func(bootstrap []peer.AddrInfo, s, e int) *testNode {
		key, _ := newKey(b)
		node := &testNode{advert: Advert{Models: []protocol.ServedSpan{span(model, blocks, s, e)}}}
		m, err := New(context.Background(), Config{Key: key, ListenAddrs: []string{"/ip4/127.0.0.1/udp/0/quic-v1"},
			Bootstrap: bootstrap, DHTMode: "server", Version: "bench", Logger: slog.New(slog.DiscardHandler)},
			func() Advert { node.mu.Lock(); defer node.mu.Unlock(); return node.advert })
		if err != nil {
			b.Fatal(err)
		}
		node.Mesh = m
		c.nodes = append(c.nodes, node)
		ctx := context.Background()
		if err := m.Publish(ctx); err != nil {
			b.Logf("publish: %v", err)
		}
		if err := m.Provide(ctx, model); err != nil {
			b.Logf("provide: %v", err)
		}
		return node
	}
	// Three bootstrap nodes, the rest joining through them in turn, each
	// serving a 2-block span.
	var boot []peer.AddrInfo
	for i := range n - 1 {
		s := (i * 2) % blocks
		node := start(boot, s, s+2)
		if i < 3 {
			boot = append(boot, addrInfo(node.Mesh))
		}
	}
	ctx := context.Background()
	for _, node := range c.nodes { // everyone follows the model
		if _, err := node.View().Model(ctx, model); err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	heap1, rss1 := memNow()

	// Join time: a new node serving blocks 0-7 until everyone lists it.
	joinStart := time.Now()
	newcomer := start(boot, 0, blocks)
	others := slices.Clone(c.nodes[:len(c.nodes)-1])
	var wg sync.WaitGroup
	for _, o := range others {
		wg.Go(func() {
			for time.Since(joinStart) < 60*time.Second {
				mv, err := o.View().Model(ctx, model)
				if err == nil && slices.ContainsFunc(mv.Peers, func(p PeerView) bool { return p.ID == newcomer.ID() }) {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			b.Errorf("node %s never saw the newcomer", o.ID())
		})
	}
	wg.Wait()
	join := time.Since(joinStart)

	// Lookups.
	var cold, warm []time.Duration
	for i := range 40 {
		node := c.nodes[i%len(c.nodes)]
		e := &modelEntry{id: model, providers: map[peer.ID]bool{}}
		t0 := time.Now()
		if err := node.View().refresh(ctx, e); err != nil {
			b.Fatal(err)
		}
		cold = append(cold, time.Since(t0))
		for range 25 {
			t0 := time.Now()
			if _, err := node.View().Model(ctx, model); err != nil {
				b.Fatal(err)
			}
			warm = append(warm, time.Since(t0))
		}
	}
	b.ReportMetric(float64(join.Milliseconds()), "join_ms")
	b.ReportMetric(ms(pct(cold, 50)), "cold_lookup_p50_ms")
	b.ReportMetric(ms(pct(cold, 95)), "cold_lookup_p95_ms")
	b.ReportMetric(float64(pct(warm, 50).Nanoseconds())/1e3, "warm_lookup_p50_us")
	b.ReportMetric(float64(pct(warm, 95).Nanoseconds())/1e3, "warm_lookup_p95_us")
	b.ReportMetric((float64(heap1)-float64(heap0))/float64(n-1)/(1<<20), "heap_MB_per_node")
	b.ReportMetric((float64(rss1)-float64(rss0))/float64(n-1)/(1<<20), "rss_MB_per_node")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// memNow returns the Go heap in use and the process's resident set size.
func memNow() (heap, rss uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if b, err := os.ReadFile("/proc/self/statm"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 1 {
			pages, _ := strconv.ParseUint(f[1], 10, 64)
			rss = pages * uint64(os.Getpagesize())
		}
	}
	return ms.HeapInuse, rss
}
