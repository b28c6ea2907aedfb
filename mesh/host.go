package mesh

import (
	"fmt"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"
)

// DefaultListenAddrs are where a node listens when its config says nothing:
// QUIC on UDP 4001, IPv4 and IPv6.
var DefaultListenAddrs = []string{"/ip4/0.0.0.0/udp/4001/quic-v1", "/ip6/::/udp/4001/quic-v1"}

// Connection manager watermarks: a node keeps its routing table and the
// peers it pipelines with, and trims idle connections past the high mark.
const (
	connLow  = 100
	connHigh = 400
)

// newHost makes the libp2p host: QUIC only (TLS 1.3 and peer IDs from
// libp2p), a resource manager scaled to the machine with room for many
// joining peers (a bootstrap node sees them all at once), a connection
// manager, and NAT traversal when asked: UPnP/NAT-PMP port mapping, the
// AutoNAT service for others, hole punching, and the relay client (on by
// default in libp2p).
func newHost(cfg Config) (host.Host, error) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	scaled := limits.AutoScale()
	// Raise inbound connection limits over the defaults: ~100 peers dialing
	// a bootstrap node at once is normal when a mesh starts (FIELD-NOTES).
	partial := rcmgr.PartialLimitConfig{System: rcmgr.ResourceLimits{
		Conns: rcmgr.LimitVal(2048), ConnsInbound: rcmgr.LimitVal(1024), ConnsOutbound: rcmgr.LimitVal(1024),
		Streams: rcmgr.LimitVal(16384), StreamsInbound: rcmgr.LimitVal(8192), StreamsOutbound: rcmgr.LimitVal(8192),
	}}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(partial.Build(scaled)))
	if err != nil {
		return nil, fmt.Errorf("resource manager: %w", err)
	}
	cm, err := connmgr.NewConnManager(connLow, connHigh)
	if err != nil {
		return nil, err
	}
	listen := cfg.ListenAddrs
	if len(listen) == 0 {
		listen = DefaultListenAddrs
	}
	opts := []libp2p.Option{
		libp2p.Identity(cfg.Key),
		libp2p.ListenAddrStrings(listen...),
		libp2p.Transport(libp2pquic.NewTransport),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
		libp2p.UserAgent("infermesh/" + cfg.Version),
	}
	if cfg.NAT {
		opts = append(opts, libp2p.NATPortMap(), libp2p.EnableNATService(), libp2p.EnableHolePunching())
	}
	h, err := libp2p.New(append(opts, cfg.HostOptions...)...)
	if err != nil {
		rm.Close()
		return nil, fmt.Errorf("libp2p host: %w", err)
	}
	return h, nil
}
