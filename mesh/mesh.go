package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// DHTPrefix is the protocol prefix of infermesh's private Kademlia DHT:
// its peers speak /infermesh/kad/1.0.0 and never the public IPFS DHT.
const DHTPrefix = "/infermesh"

// mdnsService is the mDNS service name nodes announce on the LAN.
const mdnsService = "infermesh"

// Defaults of Config.
const (
	DefaultRecordTTL   = 5 * time.Minute
	DefaultViewRefresh = 5 * time.Second
	DefaultCoordEvery  = 30 * time.Second
	DefaultMaxModels   = 64
	// reprovideEvery re-announces provider records well inside the DHT's
	// 48 h provider expiry.
	reprovideEvery = 12 * time.Hour
)

// Config configures a Mesh. Zero values take the defaults named on each
// field.
type Config struct {
	// Key is the node's identity (required).
	Key crypto.PrivKey
	// ListenAddrs are QUIC multiaddrs; empty means DefaultListenAddrs.
	ListenAddrs []string
	// Bootstrap peers are dialled at start and seed the DHT.
	Bootstrap []peer.AddrInfo
	// MDNS finds peers on the LAN. Off in tests: it multicasts.
	MDNS bool
	// NAT turns on port mapping, the AutoNAT service and hole punching.
	NAT bool
	// DHTMode is "server", "client" or "auto" (empty): auto serves the DHT
	// once AutoNAT finds the node reachable, and at once when NAT is off
	// or the mesh is private (autoServer).
	DHTMode string
	// RecordTTL is how long a published capacity record is valid
	// (DefaultRecordTTL). It is republished every RecordTTL/3.
	RecordTTL time.Duration
	// ViewRefresh is how often the view re-reads the models it was asked
	// about (DefaultViewRefresh); a lookup older than this refreshes first.
	ViewRefresh time.Duration
	// CoordEvery is how often the node measures RTTs to the peers it is
	// connected to, to update its network coordinate (DefaultCoordEvery).
	CoordEvery time.Duration
	// MaxModels bounds how many models the view keeps (DefaultMaxModels).
	MaxModels int
	// Version is the software version advertised.
	Version string
	// HostOptions are extra libp2p options, applied last (a simulated
	// network in tests and simulations).
	HostOptions []libp2p.Option
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// Store holds the blocks and manifests this node serves to peers on
	// BlocksProtocol (nil: none).
	Store shards.Store
}

