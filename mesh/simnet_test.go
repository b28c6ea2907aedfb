package mesh

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/marcopolo/simnet"

	"github.com/infermesh/infermesh/mesh/simnettest"
)

// simnetHosts starts n real libp2p hosts that speak QUIC over an in-memory
// simnet (mesh/simnettest): no packet leaves the process. Host i listens on
// 127.0.0.(i+1):8000 inside the simnet, and a packet from host i to host j
// is delivered after oneWay(i, j). Hosts and network close at cleanup; call
// it inside a synctest bubble to run on virtual time.
func simnetHosts(t testing.TB, n int, oneWay func(from, to int) time.Duration) []host.Host {
	t.Helper()
	if n > 250 {
		t.Fatalf("simnetHosts: %d hosts, at most 250", n)
	}
	nw := simnettest.New(oneWay, 1000*simnet.Mibps)
	hosts := make([]host.Host, 0, n)
	t.Cleanup(func() {
		for _, h := range hosts {
			_ = h.Close()
		}
		nw.Close()
	})
	for i := range n {
		h, err := libp2p.New(
			libp2p.ListenAddrStrings(simnettest.ListenAddr(i)),
			libp2p.Transport(libp2pquic.NewTransport),
			nw.HostOption(),
			libp2p.DisableIdentifyAddressDiscovery(), // stalls synctest (x/simlibp2p)
			libp2p.ResourceManager(&network.NullResourceManager{}),
			libp2p.DisableMetrics(),
			libp2p.DisableRelay(),
		)
		if err != nil {
			t.Fatalf("simnet host %d: %v", i, err)
		}
		hosts = append(hosts, h)
	}
	return hosts
}
