package node

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// syncBuffer is a log sink tests read while the node writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newServeNode is startTestNode with the data dir, the log and New's error
// handed back.
func newServeNode(t testing.TB, bootstrap []string, serve ...string) (n *Node, data string, log *syncBuffer, err error) {
	t.Helper()
	data, log = t.TempDir(), &syncBuffer{}
	cfg := DefaultConfig()
	cfg.Listen, cfg.API = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, "127.0.0.1:0"
	cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
	cfg.Bootstrap, cfg.Serve, cfg.Threads = bootstrap, serve, 1
	cfg.RecordTTL, cfg.ViewRefresh = Duration(time.Minute), Duration(500*time.Millisecond)
	if _, err := Init(data, cfg); err != nil {
		t.Fatal(err)
	}
	n, err = New(context.Background(), cfg, Options{DataDir: data, MeasureRounds: 2,
		Logger: slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if n != nil {
		t.Cleanup(func() { n.Close() })
	}
	return n, data, log, err
}

// copyModel copies a model folder (manifest and blocks) to a new one.
func copyModel(t testing.TB, m *shards.Model) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "copy")
	if err := os.CopyFS(dir, os.DirFS(m.Dir)); err != nil {
		t.Fatal(err)
	}
	return dir
}

// damage truncates (or, with flip, corrupts in place) block i's file in dir.
func damage(t testing.TB, m *shards.Model, dir string, i int, flip bool) string {
	t.Helper()
	c := m.Manifest.Blocks[i].CID
	p := filepath.Join(dir, shards.BlocksDir, c)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if flip {
		b[len(b)/2] ^= 0xff
	} else {
		b = b[:len(b)/2]
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return c
}

func buildRepairGPT(t testing.TB) *shards.Model {
	t.Helper()
	m, err := build.GPT(build.GPTConfig{Layers: 4, Dim: 32, Heads: 2, Context: 64, Seed: 12}, filepath.Join(t.TempDir(), "gpt"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Issue 9: a node whose --serve folder holds a truncated block starts,
// quarantines the bad file, fetches a good copy from a peer into its own
// store (not the operator's folder), and serves the span.
func TestRepairTruncatedBlockFromPeer(t *testing.T) {
	m := buildRepairGPT(t)
	peer := startTestNode(t, nil, m.Dir)
	t.Cleanup(func() { peer.Close() })

	dir := copyModel(t, m)
	bad := damage(t, m, dir, 2, false)
	start := time.Now()
	n, data, log, err := newServeNode(t, []string{peer.Status().Addrs[0]}, dir)
	if err != nil {
		t.Fatalf("the node did not start: %v\n%s", err, log)
	}
	t.Logf("started in %s", time.Since(start).Round(time.Millisecond))
	spans := n.servedSpans()
	if len(spans) != 1 || spans[0].start != 0 || spans[0].end != len(m.Manifest.Blocks) {
		t.Fatalf("serving %d spans, want the whole model\n%s", len(spans), log)
	}
	// The good copy is in the node's own store; the operator's folder
	// lost the bad file (moved aside) and gained nothing.
	c := mustCID(t, bad)
	if _, err := n.own.Get(c); err != nil {
		t.Fatalf("repaired block not in the node's own store: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, shards.BlocksDir, bad)); !os.IsNotExist(err) {
		t.Errorf("the bad block file is still in the operator's folder (%v)", err)
	}
	q, _ := filepath.Glob(filepath.Join(data, QuarantineDir, bad+".*"))
	if len(q) != 1 {
		t.Errorf("quarantine holds %v, want the bad file", q)
	}
	// It computes what the model computes, and announces the span.
	r, err := n.Runner(m.ID.String(), 0, len(m.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	in := shards.RandomInputs(m.Manifest, 3, 1, 6)
	got, err := r.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	want, err := localSpan(t, m).Run(in)
	if err != nil {
		t.Fatal(err)
	}
	if d, err := protocol.MaxAbsDiff(want["logits"], got["logits"]); err != nil || d > 1e-6 {
		t.Fatalf("repaired span differs by %v (%v)", d, err)
	}
	if a := n.advert(); len(a.Models) != 1 || a.Models[0].Model != m.ID.String() {
		t.Fatalf("advert %+v", a.Models)
	}
	if !strings.Contains(log.String(), "moved aside") || !strings.Contains(log.String(), "repaired") {
		t.Errorf("the log does not say what happened:\n%s", log)
	}
}

// Issue 9: with no peer to repair from, a node starts without the damaged
// span and says why; with nothing else to serve it fails with a clear
// error.
func TestCorruptBlockWithoutPeers(t *testing.T) {
	m := buildRepairGPT(t)
	dir := copyModel(t, m)
	last := len(m.Manifest.Blocks) - 1
	bad := damage(t, m, dir, last, true)

	n, _, log, err := newServeNode(t, nil, dir+":0-1", dir+":2-"+itoa(last))
	if err != nil {
		t.Fatalf("the node did not start: %v\n%s", err, log)
	}
	spans := n.servedSpans()
	if len(spans) != 1 || spans[0].start != 0 || spans[0].end != 2 {
		t.Fatalf("serving %d spans, want only blocks 0-1\n%s", len(spans), log)
	}
	if a := n.advert(); len(a.Models) != 1 || a.Models[0].End != 2 {
		t.Fatalf("advert %+v: announces the damaged span", a.Models)
	}
	for _, c := range n.provided() {
		if c.String() == bad {
			t.Fatal("the bad block is still announced")
		}
	}
	if l := log.String(); !strings.Contains(l, "not serving a span") || !strings.Contains(l, "no --bootstrap") {
		t.Errorf("the log does not say why the span is not served:\n%s", l)
	}

	// A damaged block before a span does not keep the span from being
	// measured and served.
	dir3 := copyModel(t, m)
	damage(t, m, dir3, 0, false)
	n3, _, log3, err := newServeNode(t, nil, dir3+":2-"+itoa(last))
	if err != nil {
		t.Fatalf("block 0 damaged, serving 2-%d: %v\n%s", last, err, log3)
	}
	if s := n3.servedSpans(); len(s) != 1 || s[0].start != 2 || len(s[0].micros) != last-1 {
		t.Fatalf("serving %d spans", len(s))
	}

	// Only the damaged span: a clear error, not a node serving nothing.
	dir2 := copyModel(t, m)
	damage(t, m, dir2, 1, false)
	_, _, log, err = newServeNode(t, nil, dir2)
	if err == nil || !strings.Contains(err.Error(), "nothing to serve") || !strings.Contains(err.Error(), "does not match its CID") {
		t.Fatalf("New: %v, want a clear error\n%s", err, log)
	}
	t.Logf("New: %v", err)
}

func itoa(i int) string { return strconv.Itoa(i) }

// Issue 9, while running: a block that goes bad on disk is found when a
// peer asks for it (or a span is loaded), moved aside and fetched again from
// a peer; the span goes on from the node's own store. With no peer to fetch
// from, the span holding it is no longer served nor announced.
func TestRepairBlockWhileRunning(t *testing.T) {
	m := buildRepairGPT(t)
	peer := startTestNode(t, nil, m.Dir)
	t.Cleanup(func() { peer.Close() })
	dir := copyModel(t, m)
	n, _, log, err := newServeNode(t, []string{peer.Status().Addrs[0]}, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(log.String())
		}
	})
	waitUntil(t, 10*time.Second, "the node sees its peer", func() bool {
		cov, err := n.Coverage(context.Background(), m.ID.String())
		return err == nil && len(cov.Peers) == 2
	})
	bad := mustCID(t, damage(t, m, dir, 1, true))
	// What the block server reads: a verification failure starts the repair.
	if _, err := (watchedStore{n}).Get(bad); err == nil {
		t.Fatal("a corrupt block was read as good")
	}
	waitUntil(t, 20*time.Second, "the span served from the node's own store", func() bool {
		s := n.servedSpans()
		return len(s) == 1 && s[0].model.Store == n.own
	})
	if _, err := (watchedStore{n}).Get(bad); err != nil {
		t.Fatalf("after the repair: %v\n%s", err, log)
	}
	// A sub-span loads from the repaired copies.
	r, err := n.Runner(m.ID.String(), 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Run(syntheticInputs(r.Inputs())); err != nil {
		t.Fatal(err)
	}
	// Then the node's own copy goes bad: loading a sub-span finds it.
	damage(t, m, filepath.Dir(n.own.Dir()), 2, false) // DATA/blocks
	n.subs.mu.Lock()
	for _, sp := range n.subs.spans {
		sp.Close()
	}
	n.subs.spans, n.subs.order = nil, nil
	n.subs.mu.Unlock()
	if _, err := n.Runner(m.ID.String(), 2, 3); err == nil {
		t.Fatal("a sub-span loaded from a truncated block")
	}
	waitUntil(t, 20*time.Second, "the block fetched again", func() bool {
		_, err := n.Runner(m.ID.String(), 2, 3)
		return err == nil
	})
	if len(n.servedSpans()) != 1 {
		t.Fatalf("the span was dropped\n%s", log)
	}

	// Alone, the node stops announcing the span it cannot repair.
	dir2 := copyModel(t, m)
	last := len(m.Manifest.Blocks) - 1
	alone, _, log2, err := newServeNode(t, nil, dir2+":0-1", dir2+":2-"+itoa(last))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(log2.String())
		}
	})
	bad2 := mustCID(t, damage(t, m, dir2, 3, true))
	(watchedStore{alone}).Get(bad2)
	waitUntil(t, 30*time.Second, "the damaged span dropped", func() bool {
		a := alone.advert()
		return len(a.Models) == 1 && a.Models[0].End == 2
	})
	for _, c := range alone.provided() {
		if c.Equals(bad2) {
			t.Fatal("the bad block is still announced")
		}
	}
	if !strings.Contains(log2.String(), "not serving a span any more") {
		t.Errorf("the log does not say why:\n%s", log2)
	}
}