func (c *Config) defaults() error {
	if c.Key == nil {
		return errors.New("mesh: no identity key")
	}
	if c.RecordTTL <= 0 {
		c.RecordTTL = DefaultRecordTTL
	}
	if c.RecordTTL > protocol.MaxRecordTTL {
		return fmt.Errorf("mesh: record TTL %s over the %s that peers accept", c.RecordTTL, protocol.MaxRecordTTL)
	}
	if c.ViewRefresh <= 0 {
		c.ViewRefresh = DefaultViewRefresh
	}
	if c.CoordEvery <= 0 {
		c.CoordEvery = DefaultCoordEvery
	}
	if c.MaxModels <= 0 {
		c.MaxModels = DefaultMaxModels
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	switch c.DHTMode {
	case "", "auto", "server", "client":
	default:
		return fmt.Errorf("mesh: DHT mode %q: want auto, server or client", c.DHTMode)
	}
	return nil
}

// Advert is what the node tells the mesh about itself; the mesh adds the
// addresses, coordinate, sequence and expiry, signs it and publishes it.
type Advert struct {
	Accelerators []protocol.Accelerator
	Models       []protocol.ServedSpan
	Load         protocol.Load
}

// Mesh is a node's membership of the mesh: its libp2p host, the private
// DHT, its network coordinate, its published capacity record and its view
// of everyone else's. Its methods are safe for concurrent use.
type Mesh struct {
	cfg    Config
	log    *slog.Logger
	host   host.Host
	dht    *dht.IpfsDHT
	coords *Coordinates
	view   *View
	stage  *stage
	bans   bans // peers that failed our requests, for a while
	own    ownSessions
	advert func() Advert
	mdns   mdns.Service
	// dhtWhy says why the DHT is in the mode it started in.
	dhtWhy string

	pubMu   sync.Mutex // serialises Publish
	seq     uint64
	current *protocol.CapacityRecord // last published
	closing bool
	provide []cid.Cid // what we announce as provider, re-announced periodically

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// spawnMu orders spawn against shutdown: every goroutine started on
	// wg is started before shutdown waits for them, none after.
	spawnMu  sync.Mutex
	stopping bool
}

// New starts a node's mesh membership: host, DHT (bootstrapped from
// cfg.Bootstrap), coordinates, the first capacity record (from advert), and
// the background loops that keep them fresh. On failure half-way it closes
// what it started.
func New(ctx context.Context, cfg Config, advert func() Advert) (_ *Mesh, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	m := &Mesh{cfg: cfg, log: cfg.Logger.With("subsystem", "mesh"), advert: advert}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			m.shutdown()
		}
	}()
	if m.host, err = newHost(cfg); err != nil {
		return nil, err
	}
	mode := dht.ModeAuto
	switch cfg.DHTMode {
	case "server":
		mode, m.dhtWhy = dht.ModeServer, "configured"
	case "client":
		mode, m.dhtWhy = dht.ModeClient, "configured"
	default:
		m.dhtWhy = "auto: server once AutoNAT finds the node reachable"
		if why := autoServer(cfg.NAT, m.host.Addrs(), cfg.Bootstrap); why != "" {
			mode, m.dhtWhy = dht.ModeServer, "auto: "+why
		}
	}
	m.dht, err = dht.New(m.host,
		dht.ProtocolPrefix(DHTPrefix),
		dht.Mode(mode),
		dht.BootstrapPeers(cfg.Bootstrap...),
		dht.NamespacedValidator(protocol.CapacityNamespace, CapacityValidator{}),
		dht.MaxRecordAge(protocol.MaxRecordTTL),
	)
	if err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	if m.coords, err = NewCoordinates(m.host, CoordConfig{Logger: m.log}); err != nil {
		return nil, err
	}
	m.view = newView(m)
	m.stage = newStage(m)
	m.host.Network().Notify(&network.NotifyBundle{DisconnectedF: func(_ network.Network, c network.Conn) {
		p := c.RemotePeer()
		if len(m.host.Network().ConnsToPeer(p)) > 0 {
			return
		}
		m.stage.peerGone(p)
		if m.ctx.Err() == nil && m.view.serves(p) {
			// Gone, or only idle? One quick dial tells: a peer that does
			// not answer stays out of routes until it publishes again.
			m.spawn(func() {
				ctx, cancel := context.WithTimeout(m.ctx, linkDialTimeout)
				defer cancel()
				if err := m.host.Connect(ctx, peer.AddrInfo{ID: p}); err != nil && m.ctx.Err() == nil {
					m.view.distrust(p)
				}
			})
		}
	}})
	m.host.SetStreamHandler(RecordProtocol, m.unlessClosing(m.handleRecord))
	m.host.SetStreamHandler(ManifestProtocol, m.unlessClosing(m.handleManifest))
	m.host.SetStreamHandler(BlocksProtocol, m.unlessClosing(newBlockServer(m, cfg.Store).handle))
	if err := m.connectBootstrap(ctx); err != nil {
		return nil, err
	}
	if err := m.dht.Bootstrap(m.ctx); err != nil {
		return nil, fmt.Errorf("dht bootstrap: %w", err)
	}
	if cfg.MDNS {
		m.mdns = mdns.NewMdnsService(m.host, mdnsService, mdnsNotifee{m})
		if err := m.mdns.Start(); err != nil {
			return nil, fmt.Errorf("mdns: %w", err)
		}
	}
	m.spawn(func() { m.coords.Run(m.ctx, m.connectedPeers, cfg.CoordEvery) })
	m.spawn(m.republishLoop)
	m.spawn(m.view.refreshLoop)
	m.spawn(m.stage.expiryLoop)
	return m, nil
}

// autoServer says why a node in DHT mode auto should serve the DHT from
// the start, or "" to leave it to AutoNAT. AutoNAT only judges a node
// reachable when peers offering its service dial it back: with NAT
// traversal off (ours and, usually, the peers') or in a private mesh
// (loopback or LAN addresses only, for the node and its bootstrap peers)
// that never happens, and a mesh of DHT clients stores no provider
// records: `shard pull` finds nobody. A node with private addresses
// joining through public peers is likely behind a NAT, and stays auto.
// It is pure.
func autoServer(nat bool, addrs []ma.Multiaddr, bootstrap []peer.AddrInfo) string {
	if !nat {
		return "NAT traversal off (--no-nat)"
	}
	private := func(a ma.Multiaddr) bool { return manet.IsIPLoopback(a) || manet.IsPrivateAddr(a) }
	if len(addrs) == 0 {
		return ""
	}
	for _, a := range addrs {
		if !private(a) {
			return ""
		}
	}
	for _, ai := range bootstrap {
		for _, a := range ai.Addrs {
			if !private(a) {
				return ""
			}
		}
	}
	return "private mesh (loopback or LAN addresses only)"
}

