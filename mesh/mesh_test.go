package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	mh "github.com/multiformats/go-multihash"

	"github.com/infermesh/infermesh/protocol"
)

// testModel is a model ID for mesh tests; the mesh never opens the model.
func testModel(t testing.TB, name string) cid.Cid {
	h, err := mh.Sum([]byte(name), mh.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	return cid.NewCidV1(0x0200, h)
}

type testNode struct {
	*Mesh
	mu     sync.Mutex
	advert Advert
}

// startNode starts a mesh node on loopback QUIC with test timings.
func startNode(t testing.TB, bootstrap []peer.AddrInfo, ttl time.Duration, spans ...protocol.ServedSpan) *testNode {
	t.Helper()
	key, _ := newKey(t)
	n := &testNode{advert: Advert{Models: spans, Accelerators: []protocol.Accelerator{{Kind: "cpu", Name: "test", Cores: 2}}}}
	m, err := New(context.Background(), Config{
		Key: key, ListenAddrs: []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, Bootstrap: bootstrap, DHTMode: "server",
		RecordTTL: ttl, ViewRefresh: 500 * time.Millisecond, CoordEvery: time.Second, Version: "test",
		Logger: slog.New(slog.DiscardHandler),
	}, func() Advert { n.mu.Lock(); defer n.mu.Unlock(); return n.advert })
	if err != nil {
		t.Fatal(err)
	}
	n.Mesh = m
	return n
}

// cluster is a set of test nodes closed together (concurrently: each
// goodbye publish may wait on peers already gone).
type cluster struct {
	nodes []*testNode
}

func newCluster(t testing.TB) *cluster {
	c := &cluster{}
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, n := range c.nodes {
			wg.Go(func() { n.Close() })
		}
		wg.Wait()
	})
	return c
}

func (c *cluster) start(t testing.TB, bootstrap []peer.AddrInfo, ttl time.Duration, spans ...protocol.ServedSpan) *testNode {
	n := startNode(t, bootstrap, ttl, spans...)
	c.nodes = append(c.nodes, n)
	return n
}

func addrInfo(m *Mesh) peer.AddrInfo { return peer.AddrInfo{ID: m.ID(), Addrs: m.Host().Addrs()} }

func span(model cid.Cid, blocks, start, end int) protocol.ServedSpan {
	micros := make([]float64, end-start)
	for i := range micros {
		micros[i] = 100
	}
	return protocol.ServedSpan{Model: model.String(), Blocks: blocks, Start: start, End: end, BlockMicros: micros}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, within time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	for time.Since(start) < within {
		ok, state := cond()
		if ok {
			return time.Since(start)
		}
		last = state
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s; last: %s", what, within, last)
	return 0
}

// coverageIs reports whether n's view of model shows exactly want: for each
// block, the set of peers serving it.
func coverageIs(n *testNode, model cid.Cid, want map[peer.ID][2]int, blocks int) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mv, err := n.View().Model(ctx, model)
	if err != nil {
		return false, err.Error()
	}
	got := map[peer.ID][2]int{}
	for _, p := range mv.Peers {
		got[p.ID] = [2]int{p.Span.Start, p.Span.End}
	}
	if mv.Blocks != blocks || len(got) != len(want) {
		return false, fmt.Sprintf("%d blocks, %d peers, uncovered %v", mv.Blocks, len(got), mv.Uncovered)
	}
	for p, s := range want {
		if got[p] != s {
			return false, fmt.Sprintf("peer %s: span %v, want %v", p, got[p], s)
		}
	}
	return true, ""
}

// killedTTL is the record TTL of the node TestMeshCoverageAndLeaving kills:
// short, so the test is quick, but over the 5 s a dial to a vanished peer
// can take, during which republishing stalls.
const killedTTL = 8 * time.Second

