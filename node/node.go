package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Version is the software version a node advertises; the build sets it.
var Version = "dev"

// Options are the parts of a node that are not configuration.
type Options struct {
	// DataDir holds the identity and config (DefaultDataDir when empty).
	DataDir string
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// MeasureRounds is how many timed passes per served block the start-up
	// benchmark runs (default 5).
	MeasureRounds int
	// HostOptions are extra libp2p options for the node's host (a
	// simulated network in tests and benchmarks).
	HostOptions []libp2p.Option
}

// Node is a running infermesh node: it serves spans of local models, is a
// member of the mesh, and answers the local HTTP API.
type Node struct {
	cfg  Config
	opts Options
	log  *slog.Logger

	rt           *shards.Runtime
	accelerators []protocol.Accelerator // found at start; they do not change while running
	metrics      *metrics
	recent       recentLog         // GET /v1/requests
	jobs         jobs              // batch jobs (POST /v1/jobs)
	own          *shards.FileStore // DATA/blocks: fetched, published and pulled blocks
	disk         *disk             // own's cap (--max-disk): accounting and eviction
	store        stores            // own, then the --serve models' block folders
	servedMu     sync.RWMutex
	served       []*servedSpan
	damaged      []*damagedSpan // --serve spans with bad blocks, until repairSpans
	// blocks being repaired after a read failed verification (blockFailed)
	repairs struct {
		sync.Mutex
		m map[string]bool
	}
	subs subSpans
	// manifests fetched from peers, by model ID (verified against it)
	manifests struct {
		sync.Mutex
		m map[string]*shards.Manifest
	}
	codecs textCodecs // parsed tokenizers of the text models asked for
	mesh   *mesh.Mesh
	api    *http.Server
	apiLn  net.Listener // bound first thing in New, served once the node is up
	unlock func() error // releases DATA/lock
	// leaving is set by a graceful stop handing its blocks off: the
	// record then serves nothing (see handoff)
	leaving atomic.Bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// servedSpan is a span of a local model this node serves.
type servedSpan struct {
	model  *shards.Model
	span   *shards.Span
	start  int
	end    int
	micros []float64
	joined *joined // set for models served by ID (--model)
	reason string  // why this node serves these blocks (placement's explanation)
}

// New starts a node: it loads and verifies the spans it serves, measures
// them, joins the mesh, announces them and starts the API. On failure
// half-way it closes what it started.
func New(ctx context.Context, cfg Config, opts Options) (_ *Node, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if opts.DataDir == "" {
		opts.DataDir = DefaultDataDir()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MeasureRounds <= 0 {
		opts.MeasureRounds = 5
	}
	n := &Node{cfg: cfg, opts: opts, log: opts.Logger}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	// Before anything else: one node per data directory (one identity, one
	// block store), and the API port, so that a second node on a machine
	// fails at once rather than after joining the mesh and loading blocks.
	if n.unlock, err = lockDataDir(opts.DataDir); err != nil {
		return nil, err
	}
	if n.apiLn, err = listenAPI(cfg.API); err != nil {
		return nil, err
	}
	key, err := loadIdentity(filepath.Join(opts.DataDir, IdentityFile))
	if err != nil {
		return nil, err
	}
	n.accelerators = Accelerators()
	n.metrics = newMetrics()
	own, err := shards.OpenFileStore(filepath.Join(opts.DataDir, "blocks"))
	if err != nil {
		return nil, err
	}
	// Ours alone (DATA/lock is held): what a killed transfer left is junk.
	if removed, err := own.RemoveTemp(); err != nil {
		n.log.Warn("leftover temporary files not removed", "dir", own.Dir(), "err", err)
	} else if removed > 0 {
		n.log.Info("removed temporary files a stopped transfer left", "dir", own.Dir(), "files", removed)
	}
	n.own, n.store = own, stores{own}
	n.disk = newDisk(n, own, n.metrics.reg)
	if err := n.loadSpans(ctx); err != nil {
		return nil, err
	}
	bootstrap, err := parseBootstrap(cfg.Bootstrap)
	if err != nil {
		return nil, err
	}
	n.mesh, err = mesh.New(ctx, mesh.Config{
		Key: key, ListenAddrs: cfg.Listen, Bootstrap: bootstrap, MDNS: !cfg.NoMDNS, NAT: !cfg.NoNAT,
		DHTMode: cfg.DHTMode, RecordTTL: time.Duration(cfg.RecordTTL), ViewRefresh: time.Duration(cfg.ViewRefresh),
		Version: Version, Logger: n.log, Store: watchedStore{n},
		HostOptions: append([]libp2p.Option{libp2p.PrometheusRegisterer(n.metrics.reg)}, opts.HostOptions...),
	}, n.advert)
	if err != nil {
		return nil, err
	}
	n.mesh.Serve(n, mesh.StageConfig{MaxInFlight: cfg.MaxInFlight, MaxSessions: cfg.MaxSessions})
	n.metrics.gauges(n)
	n.log.Info("node started", "peer", n.mesh.ID(), "addrs", n.mesh.Host().Addrs(),
		"dht_mode", n.mesh.DHTMode(), "dht_mode_why", n.mesh.DHTModeReason())
	unserved := n.repairSpans(ctx)
	if err := n.joinModels(ctx); err != nil {
		return nil, err
	}
	if len(unserved) > 0 && len(n.servedSpans()) == 0 {
		return nil, fmt.Errorf("nothing to serve: %w", errors.Join(unserved...))
	}
	if len(cfg.Models) > 0 {
		n.wg.Go(n.rebalanceLoop)
	}
	// Announce in the background: the record reaches connected peers by
	// push at once, but DHT puts can wait seconds on peers that left.
	n.wg.Go(func() {
		if err := n.mesh.Publish(n.ctx); err != nil && n.ctx.Err() == nil {
			n.log.Warn("first capacity record not stored yet", "err", err)
		}
		if err := n.mesh.Provide(n.ctx, n.provided()...); err != nil && n.ctx.Err() == nil {
			n.log.Warn("provider records not stored yet", "err", err)
		}
	})
	if err := n.startAPI(); err != nil {
		return nil, err
	}
	n.wg.Go(n.coverageLog)
	return n, nil
}

// loadSpans opens, verifies, loads and measures every --serve span.
func (n *Node) loadSpans(ctx context.Context) error {
	if len(n.cfg.Serve) == 0 {
		return nil
	}
	var err error
	n.rt, err = shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: n.cfg.Threads, Provider: n.cfg.Provider, Logger: n.log})
	if err != nil {
		return err
	}
	for _, s := range n.cfg.Serve {
		dir, start, end, _ := ParseServe(s)
		m, err := shards.OpenModel(dir)
		if err != nil {
			return err
		}
		if end < 0 {
			end = len(m.Manifest.Blocks)
		}
		if end > len(m.Manifest.Blocks) {
			return fmt.Errorf("--serve %s: model %s has %d blocks (0-%d)", s, m.ID, len(m.Manifest.Blocks), len(m.Manifest.Blocks)-1)
		}
		// LoadSpan reads every block through the store, which verifies it
		// against its CID: nothing unverified is announced. A block that
		// fails (truncated, corrupted, missing) is set aside and the span
		// repaired from peers once the node is in the mesh (repairSpans).
		span, err := n.rt.LoadSpan(m, start, end)
		if errors.Is(err, shards.ErrCorrupt) || errors.Is(err, shards.ErrNotFound) {
			n.store = append(n.store, m.Store) // its good blocks and files still serve peers
			n.damaged = append(n.damaged, n.damagedSpan(s, m, start, end, err))
			continue
		}
		if err != nil {
			return fmt.Errorf("--serve %s: %w", s, err)
		}
		micros, err := measureSpan(ctx, n.rt, m, start, end, n.opts.MeasureRounds)
		if err != nil {
			span.Close()
			return fmt.Errorf("--serve %s: measuring blocks: %w", s, err)
		}
		n.addServed(&servedSpan{model: m, span: span, start: start, end: end, micros: micros})
		n.store = append(n.store, m.Store)
		n.log.Info("serving", "model", m.ID, "name", m.Manifest.Name, "blocks", fmt.Sprintf("%d-%d of %d", start, end-1, len(m.Manifest.Blocks)),
			"pass_us", fmt.Sprintf("%.0f", sum(micros)))
	}
	return nil
}