// DHTMode is the mode the node's DHT is in now: "server" or "client" (a
// node in mode auto moves between them as AutoNAT judges it).
func (m *Mesh) DHTMode() string {
	// A DHT server, and only a server, takes streams of the DHT protocol
	// (kad-dht does not export its current mode; Mode is the configured one).
	kad := libp2pprotocol.ID(DHTPrefix + "/kad/1.0.0")
	if slices.Contains(m.host.Mux().Protocols(), kad) {
		return "server"
	}
	return "client"
}

// DHTModeReason says why the DHT started in its mode: configured, or
// auto and why.
func (m *Mesh) DHTModeReason() string { return m.dhtWhy }

// connectBootstrap dials the bootstrap peers; it fails only when there were
// some and none answered.
func (m *Mesh) connectBootstrap(ctx context.Context) error {
	if len(m.cfg.Bootstrap) == 0 {
		return nil
	}
	var wg sync.WaitGroup
	errs := make([]error, len(m.cfg.Bootstrap))
	for i, ai := range m.cfg.Bootstrap {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			errs[i] = m.host.Connect(cctx, ai)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err == nil {
			return nil
		}
	}
	return fmt.Errorf("no bootstrap peer answered: %w", errors.Join(errs...))
}

type mdnsNotifee struct{ m *Mesh }

func (n mdnsNotifee) HandlePeerFound(ai peer.AddrInfo) {
	if ai.ID == n.m.host.ID() {
		return
	}
	ctx, cancel := context.WithTimeout(n.m.ctx, 10*time.Second)
	defer cancel()
	if err := n.m.host.Connect(ctx, ai); err != nil {
		n.m.log.Debug("mdns peer unreachable", "peer", ai.ID, "err", err)
		return
	}
	n.m.log.Info("found peer on the LAN", "peer", ai.ID)
}

func (m *Mesh) connectedPeers() []peer.ID { return m.host.Network().Peers() }

// Host is the node's libp2p host.
func (m *Mesh) Host() host.Host { return m.host }

// ID is the node's peer ID.
func (m *Mesh) ID() peer.ID { return m.host.ID() }

// View is the node's view of the mesh.
func (m *Mesh) View() *View { return m.view }

// Coord is the node's current network coordinate.
func (m *Mesh) Coord() protocol.Coordinate { return m.coords.Self() }

// DHT is the node's DHT, for tests and tools.
func (m *Mesh) DHT() *dht.IpfsDHT { return m.dht }

// Connect dials a peer.
func (m *Mesh) Connect(ctx context.Context, ai peer.AddrInfo) error { return m.host.Connect(ctx, ai) }

// Record is the capacity record last published, or nil.
func (m *Mesh) Record() *protocol.CapacityRecord {
	m.pubMu.Lock()
	defer m.pubMu.Unlock()
	return m.current
}

// Publish builds a new capacity record from the advert, signs it and puts
// it in the DHT. The node calls it when what it serves changes; the mesh
// calls it every RecordTTL/3.
func (m *Mesh) Publish(ctx context.Context) error {
	a := m.advert()
	m.pubMu.Lock()
	if m.closing {
		a.Models = nil
	}
	rec := m.nextRecord(a)
	m.pubMu.Unlock()
	data, err := SealCapacity(rec, m.cfg.Key)
	if err != nil {
		return err
	}
	m.view.learn(m.host.ID(), rec)
	m.push(ctx, data)
	if err := m.dht.PutValue(ctx, CapacityKey(m.host.ID()), data); err != nil {
		// A lone node has nobody to store on; its own copy is kept and
		// served when peers arrive and ask.
		if len(m.dht.RoutingTable().ListPeers()) > 0 {
			return fmt.Errorf("publish capacity record: %w", err)
		}
		m.log.Debug("capacity record kept locally until peers arrive", "err", err)
	}
	return nil
}

// nextRecord stamps an advert with sequence, expiry, addresses and
// coordinate. The sequence is the time in milliseconds, kept increasing, so
// that a restarted node's records still win over its old ones.
func (m *Mesh) nextRecord(a Advert) *protocol.CapacityRecord {
	now := time.Now()
	m.seq = max(m.seq+1, uint64(now.UnixMilli()))
	coord := m.coords.Self()
	rec := &protocol.CapacityRecord{
		Seq: m.seq, Expires: now.Add(m.cfg.RecordTTL).UnixMilli(), Version: m.cfg.Version,
		Accelerators: a.Accelerators, Models: a.Models, Load: a.Load, Coord: &coord,
	}
	for _, addr := range m.host.Addrs() {
		rec.Addrs = append(rec.Addrs, addr.String())
	}
	m.current = rec
	return rec
}

