package node

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/config"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards/build"
)

// operatorConfig is startTestNode's configuration, for tests that need the
// data directory and config in hand.
func operatorConfig(t testing.TB) (string, Config) {
	t.Helper()
	dir := t.TempDir()
	cfg := DefaultConfig()
	cfg.Listen = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}
	cfg.API = "127.0.0.1:0"
	cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
	cfg.Threads = 1
	cfg.RecordTTL = Duration(time.Minute)
	cfg.ViewRefresh = Duration(500 * time.Millisecond)
	if _, err := Init(dir, cfg); err != nil {
		t.Fatal(err)
	}
	return dir, cfg
}

// Issue 12, finding 11.1: a second node on a data directory in use fails
// at once, naming the holder's pid; once the first closes, a new one
// starts.
func TestNodeDataDirLocked(t *testing.T) {
	dir, cfg := operatorConfig(t)
	first, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if first != nil {
			first.Close()
		}
	}()
	started := time.Now()
	second, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger()})
	if err == nil {
		second.Close()
		t.Fatal("a second node started on a data directory in use")
	}
	var inUse *DataDirInUseError
	want := dir + " is in use by another infermesh node (pid " + strconv.Itoa(os.Getpid()) + ")"
	if !errors.As(err, &inUse) || err.Error() != want {
		t.Fatalf("second node: %v, want %q", err, want)
	}
	if d := time.Since(started); d > time.Second {
		t.Errorf("the second node took %s to fail", d)
	}
	// The first node's API file is untouched by the failed second.
	if _, err := os.Stat(filepath.Join(dir, APIFile)); err != nil {
		t.Errorf("the failed second node removed the first's %s: %v", APIFile, err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	first = nil
	if _, err := os.Stat(filepath.Join(dir, APIFile)); !os.IsNotExist(err) {
		t.Errorf("%s left after a clean shutdown: %v", APIFile, err)
	}
	third, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatalf("after the first node closed: %v", err)
	}
	third.Close()
}

// Issue 12, finding 11.2: a taken API port fails New before the libp2p
// host starts, naming the address and the flag.
func TestNodeAPIPortTaken(t *testing.T) {
	dir, cfg := operatorConfig(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg.API = taken.Addr().String()
	hostStarted := false
	opt := libp2p.Option(func(*config.Config) error { hostStarted = true; return nil })
	started := time.Now()
	n, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger(), HostOptions: []libp2p.Option{opt}})
	if err == nil {
		n.Close()
		t.Fatal("a node started on a taken API port")
	}
	for _, want := range []string{cfg.API, "--api", "taken"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if hostStarted {
		t.Error("the libp2p host was started before the API port was found taken")
	}
	if d := time.Since(started); d > time.Second {
		t.Errorf("took %s to fail", d)
	}
	// The lock was released: a node on a free port starts.
	cfg.API = "127.0.0.1:0"
	n, err = New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatalf("on a free port after the failure: %v", err)
	}
	n.Close()
}

// Issue 12, finding 11.4: temporary files a killed transfer left in the
// node's own block store are removed when it opens the store; a --serve
// folder, which another process may be writing, is left alone.
func TestNodeRemovesLeftoverTemp(t *testing.T) {
	dir, cfg := operatorConfig(t)
	model := filepath.Join(t.TempDir(), "gpt")
	if _, err := build.GPT(build.GPTConfig{Layers: 2, Dim: 64, Heads: 2, Context: 64, Seed: 1}, model); err != nil {
		t.Fatal(err)
	}
	cfg.Serve = []string{model}
	blocks := filepath.Join(dir, "blocks")
	os.MkdirAll(blocks, 0o755)
	leftover := filepath.Join(blocks, ".tmp-123456")
	if err := os.WriteFile(leftover, []byte("half a block"), 0o600); err != nil {
		t.Fatal(err)
	}
	theirs := filepath.Join(model, "blocks", ".tmp-654321")
	if err := os.WriteFile(theirs, []byte("someone's write in progress"), 0o600); err != nil {
		t.Fatal(err)
	}
	n, err := New(context.Background(), cfg, Options{DataDir: dir, MeasureRounds: 1, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Errorf("%s still there after the node opened its store (%v)", leftover, err)
	}
	if _, err := os.Stat(theirs); err != nil {
		t.Errorf("a temporary file in a --serve folder was removed: %v", err)
	}
}

// Issue 12, finding 11.5: the coverage line names the missing blocks, also
// before the view knows any server (it said "nobody serves blocks []").
func TestCoverageSummaryListsMissing(t *testing.T) {
	for _, tc := range []struct {
		mv     mesh.ModelView
		blocks int
		want   string
	}{
		{mesh.ModelView{}, 10, "INCOMPLETE (no server known yet: blocks 0-9 missing), 0 peers"},
		{mesh.ModelView{Blocks: 10, ByBlock: make([][]int, 10), Uncovered: []int{2, 3, 4, 7, 9}, Peers: make([]mesh.PeerView, 2)},
			10, "INCOMPLETE (nobody serves blocks 2-4, 7, 9), 2 peers"},
		{mesh.ModelView{Blocks: 2, ByBlock: [][]int{{0}, {0}}, Peers: make([]mesh.PeerView, 1)}, 2, "complete, 1 peers; servers per block: 1 1"},
	} {
		if got := coverageSummary(&tc.mv, tc.blocks); !strings.HasPrefix(got, tc.want) {
			t.Errorf("coverageSummary = %q, want %q...", got, tc.want)
		}
	}
}

// Issue 12, finding 11.6: two nodes in DHT mode auto with NAT traversal off
// on loopback serve the DHT at once: a model published on one is pulled by
// the other within seconds, and the status says the mode.
func TestPublishPullDHTAutoNoNAT(t *testing.T) {
	model := filepath.Join(t.TempDir(), "gpt")
	if _, err := build.GPT(build.GPTConfig{Layers: 2, Dim: 64, Heads: 2, Context: 64, Seed: 2}, model); err != nil {
		t.Fatal(err)
	}
	start := func(bootstrap []string) *Node {
		dir, cfg := operatorConfig(t)
		cfg.DHTMode = "auto"
		cfg.Bootstrap = bootstrap
		n, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		if got := n.Status().DHTMode; got != "server" {
			t.Errorf("status dht_mode = %q, want server", got)
		}
		return n
	}
	a := start(nil)
	b := start([]string{a.Status().Addrs[0]})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id, _, err := a.Publish(ctx, model)
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if _, err := b.Pull(ctx, id, 0, -1, nil); err != nil {
		t.Fatalf("pull %s after %s: %v", id, time.Since(began).Round(time.Millisecond), err)
	}
	t.Logf("pulled in %s", time.Since(began).Round(time.Millisecond))
}