func TestMeshCoverageAndLeaving(t *testing.T) {
	model := testModel(t, "coverage")
	const blocks = 10
	c := newCluster(t)
	boot := c.start(t, nil, time.Minute)
	bootInfo := []peer.AddrInfo{addrInfo(boot.Mesh)}
	// Eight nodes with overlapping spans that together cover blocks 0-9.
	spans := [][2]int{{0, 3}, {2, 5}, {5, 8}, {7, 10}, {0, 10}, {3, 6}, {8, 10}, {0, 1}}
	nodes := []*testNode{boot}
	want := map[peer.ID][2]int{}
	for _, s := range spans {
		ttl := time.Minute
		if len(want) == 2 {
			ttl = killedTTL // the node killed below
		}
		n := c.start(t, bootInfo, ttl, span(model, blocks, s[0], s[1]))
		nodes = append(nodes, n)
		want[n.ID()] = s
	}
	ctx := context.Background()
	for _, n := range nodes[1:] {
		if err := n.Publish(ctx); err != nil {
			t.Fatal(err)
		}
		if err := n.Provide(ctx, model); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range nodes {
		d := waitFor(t, 10*time.Second, fmt.Sprintf("node %d sees full coverage", i), func() (bool, string) { return coverageIs(n, model, want, blocks) })
		t.Logf("node %d: complete coverage after %s", i, d)
	}

	// A node that stops gracefully disappears from every view within 5 s.
	leaving := nodes[5]
	delete(want, leaving.ID())
	if err := leaving.Close(); err != nil {
		t.Logf("close: %v", err)
	}
	rest := slices.Delete(slices.Clone(nodes), 5, 6)
	for i, n := range rest {
		d := waitFor(t, 5*time.Second, fmt.Sprintf("node %d drops the leaver", i), func() (bool, string) { return coverageIs(n, model, want, blocks) })
		t.Logf("node %d dropped the gracefully stopped node after %s", i, d)
	}

	// A node that dies without a word ages out of every view within its
	// record's expiry plus a refresh (plus a lookup's timeouts: the peers
	// that just left still sit in routing tables).
	killed := nodes[3]
	delete(want, killed.ID())
	killedAt := time.Now()
	if err := killed.Kill(); err != nil {
		t.Logf("kill: %v", err)
	}
	t.Logf("kill took %s", time.Since(killedAt).Round(time.Millisecond))
	rest = slices.DeleteFunc(rest, func(n *testNode) bool { return n == killed })
	limit := killedTTL + 500*time.Millisecond + findTimeout + fetchTimeout
	for i, n := range rest {
		waitFor(t, limit, fmt.Sprintf("node %d drops the killed node", i), func() (bool, string) { return coverageIs(n, model, want, blocks) })
		t.Logf("node %d dropped the killed node %s after it died", i, time.Since(killedAt).Round(time.Millisecond))
	}
}

// The mesh speaks only its own DHT: no node registers or is seen
// advertising a protocol of the public IPFS DHT (/ipfs/kad/...), and every
// node has the private one. Capacity records and provider records were put
// and fetched before the check, so the DHT has been exercised.
func TestOnlyPrivateDHT(t *testing.T) {
	model := testModel(t, "private")
	c := newCluster(t)
	boot := c.start(t, nil, time.Minute)
	for i := range 4 {
		n := c.start(t, []peer.AddrInfo{addrInfo(boot.Mesh)}, time.Minute, span(model, 4, i, i+1))
		if err := n.Publish(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := n.Provide(context.Background(), model); err != nil {
			t.Fatal(err)
		}
	}
	want := "/infermesh/kad/1.0.0"
	for i, n := range c.nodes {
		waitFor(t, 10*time.Second, fmt.Sprintf("node %d sees 4 servers", i), func() (bool, string) {
			mv, err := n.View().Model(context.Background(), model)
			if err != nil {
				return false, err.Error()
			}
			return len(mv.Peers) == 4, fmt.Sprintf("%d servers", len(mv.Peers))
		})
		h := n.Host()
		own := h.Mux().Protocols()
		if !slices.Contains(own, libp2pprotocol.ID(want)) {
			t.Errorf("node %d does not speak %s: %v", i, want, own)
		}
		for _, p := range own {
			if strings.HasPrefix(string(p), "/ipfs/kad") || strings.HasPrefix(string(p), "/ipfs/lan/kad") {
				t.Errorf("node %d speaks %s", i, p)
			}
		}
		for _, other := range h.Peerstore().Peers() {
			protos, _ := h.Peerstore().GetProtocols(other)
			for _, p := range protos {
				if strings.Contains(string(p), "/kad/") && string(p) != want {
					t.Errorf("node %d saw %s advertise %s", i, other, p)
				}
			}
		}
	}
}
