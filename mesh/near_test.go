package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/marcopolo/simnet"

	"github.com/infermesh/infermesh/mesh/simnettest"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// modelProvider serves spans of a local model through a real runtime.
type modelProvider struct {
	rt    *shards.Runtime
	model *shards.Model
	start int
	end   int
	mu    sync.Mutex
	spans map[[2]int]*shards.Span
}

func (p *modelProvider) Runner(model string, start, end int) (shards.Runner, error) {
	if model != p.model.ID.String() || start < p.start || end > p.end || start >= end {
		return nil, ErrNotServed
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if sp, ok := p.spans[[2]int{start, end}]; ok {
		return sp, nil
	}
	sp, err := p.rt.LoadSpan(p.model, start, end)
	if err != nil {
		return nil, err
	}
	p.spans[[2]int{start, end}] = sp
	return sp, nil
}

// Decoder lets the last hop of a decode ring close it.
func (p *modelProvider) Decoder(model string) *shards.DecoderSpec {
	if model != p.model.ID.String() {
		return nil
	}
	return p.model.Manifest.Decoder
}

func (p *modelProvider) close() {
	for _, sp := range p.spans {
		sp.Close()
	}
}

// Acceptance 4 of issue 4: over a network with injected latencies, routes
// avoid the distant replica. Two regions: the requester and one replica of
// each span in region A (2 ms apart one way), the other replicas in region
// B (2 ms apart, 40 ms from A). Real libp2p QUIC hosts run over simnet; the
// requester learns where everyone is only from Vivaldi coordinates.
func TestRoutesAvoidTheFarReplica(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for coordinates to converge")
	}
	m, err := build.MLP(build.MLPConfig{Layers: 4, Dim: 32, Seed: 1}, filepath.Join(t.TempDir(), "mlp"))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	// Node 0 requester; 1, 2 near replicas of [0,2) and [2,4); 3, 4 far ones.
	region := []int{0, 0, 0, 1, 1}
	spans := [][2]int{{0, 0}, {0, 2}, {2, 4}, {0, 2}, {2, 4}}
	nw := simnettest.New(func(a, b int) time.Duration {
		if region[a] != region[b] {
			return 40 * time.Millisecond
		}
		return 2 * time.Millisecond
	}, 1000*simnet.Mibps)
	t.Cleanup(nw.Close)

	var meshes []*Mesh
	var providers []*modelProvider
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, ms := range meshes {
			wg.Go(func() { ms.Close() })
		}
		wg.Wait()
		for _, p := range providers {
			p.close()
		}
	})
	var boot []peer.AddrInfo
	for i := range region {
		key, _ := newKey(t)
		var advert Advert
		var prov *modelProvider
		if s := spans[i]; s[1] > s[0] {
			advert.Models = []protocol.ServedSpan{span(m.ID, 4, s[0], s[1])}
			prov = &modelProvider{rt: rt, model: m, start: s[0], end: s[1], spans: map[[2]int]*shards.Span{}}
			providers = append(providers, prov)
		}
		ms, err := New(context.Background(), Config{Key: key, ListenAddrs: []string{simnettest.ListenAddr(i)},
			Bootstrap: boot, DHTMode: "server", RecordTTL: 3 * time.Second, ViewRefresh: 300 * time.Millisecond,
			CoordEvery: 300 * time.Millisecond, Version: "test", Logger: slog.New(slog.DiscardHandler),
			HostOptions: []libp2p.Option{nw.HostOption()}}, func() Advert { return advert })
		if err != nil {
			t.Fatal(err)
		}
		meshes = append(meshes, ms)
		if prov != nil {
			ms.Serve(prov, StageConfig{})
		}
		if i == 0 {
			boot = []peer.AddrInfo{addrInfo(ms)}
		}
		ms.Publish(context.Background())
		ms.Provide(context.Background(), m.ID)
	}
	// Everyone measures everyone (in a deployment this happens as peers
	// talk; here we connect them so that coordinates converge quickly).
	for _, a := range meshes {
		for _, b := range meshes {
			if a != b {
				a.Connect(context.Background(), addrInfo(b))
			}
		}
	}
	requester := meshes[0]
	near := map[string]bool{meshes[1].ID().String(): true, meshes[2].ID().String(): true}
	in := shards.RandomInputs(m.Manifest, 1, 1, 4)
	deadline := time.Now().Add(25 * time.Second)
	nearInARow := 0
	for nearInARow < 5 {
		out, info, err := requester.Infer(context.Background(), m.ID, in, InferOptions{StepTimeout: 5 * time.Second})
		if err == nil && out["y"] != nil {
			onlyNear := true
			for _, h := range info.Route {
				onlyNear = onlyNear && near[h.Peer]
			}
			if onlyNear {
				nearInARow++
			} else {
				nearInARow = 0
			}
		}
		if time.Now().After(deadline) {
			mv, _ := requester.View().Model(context.Background(), m.ID)
			var rtts []string
			for _, p := range mv.Peers {
				rtts = append(rtts, fmt.Sprintf("%s:%s", p.ID.ShortString(), p.RTT))
			}
			t.Fatalf("routes still use the far replicas after 25 s (last route %v, err %v); estimated RTTs %s", info.Route, err, strings.Join(rtts, " "))
		}
		time.Sleep(200 * time.Millisecond)
	}
	mv, _ := requester.View().Model(context.Background(), m.ID)
	for _, p := range mv.Peers {
		t.Logf("peer %s (near %v): estimated RTT %s", p.ID.ShortString(), near[p.ID.String()], p.RTT.Round(100*time.Microsecond))
	}
}