// servedSpans is a snapshot of the spans served now.
func (n *Node) servedSpans() []*servedSpan {
	n.servedMu.RLock()
	defer n.servedMu.RUnlock()
	return append([]*servedSpan(nil), n.served...)
}

func (n *Node) addServed(s *servedSpan) {
	n.servedMu.Lock()
	n.served = append(n.served, s)
	n.servedMu.Unlock()
}

// dropServed stops serving s (the caller closes its span once in-flight
// work is done).
func (n *Node) dropServed(s *servedSpan) {
	n.servedMu.Lock()
	n.served = slices.DeleteFunc(n.served, func(x *servedSpan) bool { return x == s })
	n.servedMu.Unlock()
}

func sum(v []float64) float64 {
	t := 0.0
	for _, x := range v {
		t += x
	}
	return t
}

func parseBootstrap(addrs []string) ([]peer.AddrInfo, error) {
	var out []peer.AddrInfo
	for _, a := range addrs {
		ai, err := peer.AddrInfoFromString(a)
		if err != nil {
			return nil, fmt.Errorf("bootstrap peer %q: %w (want a multiaddr ending in /p2p/PEER_ID)", a, err)
		}
		out = append(out, *ai)
	}
	return out, nil
}

// provided lists the CIDs this node announces: each served model and every
// block of its spans.
func (n *Node) provided() []cid.Cid {
	var out []cid.Cid
	for _, s := range n.servedSpans() {
		out = append(out, s.model.ID)
		out = append(out, s.model.Manifest.FileCIDs()...)
		for _, b := range s.model.Manifest.Blocks[s.start:s.end] {
			if c, err := shards.ParseCID(b.CID); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// advert is what the mesh publishes about this node.
func (n *Node) advert() mesh.Advert {
	a := mesh.Advert{Accelerators: n.accelerators}
	var resident int64
	for _, s := range n.servedSpans() {
		if n.leaving.Load() {
			break
		}
		bytes := s.model.Manifest.ResidentBytes(s.start, s.end)
		resident += bytes
		a.Models = append(a.Models, protocol.ServedSpan{Model: s.model.ID.String(), Blocks: len(s.model.Manifest.Blocks),
			Start: s.start, End: s.end, BlockMicros: s.micros, ResidentBytes: bytes})
	}
	if n.mesh != nil {
		a.Load = n.mesh.Load()
	}
	if budget := n.memoryBudget(); budget > 0 {
		a.Load.FreeKVBytes = max(0, budget-resident) // what the blocks leave of the budget
	}
	return a
}

// ManifestBytes implements mesh.ManifestSource for the models served here
// and those in the node's store (published or pulled).
func (n *Node) ManifestBytes(model string) ([]byte, bool) {
	for _, s := range n.servedSpans() {
		if s.model.ID.String() == model {
			b, err := s.model.Manifest.Encode()
			return b, err == nil
		}
	}
	if id, err := shards.ParseCID(model); err == nil && id.Prefix().Codec == shards.CodecManifest {
		if b, err := n.store.Get(id); err == nil {
			return b, true
		}
	}
	return nil, false
}

// Mesh is the node's mesh membership.
func (n *Node) Mesh() *mesh.Mesh { return n.mesh }

// APIAddr is the address the HTTP API listens on.
func (n *Node) APIAddr() string { return n.apiLn.Addr().String() }

// ServedModels are the IDs of the models this node serves spans of.
func (n *Node) ServedModels() []cid.Cid {
	var out []cid.Cid
	for _, s := range n.servedSpans() {
		out = append(out, s.model.ID)
	}
	return out
}

// coverageLog logs each served model's coverage when it changes, so the
// operator sees in the log what the mesh serves.
func (n *Node) coverageLog() {
	last := map[string]string{}
	t := time.NewTicker(max(time.Duration(n.cfg.ViewRefresh), time.Second))
	defer t.Stop()
	for {
		for _, s := range n.servedSpans() {
			ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
			mv, err := n.mesh.View().Model(ctx, s.model.ID)
			cancel()
			if err != nil {
				continue
			}
			summary := coverageSummary(mv, len(s.model.Manifest.Blocks))
			if summary != last[mv.Model] {
				last[mv.Model] = summary
				n.log.Info("coverage", "model", mv.Model, "state", summary)
			}
		}
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// coverageSummary is one line: complete or which blocks nobody serves, and
// how many peers serve each block. blocks is the model's block count from
// its manifest: a view that knows no server yet (not even this node's own
// record, published in the background) has none, and every block is
// missing from it.
func coverageSummary(mv *mesh.ModelView, blocks int) string {
	var b strings.Builder
	switch {
	case mv.Complete():
		fmt.Fprintf(&b, "complete, %d peers", len(mv.Peers))
	case mv.Blocks == 0:
		fmt.Fprintf(&b, "INCOMPLETE (no server known yet: blocks %s missing), %d peers", blockRanges(seq(blocks)), len(mv.Peers))
	default:
		fmt.Fprintf(&b, "INCOMPLETE (nobody serves blocks %s), %d peers", blockRanges(mv.Uncovered), len(mv.Peers))
	}
	b.WriteString("; servers per block:")
	for _, who := range mv.ByBlock {
		fmt.Fprintf(&b, " %d", len(who))
	}
	return b.String()
}

// seq is 0..n-1.
func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// blockRanges writes sorted block numbers as ranges: "0-3, 7, 9-10".
func blockRanges(blocks []int) string {
	if len(blocks) == 0 {
		return "none"
	}
	var parts []string
	for i := 0; i < len(blocks); {
		j := i
		for j+1 < len(blocks) && blocks[j+1] == blocks[j]+1 {
			j++
		}
		if i == j {
			parts = append(parts, strconv.Itoa(blocks[i]))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", blocks[i], blocks[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ", ")
}

// Close leaves the mesh gracefully: it first hands off the blocks only it
// serves (see handoff; up to HandoffWait), then publishes an empty record,
// stops the API and unloads the spans.
func (n *Node) Close() error {
	var errs []error
	n.handoff()
	n.cancel()
	if n.api != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		errs = append(errs, n.api.Shutdown(ctx))
		cancel()
		os.Remove(filepath.Join(n.opts.DataDir, APIFile))
	} else if n.apiLn != nil {
		n.apiLn.Close() // bound, never served: New failed half-way
	}
	n.wg.Wait()
	if n.mesh != nil {
		errs = append(errs, n.mesh.Close())
	}
	for _, s := range n.servedSpans() {
		errs = append(errs, s.span.Close())
	}
	n.subs.mu.Lock()
	for _, sp := range n.subs.spans {
		errs = append(errs, sp.Close())
	}
	n.subs.spans = nil
	n.subs.mu.Unlock()
	if n.unlock != nil {
		errs = append(errs, n.unlock()) // last: the data directory is free again
		n.unlock = nil
	}
	return errors.Join(errs...)
}

// LockFile, in the data directory, is locked by the node running on it;
// it holds that node's pid.
const LockFile = "lock"

// DataDirInUseError is New's error when another node holds the data
// directory's lock.
type DataDirInUseError struct {
	Dir string
	PID int // of the node holding it; 0 when unknown
}

func (e *DataDirInUseError) Error() string {
	pid := "pid unknown"
	if e.PID > 0 {
		pid = fmt.Sprintf("pid %d", e.PID)
	}
	return fmt.Sprintf("%s is in use by another infermesh node (%s)", e.Dir, pid)
}

// sortedPeers orders peer IDs for stable output.
func sortedPeers(ps []peer.ID) []peer.ID {
	sort.Slice(ps, func(i, j int) bool { return ps[i] < ps[j] })
	return ps
}
