package mesh

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/quicreuse"
	"github.com/marcopolo/simnet"
	"github.com/multiformats/go-multiaddr"
	"github.com/quic-go/quic-go"
	"go.uber.org/fx"
)

// simnetHosts starts n real libp2p hosts that speak QUIC over an in-memory
// simnet (github.com/marcopolo/simnet): no packet leaves the process. Host
// i listens on 127.0.0.(i+1):8000 inside the simnet, and a packet from host
// i to host j is delivered after oneWay(i, j). It is the same wiring as
// go-libp2p's x/simlibp2p (QUICSimnet), without that package's testify
// dependency. Hosts and network close at cleanup; call it inside a
// synctest bubble to run on virtual time.
func simnetHosts(t testing.TB, n int, oneWay func(from, to int) time.Duration) []host.Host {
	t.Helper()
	if n > 250 {
		t.Fatalf("simnetHosts: %d hosts, at most 250", n)
	}
	index := make(map[netip.Addr]int, n)
	ip := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 0, byte(i + 1)}) }
	for i := range n {
		index[ip(i)] = i
	}
	node := func(a net.Addr) (int, bool) {
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return 0, false
		}
		i, ok := index[ap.Addr().Unmap()]
		return i, ok
	}
	nw := &simnet.Simnet{LatencyFunc: func(p *simnet.Packet) time.Duration {
		from, ok1 := node(p.From)
		to, ok2 := node(p.To)
		if !ok1 || !ok2 {
			return 0
		}
		return oneWay(from, to)
	}}
	link := simnet.NodeBiDiLinkSettings{
		Downlink: simnet.LinkSettings{BitsPerSecond: 1000 * simnet.Mibps},
		Uplink:   simnet.LinkSettings{BitsPerSecond: 1000 * simnet.Mibps},
	}
	hosts := make([]host.Host, 0, n)
	t.Cleanup(func() {
		for _, h := range hosts {
			_ = h.Close()
		}
		nw.Close()
	})
	for i := range n {
		h, err := libp2p.New(
			libp2p.ListenAddrs(multiaddr.StringCast("/ip4/"+ip(i).String()+"/udp/8000/quic-v1")),
			libp2p.Transport(libp2pquic.NewTransport),
			quicSimnet(nw, link),
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
	nw.Start()
	return hosts
}

// quicSimnet makes a host's QUIC transport send and receive through nw
// (x/simlibp2p's QUICSimnet).
func quicSimnet(nw *simnet.Simnet, link simnet.NodeBiDiLinkSettings) libp2p.Option {
	sel := &fixedSourceIP{}
	return libp2p.QUICReuse(
		func(l fx.Lifecycle, reset quic.StatelessResetKey, token quic.TokenGeneratorKey, opts ...quicreuse.Option) (*quicreuse.ConnManager, error) {
			cm, err := quicreuse.NewConnManager(reset, token, opts...)
			if err != nil {
				return nil, err
			}
			l.Append(fx.StopHook(cm.Close))
			return cm, nil
		},
		quicreuse.OverrideSourceIPSelector(func() (quicreuse.SourceIPSelector, error) { return sel, nil }),
		quicreuse.OverrideListenUDP(func(_ string, addr *net.UDPAddr) (net.PacketConn, error) {
			sel.ip.Store(&addr.IP)
			return nw.NewEndpoint(addr, link), nil
		}),
	)
}

// fixedSourceIP answers the host's one listen IP as the source of every
// dial.
type fixedSourceIP struct{ ip atomic.Pointer[net.IP] }

func (s *fixedSourceIP) PreferredSourceIPForDestination(*net.UDPAddr) (net.IP, error) {
	ip := s.ip.Load()
	if ip == nil {
		return nil, errors.New("simnet host not listening yet")
	}
	return *ip, nil
}
