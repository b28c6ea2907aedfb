package node

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// startDiskNode starts (or restarts, on the same data directory) a node
// serving models by ID under a store cap, logging into log.
func startDiskNode(t *testing.T, data string, boot []string, models []string, maxDisk int64, log io.Writer) *Node {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Listen, cfg.API = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, "127.0.0.1:0"
	cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
	cfg.Bootstrap, cfg.Models, cfg.Threads = boot, models, 1
	cfg.RecordTTL, cfg.ViewRefresh, cfg.Rebalance = Duration(time.Minute), Duration(300*time.Millisecond), Duration(time.Hour)
	cfg.MaxDisk = ByteSize(maxDisk)
	if _, err := os.Stat(filepath.Join(data, IdentityFile)); err != nil {
		if _, err := Init(data, cfg); err != nil {
			t.Fatal(err)
		}
	}
	n, err := New(context.Background(), cfg, Options{DataDir: data, MeasureRounds: 1,
		Logger: slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Issue 15, Disk: a node restarted on another span under --max-disk
// evicts the old blocks the mesh holds enough copies of, keeps the one
// block nobody else has while peers have room for it, and serves its new
// span within the cap; a fetch past the cap then fails saying so, and the
// node serves on; a node choosing its own span takes only what fits.
func TestDiskCapEvictsOnlyWhatTheMeshHolds(t *testing.T) {
	t0 := time.Now()
	m, err := build.GPT(build.GPTConfig{Layers: 2, Dim: 32, Heads: 2, Context: 256, Seed: 15}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	size := func(b int) int64 { return m.Manifest.Blocks[b].Size }
	has := func(n *Node, b int) bool {
		ok, _ := n.own.Has(mustCID(t, m.Manifest.Blocks[b].CID))
		return ok
	}
	// A serves blocks 1-3 from its folder and publishes the model (all of
	// it in its store, none of block 0 served); C serves blocks 1-2 too.
	a := startTestNode(t, nil, m.Dir+":1-3")
	nodes := []*Node{a}
	t.Cleanup(func() { closeAll(nodes) })
	if _, _, err := a.Publish(context.Background(), m.Dir); err != nil {
		t.Fatal(err)
	}
	boot := []string{a.Status().Addrs[0]}
	c := startTestNode(t, boot, m.Dir+":1-2")
	nodes = append(nodes, c)
	waitUntil(t, 10*time.Second, "A seeing C", func() bool {
		cov, err := a.Coverage(context.Background(), m.ID.String())
		return err == nil && len(cov.Peers) == 2
	})

	// B's first life: blocks 0-1, no cap.
	data := t.TempDir()
	var log1 syncBuffer
	b := startDiskNode(t, data, boot, []string{m.ID.String() + ":0-1"}, 0, &log1)
	if !has(b, 0) || !has(b, 1) {
		t.Fatal("B did not fetch blocks 0-1")
	}
	b.Close()
	used := sumFiles(mustScan(t, b))
	if used != size(0)+size(1) {
		t.Fatalf("B's store holds %d bytes, want blocks 0 and 1: %d", used, size(0)+size(1))
	}
	// Block 0 was used least recently: eviction would take it first, and
	// it is bigger than block 1: it alone would make room.
	if size(0) < size(1) {
		t.Fatalf("block 0 (%d bytes) is smaller than block 1 (%d)", size(0), size(1))
	}
	hourAgo := time.Now().Add(-time.Hour)
	if err := os.Chtimes(b.own.Path(mustCID(t, m.Manifest.Blocks[0].CID)), hourAgo, hourAgo); err != nil {
		t.Fatal(err)
	}

	// Its second life: blocks 2-3, under a cap that holds them beside
	// block 0 only. Block 1 has two other servers (A, C): it goes. Block 0
	// has none, and A and C have room for it: it stays.
	limit := size(0) + size(2) + size(3)
	var log2 syncBuffer
	b = startDiskNode(t, data, boot, []string{m.ID.String() + ":2-3"}, limit, &log2)
	nodes = append(nodes, b)
	if s := b.servedSpans(); len(s) != 1 || s[0].start != 2 || s[0].end != 4 {
		t.Fatalf("B serves %v, want blocks 2-3", spansOf([]*Node{b}))
	}
	if !has(b, 0) || has(b, 1) || !has(b, 2) || !has(b, 3) {
		t.Fatalf("B's store: blocks 0-3 present %v %v %v %v; want block 1 evicted, the others kept\n%s",
			has(b, 0), has(b, 1), has(b, 2), has(b, 3), log2.String())
	}
	st := b.Status().Disk
	if st.UsedBytes > limit || st.MaxBytes != limit || st.Evictions != 1 || st.EvictedBytes != size(1) {
		t.Fatalf("B's disk status %+v; want at most %d bytes used of %d, block 1 (%d bytes) evicted", st, limit, limit, size(1))
	}
	logs := log2.String()
	if !strings.Contains(grepLines(logs, "evicted a block"), "block 1 of model") || !strings.Contains(logs, "2 other nodes hold it") {
		t.Fatalf("B's log does not say which block it evicted and why:\n%s", logs)
	}
	resp, err := http.Get("http://" + b.APIAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"infermesh_store_evictions_total 1", "infermesh_store_max_bytes "} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("B's /metrics lacks %q:\n%s", want, grepLines(string(metrics), "infermesh_store"))
		}
	}

	// A fetch past the cap (the whole model: block 1 again) cannot evict
	// what B serves nor block 0 (which would make room): it fails naming
	// the cap, and B serves on.
	model := b.servedSpans()[0].model
	_, err = b.serveFetched(context.Background(), model, 0, 4)
	var full *DiskFullError
	if !errors.As(err, &full) || !errors.Is(err, ErrDiskFull) || full.Max != limit || full.Need != size(1) ||
		!strings.Contains(err.Error(), "--max-disk "+ByteSize(limit).String()) {
		t.Fatalf("fetching all blocks past the cap: %v", err)
	}
	if has(b, 1) || !has(b, 0) || len(b.servedSpans()) != 1 {
		t.Fatalf("after the refused fetch B serves %v, block 1 present %v, block 0 present %v", spansOf([]*Node{b}), has(b, 1), has(b, 0))
	}
	if _, err := b.Runner(m.ID.String(), 2, 4); err != nil {
		t.Fatalf("B no longer runs its span: %v", err)
	}
	b.Close()
	nodes = nodes[:len(nodes)-1]

	// Its third life picks its own span: its memory holds the whole model,
	// but beside blocks 0 and 3 (which too few others hold) the cap holds
	// one more block at most: it takes one, block 0, which nobody serves.
	var log3 syncBuffer
	b = startDiskNode(t, data, boot, []string{m.ID.String()}, limit, &log3)
	nodes = append(nodes, b)
	if got := spansOf([]*Node{b}); len(got) != 1 || got[0] != "0-0" {
		t.Fatalf("B under the cap chose %v, want block 0 alone\n%s", got, log3.String())
	}
	if st := b.Status().Disk; st.UsedBytes > limit {
		t.Fatalf("B's store holds %d bytes, over its cap %d", st.UsedBytes, limit)
	}
	t.Logf("took %s\n%s", time.Since(t0).Round(time.Millisecond), grepLines(log2.String(), "evict"))
}

func mustScan(t *testing.T, n *Node) map[string]diskFile {
	t.Helper()
	files, err := n.disk.scan()
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// Writes that do not go through a span's reservation (publish, pull,
// repair) meet the cap at the store's admission: a publish past it fails
// naming the cap, and the store stays under it.
func TestDiskCapRefusesAPublishPastIt(t *testing.T) {
	m, err := build.GPT(build.GPTConfig{Layers: 2, Dim: 32, Heads: 2, Context: 32, Seed: 16}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	limit := m.Manifest.Blocks[0].Size + m.Manifest.Blocks[1].Size
	var log syncBuffer
	n := startDiskNode(t, t.TempDir(), nil, nil, limit, &log)
	t.Cleanup(func() { n.Close() })
	_, _, err = n.Publish(context.Background(), m.Dir)
	if !errors.Is(err, ErrDiskFull) || !strings.Contains(err.Error(), "--max-disk "+ByteSize(limit).String()) {
		t.Fatalf("publishing %d bytes under a %d-byte cap: %v", m.Manifest.TotalSize(), limit, err)
	}
	if st := n.Status().Disk; st.UsedBytes > limit || st.UsedBytes == 0 || st.Evictions != 0 {
		t.Fatalf("disk status after the refused publish: %+v (cap %d)", st, limit)
	}
}

// A pull past the cap is refused before any block is transferred: the
// error names the cap, and the puller's store holds no block of the model.
func TestDiskCapRefusesAPullBeforeFetching(t *testing.T) {
	m, err := build.GPT(build.GPTConfig{Layers: 2, Dim: 32, Heads: 2, Context: 32, Seed: 17}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	var logA, logB syncBuffer
	a := startDiskNode(t, t.TempDir(), nil, nil, 0, &logA)
	t.Cleanup(func() { a.Close() })
	if _, _, err := a.Publish(context.Background(), m.Dir); err != nil {
		t.Fatal(err)
	}
	limit := m.Manifest.Blocks[0].Size + m.Manifest.Blocks[1].Size
	b := startDiskNode(t, t.TempDir(), []string{a.Status().Addrs[0]}, nil, limit, &logB)
	t.Cleanup(func() { b.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	fetched := 0
	_, err = b.Pull(ctx, m.ID, 0, -1, func(mesh.FetchProgress) { fetched++ })
	if !errors.Is(err, ErrDiskFull) || !strings.Contains(err.Error(), "--max-disk "+ByteSize(limit).String()) {
		t.Fatalf("pulling %d bytes under a %d-byte cap: %v", m.Manifest.TotalSize(), limit, err)
	}
	for _, blk := range m.Manifest.Blocks {
		c, _ := shards.ParseCID(blk.CID)
		if ok, _ := b.store.Has(c); ok {
			t.Fatalf("block %s was fetched before the pull was refused", blk.CID)
		}
	}
	if fetched != 0 {
		t.Fatalf("%d progress reports: something was transferred", fetched)
	}
}
