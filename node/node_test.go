package node

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// startTestNode initialises a data dir and starts a node on loopback with
// test timings: QUIC and the API on port 0, no mDNS or NAT traversal (they
// would reach past loopback), DHT server mode.
func startTestNode(t testing.TB, bootstrap []string, serve ...string) *Node {
	t.Helper()
	dir := t.TempDir()
	cfg := DefaultConfig()
	cfg.Listen = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}
	cfg.API = "127.0.0.1:0"
	cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
	cfg.Bootstrap = bootstrap
	cfg.Serve = serve
	cfg.Threads = 1
	cfg.RecordTTL = Duration(time.Minute)
	cfg.ViewRefresh = Duration(500 * time.Millisecond)
	if _, err := Init(dir, cfg); err != nil {
		t.Fatal(err)
	}
	n, err := New(context.Background(), cfg, Options{DataDir: dir, MeasureRounds: 2, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func closeAll(nodes []*Node) {
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Go(func() { n.Close() })
	}
	wg.Wait()
}

// Acceptance 1 of issue 3: ten nodes serving different spans of a built GPT
// all see complete, correct coverage within 10 s.
func TestTenNodesSeeCoverage(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gpt")
	m, err := build.GPT(build.GPTConfig{Layers: 8, Dim: 64, Heads: 2, Context: 64, Seed: 1}, dir)
	if err != nil {
		t.Fatal(err)
	}
	// Spans (inclusive) of the 10 blocks: each block served at least once,
	// some twice; the bootstrap node serves nothing.
	spans := []string{"0-2", "3-5", "6-9", "0-4", "5-9", "2-3", "7-8", "9-9", "0-0"}
	boot := startTestNode(t, nil)
	nodes := []*Node{boot}
	t.Cleanup(func() { closeAll(nodes) })
	bootAddr := boot.Status().Addrs[0]
	want := map[string][2]int{}
	for _, s := range spans {
		n := startTestNode(t, []string{bootAddr}, dir+":"+s)
		nodes = append(nodes, n)
		var a, b int
		fmt.Sscanf(s, "%d-%d", &a, &b)
		want[n.Mesh().ID().String()] = [2]int{a, b + 1}
	}
	started := time.Now()
	for i, n := range nodes {
		var last string
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			cov, err := n.Coverage(ctx, m.ID.String())
			cancel()
			if err == nil {
				if ok, why := coverageMatches(cov, want, len(m.Manifest.Blocks)); ok {
					break
				} else {
					last = why
				}
			} else {
				last = err.Error()
			}
			if time.Since(started) > 10*time.Second {
				t.Fatalf("node %d: no complete, correct coverage 10 s after the last node started: %s", i, last)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	t.Logf("all %d nodes see complete, correct coverage %s after the last node started", len(nodes), time.Since(started).Round(time.Millisecond))

	// And it stays so while the views refresh in the background.
	for round := range 6 {
		time.Sleep(500 * time.Millisecond)
		for i, n := range nodes {
			cov, err := n.Coverage(context.Background(), m.ID.String())
			if err != nil {
				t.Fatalf("round %d node %d: %v", round, i, err)
			}
			if ok, why := coverageMatches(cov, want, len(m.Manifest.Blocks)); !ok {
				t.Fatalf("round %d node %d: coverage regressed: %s", round, i, why)
			}
		}
	}

	cov, _ := nodes[1].Coverage(context.Background(), m.ID.String())
	for _, p := range cov.Peers {
		if p.PassMicros <= 0 || p.Throughput <= 0 || p.Version != Version || len(p.Addrs) == 0 {
			t.Errorf("peer %s: incomplete record %+v", p.ID, p)
		}
	}
}

func coverageMatches(cov *Coverage, want map[string][2]int, blocks int) (bool, string) {
	if cov.Blocks != blocks || !cov.Complete {
		return false, fmt.Sprintf("%d of %d blocks known, uncovered %v, %d peers", cov.Blocks, blocks, cov.Uncovered, len(cov.Peers))
	}
	if len(cov.Peers) != len(want) {
		return false, fmt.Sprintf("%d peers, want %d", len(cov.Peers), len(want))
	}
	for _, p := range cov.Peers {
		if w, ok := want[p.ID]; !ok || w != [2]int{p.Start, p.End} {
			return false, fmt.Sprintf("peer %s serves [%d,%d), want %v", p.ID, p.Start, p.End, w)
		}
	}
	for b, who := range cov.ByBlock {
		for _, i := range who {
			if p := cov.Peers[i]; b < p.Start || b >= p.End {
				return false, fmt.Sprintf("block %d attributed to %s serving [%d,%d)", b, p.ID, p.Start, p.End)
			}
		}
	}
	return true, ""
}

// testLogger discards node logs unless INFERMESH_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("INFERMESH_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func mustCID(t testing.TB, s string) cid.Cid {
	t.Helper()
	c, err := shards.ParseCID(s)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