// Provide announces the node as a provider of each CID (blocks and models
// it holds) now and periodically after.
func (m *Mesh) Provide(ctx context.Context, cids ...cid.Cid) error {
	m.pubMu.Lock()
	m.provide = append(m.provide, cids...)
	m.pubMu.Unlock()
	var errs []error
	for _, c := range cids {
		if err := m.dht.Provide(ctx, c, true); err != nil && len(m.dht.RoutingTable().ListPeers()) > 0 {
			errs = append(errs, fmt.Errorf("provide %s: %w", c, err))
		}
	}
	return errors.Join(errs...)
}

func (m *Mesh) republishLoop() {
	every := m.cfg.RecordTTL / 3
	nextProvide := time.Now().Add(reprovideEvery)
	for {
		// Jitter, so that nodes started together do not publish together.
		wait := every - time.Duration(rand.Int64N(int64(every)/10+1))
		select {
		case <-m.ctx.Done():
			return
		case <-time.After(wait):
		}
		ctx, cancel := context.WithTimeout(m.ctx, max(every, publishTimeout))
		if err := m.Publish(ctx); err != nil && m.ctx.Err() == nil {
			m.log.Warn("republish failed", "err", err)
		}
		if time.Now().After(nextProvide) {
			m.pubMu.Lock()
			cids := append([]cid.Cid(nil), m.provide...)
			m.pubMu.Unlock()
			for _, c := range cids {
				m.dht.Provide(ctx, c, true)
			}
			nextProvide = time.Now().Add(reprovideEvery)
		}
		cancel()
	}
}

// Bounds of a publish: a republish may wait out dials to peers that
// vanished (5 s on loopback), a closing node's goodbye does not.
const (
	publishTimeout = 10 * time.Second
	goodbyeTimeout = 2 * time.Second
)

// Close leaves the mesh gracefully: it publishes a record serving nothing
// (so views drop this node at once rather than at expiry), then stops the
// loops, the DHT and the host.
func (m *Mesh) Close() error {
	m.pubMu.Lock()
	m.closing = true
	m.pubMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), goodbyeTimeout)
	if err := m.Publish(ctx); err != nil {
		// Peers we are connected to got the goodbye pushed; the others see
		// the record expire. Neither is a reason to fail the shutdown.
		m.log.Warn("goodbye record not stored in the DHT", "err", err)
	}
	cancel()
	return m.shutdown()
}

// spawn runs f on a goroutine that shutdown waits for, unless shutdown
// has begun; it reports whether f was started. (A sync.WaitGroup wants
// every Add before the Wait that may see it reach zero: handlers starting
// goroutines as the mesh shut down raced with that Wait.)
func (m *Mesh) spawn(f func()) bool {
	m.spawnMu.Lock()
	defer m.spawnMu.Unlock()
	if m.stopping {
		return false
	}
	m.wg.Go(f)
	return true
}

// unlessClosing wraps a stream handler so that a mesh shutting down resets
// new streams rather than serve them. Shutdown leaves the handlers in place
// (the host's Close drops them): removing them while streams arrive raced
// with the host's handling of those streams.
func (m *Mesh) unlessClosing(h network.StreamHandler) network.StreamHandler {
	return func(s network.Stream) {
		if m.ctx.Err() != nil {
			s.Reset()
			return
		}
		h(s)
	}
}

func (m *Mesh) shutdown() error {
	m.cancel()
	var errs []error
	if m.mdns != nil {
		errs = append(errs, m.mdns.Close())
	}
	// New streams are reset from here on (unlessClosing); end our stage
	// streams, whose readers are among the goroutines waited for below.
	if m.stage != nil {
		m.stage.closeAll()
	}
	m.spawnMu.Lock()
	m.stopping = true
	m.spawnMu.Unlock()
	m.wg.Wait()
	if m.coords != nil {
		errs = append(errs, m.coords.Close())
	}
	if m.dht != nil {
		errs = append(errs, m.dht.Close())
	}
	if m.host != nil {
		errs = append(errs, m.host.Close())
	}
	return errors.Join(errs...)
}

// Kill stops the node without telling anyone, as a crash would: the host
// goes at once, then the rest. For tests of failover and ageing out.
func (m *Mesh) Kill() error {
	m.cancel()
	m.host.Close()
	return m.shutdown()
}

// WaitRouting waits until the DHT's routing table holds at least one peer
// (a node that just dialled its bootstrap peers adds them once identify
// confirms they speak the DHT), or ctx ends. Lookups before that find
// nothing.
func (m *Mesh) WaitRouting(ctx context.Context) error {
	for m.dht.RoutingTable().Size() == 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("no DHT peer yet: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}
