// Package simnettest runs real libp2p QUIC hosts over github.com/marcopolo/simnet,
// an in-memory packet network with per-link latency and bandwidth (the
// wiring of go-libp2p's x/simlibp2p). No packet leaves the process, so tests
// and benchmarks can inject latencies this kernel cannot (it has no netem).
package simnettest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/p2p/transport/quicreuse"
	"github.com/marcopolo/simnet"
	"github.com/quic-go/quic-go"
	"go.uber.org/fx"
)

// Network is a simulated network of numbered nodes; node i listens on
// 127.0.0.(i+1):8000 inside it.
type Network struct {
	sim  *simnet.Simnet
	link simnet.NodeBiDiLinkSettings
}

// New starts a network where a packet from node a to node b takes
// oneWay(a, b), on links of the given bandwidth (bits per second).
func New(oneWay func(a, b int) time.Duration, bitsPerSecond int) *Network {
	nodeOf := func(addr net.Addr) int {
		ap, err := netip.ParseAddrPort(addr.String())
		if err != nil {
			return -1
		}
		b := ap.Addr().Unmap().As4()
		if b[0] != 127 || b[1] != 0 || b[2] != 0 || b[3] == 0 {
			return -1
		}
		return int(b[3]) - 1
	}
	sim := &simnet.Simnet{LatencyFunc: func(p *simnet.Packet) time.Duration {
		a, b := nodeOf(p.From), nodeOf(p.To)
		if a < 0 || b < 0 {
			return 0
		}
		return oneWay(a, b)
	}}
	sim.Start()
	ls := simnet.LinkSettings{BitsPerSecond: bitsPerSecond}
	return &Network{sim: sim, link: simnet.NodeBiDiLinkSettings{Downlink: ls, Uplink: ls}}
}

// Close stops the network.
func (n *Network) Close() { n.sim.Close() }

// ListenAddr is node i's QUIC listen multiaddr inside the network.
func ListenAddr(i int) string {
	if i < 0 || i > 253 {
		panic(fmt.Sprintf("simnettest: node %d out of range", i))
	}
	return fmt.Sprintf("/ip4/127.0.0.%d/udp/8000/quic-v1", i+1)
}

// HostOption makes a libp2p host's QUIC transport use the network. Give
// each host its own.
func (n *Network) HostOption() libp2p.Option {
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
			return n.sim.NewEndpoint(addr, n.link), nil
		}),
	)
}

type fixedSourceIP struct{ ip atomic.Pointer[net.IP] }

func (s *fixedSourceIP) PreferredSourceIPForDestination(*net.UDPAddr) (net.IP, error) {
	ip := s.ip.Load()
	if ip == nil {
		return nil, errors.New("simnet host not listening yet")
	}
	return *ip, nil
}
