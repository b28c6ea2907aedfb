package mesh

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// View answers, for a model, which peers serve each of its blocks, with
// their capacity records and estimated RTTs: the input of routing. It caches
// what it learns from the DHT, refreshes the models it was asked about in
// the background, and forgets models nobody asked about (at most MaxModels
// are kept). Records are checked for expiry on every read.
type View struct {
	m *Mesh

	mu      sync.Mutex
	models  map[string]*modelEntry
	records map[peer.ID]*recordEntry
	// seen holds, per peer with a record here, the load its latest
	// progress or result frame said (observeLoad).
	seen map[peer.ID]loadSeen
	// manifests holds the block count of each model whose manifest this
	// node was given (SetManifest): what the model is, which no peer's
	// record can change. A model this node serves needs no entry: its own
	// record, made from the manifest, says the same (FitBlocks).
	manifests map[string]int
}

// LoadHalfLife is how fast the load a peer's answer reported fades back to
// its capacity record's value (FreshLoad): half of the difference is left
// after each half-life. A few seconds: far fresher than a record (refreshed
// every third of its TTL), long enough to cover the next requests of a
// burst.
const LoadHalfLife = 3 * time.Second

// SessionsFullLoad is the queue FreshLoad gives a hop whose session table
// is full: with RouteLoadSlots 4, its blocks count 17 times as slow, so
// that another replica wins unless it is far worse.
const SessionsFullLoad = 64

// loadForget is the age past which an answer's load no longer counts.
const loadForget = 10 * LoadHalfLife

// maxSeenLoad bounds the counts an answer may claim.
const maxSeenLoad = 1 << 16

type loadSeen struct {
	load protocol.HopLoad
	at   time.Time
}

// FreshLoad is the load routing assumes for a peer whose capacity record
// says rec and whose answer, age ago, said seen: rec moved towards seen by
// 2^(-age/LoadHalfLife) of the difference, rounded (so the answer counts
// in full at once, and fades into the record). Negative counts in seen
// count as 0. It is pure.
//
// A hop that said it has no free session counts as SessionsFullLoad
// requests waiting at least: a new session there would be answered busy,
// so routes go elsewhere while the answer is fresh, and back as it fades.
func FreshLoad(rec protocol.Load, seen protocol.HopLoad, age time.Duration) protocol.Load {
	if seen.FreeSessions != nil && *seen.FreeSessions <= 0 {
		seen.Queued = max(seen.Queued, SessionsFullLoad)
	}
	w := math.Exp2(-max(float64(age), 0) / float64(LoadHalfLife))
	blend := func(r, s int) int {
		s = min(max(s, 0), maxSeenLoad)
		return int(math.Round(float64(r) + (float64(s)-float64(r))*w))
	}
	out := rec
	out.InFlight, out.Queued = blend(rec.InFlight, seen.InFlight), blend(rec.Queued, seen.Queued)
	return out
}

// observeLoad takes the load a peer's progress or result frame carried, at
// time now. Peers the view holds no record of are ignored.
func (v *View) observeLoad(p peer.ID, l protocol.HopLoad, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.records[p]; !ok {
		return
	}
	if len(v.seen) >= 2*len(v.records)+64 {
		for q, s := range v.seen {
			if _, ok := v.records[q]; !ok || now.Sub(s.at) > loadForget {
				delete(v.seen, q)
			}
		}
	}
	v.seen[p] = loadSeen{load: l, at: now}
}

// maxManifests bounds the manifests' block counts a view remembers;
// dropping them all is always safe (they are asked for again).
const maxManifests = 256

type modelEntry struct {
	id        cid.Cid
	providers map[peer.ID]bool
	refreshed time.Time // last DHT refresh
	used      time.Time // last lookup
	inflight  chan struct{}
	err       error
}

type recordEntry struct {
	rec     *protocol.CapacityRecord
	fetched time.Time
	// distrusted: this node failed to reach the peer since it got this
	// record. The peer stays out of routes until a newer record shows it
	// alive again, or this one expires.
	distrusted bool
	// misfit: the models whose span in this record was found not to fit
	// the model (logged once per record).
	misfit map[string]bool
}

// ModelView is one model's coverage at a moment.
type ModelView struct {
	Model string
	// Blocks is the model's block count: its manifest's when this node
	// has it; else this node's own span's, else the count most of its
	// servers agree on (FitBlocks). 0 when no peer whose span fits the
	// model serves it.
	Blocks int
	// Peers serving some span of the model, nearest first.
	Peers []PeerView
	// ByBlock lists, for each block, the indexes in Peers of who serves it.
	ByBlock [][]int
	// Uncovered lists the blocks nobody serves.
	Uncovered []int
	// Updated is when the view last refreshed the model from the DHT.
	Updated time.Time
	// Distrusted are the peers serving the model that this node failed to
	// reach since their last record: left out of Peers and the coverage,
	// they are routing's last resort.
	Distrusted []PeerView
	// Ignored are the peers whose record claims a span that does not fit
	// the model (another block count, a span out of range): never routed
	// to, never counted, whatever they claim.
	Ignored []PeerView
}

// PeerView is a peer serving part of a model.
type PeerView struct {
	ID     peer.ID
	Span   protocol.ServedSpan
	Record *protocol.CapacityRecord
	// RTT is the estimated round trip from this node, from network
	// coordinates: 0 for this node itself, UnknownRTT (negative) when either
	// coordinate is missing or unusable.
	RTT time.Duration
	// Load, when not nil, is the load routing uses instead of the
	// record's: the record's moved towards what the peer's latest answer
	// said (FreshLoad).
	Load *protocol.Load
	// Coord, when not nil, is the coordinate routing uses instead of the
	// record's: the one the peer answered when this node last measured it
	// over the coord protocol, fresher than a record refreshed every
	// TTL/3 (a new node's first coordinates move by milliseconds).
	Coord *protocol.Coordinate
}

// observedCoordFresh is how old a coordinate a peer answered may be and
// still be preferred to its record's.
const observedCoordFresh = 5 * time.Minute

// Complete reports whether every block has at least one server.
func (v *ModelView) Complete() bool { return v.Blocks > 0 && len(v.Uncovered) == 0 }

func newView(m *Mesh) *View {
	return &View{m: m, models: map[string]*modelEntry{}, records: map[peer.ID]*recordEntry{}, manifests: map[string]int{},
		seen: map[peer.ID]loadSeen{}}
}

// SetManifest tells the view the manifest of a model (the caller checked
// it against the model's CID): from then on the model's view takes its
// block count from the manifest, and leaves out every peer whose record
// does not fit it. Safe for concurrent use.
func (v *View) SetManifest(model cid.Cid, man *shards.Manifest) {
	if man == nil || len(man.Blocks) == 0 {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.setBlocksLocked(model.String(), len(man.Blocks))
}

func (v *View) setBlocksLocked(model string, blocks int) {
	if _, ok := v.manifests[model]; !ok && len(v.manifests) >= maxManifests {
		v.manifests = map[string]int{}
	}
	v.manifests[model] = blocks
}

// SpanFits reports whether a served span fits a model of blocks blocks:
// the same block count, and a non-empty span within it with one timing per
// block.
func SpanFits(s protocol.ServedSpan, blocks int) bool {
	return blocks > 0 && s.Blocks == blocks && s.Start >= 0 && s.Start < s.End && s.End <= blocks &&
		len(s.BlockMicros) == s.End-s.Start
}

// FitBlocks decides a model's block count from what its servers claim:
// manifest, the count of the model's manifest, when known (> 0); else
// the count of this node's own span (self; mine is 0 when it serves none
// of the model); else the count claimed by the most peers, ties going to
// the count under which the claimed spans cover every block, then to the
// smaller count. One peer's claim never overrides the manifest, this
// node's own, or a majority. It is pure.
func FitBlocks(manifest, mine int, spans []protocol.ServedSpan) int {
	if manifest > 0 {
		return manifest
	}
	if mine > 0 {
		return mine
	}
	votes := map[int]int{}
	for _, s := range spans {
		if SpanFits(s, s.Blocks) {
			votes[s.Blocks]++
		}
	}
	covers := func(n int) bool {
		covered := make([]bool, n)
		for _, s := range spans {
			if s.Blocks == n && SpanFits(s, n) {
				for b := s.Start; b < s.End; b++ {
					covered[b] = true
				}
			}
		}
		return !slices.Contains(covered, false)
	}
	best, bestVotes, bestCovers := 0, 0, false
	for n, c := range votes {
		cv := covers(n)
		switch {
		case c > bestVotes, c == bestVotes && cv && !bestCovers, c == bestVotes && cv == bestCovers && n < best:
			best, bestVotes, bestCovers = n, c, cv
		}
	}
	return best
}

// learn takes a capacity record obtained outside a lookup (our own, or one
// pushed to us) if it is newer than what the view holds, and updates which
// cached models the peer serves. It reports whether the record changes what
// the peer serves (a new peer, a new span, a goodbye): such news is worth
// passing on.
func (v *View) learn(p peer.ID, rec *protocol.CapacityRecord) (news bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	old, ok := v.records[p]
	if ok && old.rec.Seq >= rec.Seq {
		return false
	}
	news = !ok || !sameSpans(old.rec.Models, rec.Models)
	v.records[p] = &recordEntry{rec: rec, fetched: time.Now()}
	for id, e := range v.models {
		if _, serves := rec.Span(id); serves {
			e.providers[p] = true
		} else {
			delete(e.providers, p)
		}
	}
	return news
}

// serves reports whether the view holds a record of p serving something.
func (v *View) serves(p peer.ID) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	r, ok := v.records[p]
	return ok && len(r.rec.Models) > 0
}

// addrs returns the addresses a peer advertises in its capacity record.
func (v *View) addrs(p peer.ID) []ma.Multiaddr {
	v.mu.Lock()
	defer v.mu.Unlock()
	r, ok := v.records[p]
	if !ok {
		return nil
	}
	var out []ma.Multiaddr
	for _, a := range r.rec.Addrs {
		if addr, err := ma.NewMultiaddr(a); err == nil {
			out = append(out, addr)
		}
	}
	return out
}

// distrust keeps a peer this node could not reach out of its views until
// the peer publishes a newer record.
func (v *View) distrust(p peer.ID) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if r, ok := v.records[p]; ok && p != v.m.host.ID() {
		r.distrusted = true
	}
}

func sameSpans(a, b []protocol.ServedSpan) bool {
	return slices.EqualFunc(a, b, func(x, y protocol.ServedSpan) bool {
		return x.Model == y.Model && x.Start == y.Start && x.End == y.End && x.Blocks == y.Blocks
	})
}

// Model returns the coverage of a model. The first lookup of a model waits
// for the DHT; after that the view answers from memory at once (expired
// records left out) and refreshes in the background when its copy is older
// than the refresh interval.
func (v *View) Model(ctx context.Context, id cid.Cid) (*ModelView, error) {
	key := id.String()
	v.mu.Lock()
	e, ok := v.models[key]
	if !ok {
		e = &modelEntry{id: id, providers: map[peer.ID]bool{}}
		v.models[key] = e
		v.evictLocked()
	}
	e.used = time.Now()
	if time.Since(e.refreshed) >= v.m.cfg.ViewRefresh {
		v.startRefreshLocked(e)
	}
	if !e.refreshed.IsZero() {
		mv := v.buildLocked(e)
		v.mu.Unlock()
		return mv, nil
	}
	wait := e.inflight
	v.mu.Unlock()
	select {
	case <-wait:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if e.refreshed.IsZero() {
		return nil, fmt.Errorf("model %s: %w", id, e.err)
	}
	return v.buildLocked(e), nil
}

// startRefreshLocked refreshes e in the background unless a refresh is
// already running.
func (v *View) startRefreshLocked(e *modelEntry) {
	if e.inflight != nil || v.m.ctx.Err() != nil {
		return
	}
	done := make(chan struct{})
	e.inflight = done
	if !v.m.spawn(func() {
		err := v.refresh(v.m.ctx, e)
		v.mu.Lock()
		e.err = err
		e.inflight = nil
		v.mu.Unlock()
		close(done)
	}) {
		e.err, e.inflight = context.Canceled, nil // shutting down
		close(done)
	}
}

// Bounds of one refresh: parallel record fetches, and how long to look for
// providers and fetch records.
const (
	refreshConcurrency = 16
	findTimeout        = 2 * time.Second
	fetchTimeout       = 3 * time.Second
)

// refresh finds the model's providers and fetches the records that are
// older than the refresh interval.
func (v *View) refresh(ctx context.Context, e *modelEntry) error {
	// A provider lookup can wait on peers that just vanished; past
	// findTimeout the view goes on with the providers found so far plus
	// those it knew, rather than wait for the stragglers.
	found := map[peer.ID]bool{}
	fctx, cancel := context.WithTimeout(ctx, findTimeout)
	for ai := range v.m.dht.FindProvidersAsync(fctx, e.id, 0) {
		found[ai.ID] = true
	}
	cancel()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("find providers of %s: %w", e.id, err)
	}
	ctx, cancel = context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	v.mu.Lock()
	for p := range e.providers { // peers that pushed or were found before
		found[p] = true
	}
	// This node itself, when its own record serves the model: its provider
	// record may not be in the DHT yet when the model is first asked for.
	if _, ok := v.records[v.m.host.ID()]; ok {
		found[v.m.host.ID()] = true
	}
	var stale []peer.ID
	for p := range found {
		r, ok := v.records[p]
		if p == v.m.host.ID() && ok {
			continue // our own record is always current
		}
		if !ok || time.Since(r.fetched) >= v.m.cfg.ViewRefresh {
			stale = append(stale, p)
		}
	}
	v.mu.Unlock()

	type result struct {
		p   peer.ID
		rec *protocol.CapacityRecord
	}
	results := make(chan result, len(stale))
	sem := make(chan struct{}, refreshConcurrency)
	var wg sync.WaitGroup
	for _, p := range stale {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			data, err := v.m.dht.GetValue(ctx, CapacityKey(p), dht.Quorum(1))
			if err != nil {
				results <- result{p, nil}
				return
			}
			_, rec, err := OpenCapacity(data) // the DHT validated it already
			if err != nil {
				rec = nil
			}
			results <- result{p, rec}
		})
	}
	wg.Wait()
	close(results)

	v.mu.Lock()
	defer v.mu.Unlock()
	now := time.Now()
	for r := range results {
		if r.rec == nil {
			continue // keep what we had: it still expires on time
		}
		if old, ok := v.records[r.p]; !ok || r.rec.Seq > old.rec.Seq {
			v.records[r.p] = &recordEntry{rec: r.rec, fetched: now}
		} else {
			old.fetched = now
		}
	}
	e.providers = map[peer.ID]bool{}
	for p := range found {
		if r, ok := v.records[p]; ok {
			if _, serves := r.rec.Span(e.id.String()); serves {
				e.providers[p] = true
			}
		}
	}
	e.refreshed = now
	return nil
}

// buildLocked assembles the model view from cached records, skipping
// expired ones and leaving out (in Ignored) those whose span does not fit
// the model's block count (FitBlocks).
func (v *View) buildLocked(e *modelEntry) *ModelView {
	now := time.Now()
	self := v.m.host.ID()
	myCoord := v.m.coords.Self()
	mv := &ModelView{Model: e.id.String(), Updated: e.refreshed}
	// The model's block count: from its manifest when known, else never
	// from one peer against this node's own span or a majority.
	mine := 0
	var claims []protocol.ServedSpan
	for p := range e.providers {
		if r, ok := v.records[p]; ok && r.rec.Check(now) == nil {
			if s, ok := r.rec.Span(mv.Model); ok {
				claims = append(claims, s)
				if p == self {
					mine = s.Blocks
				}
			}
		}
	}
	mv.Blocks = FitBlocks(v.manifests[mv.Model], mine, claims)
	for p := range e.providers {
		r, ok := v.records[p]
		if !ok || r.rec.Check(now) != nil {
			continue
		}
		span, ok := r.rec.Span(mv.Model)
		if !ok {
			continue
		}
		pv := PeerView{ID: p, Span: span, Record: r.rec}
		if seen, ok := v.seen[p]; ok && now.Sub(seen.at) <= loadForget {
			if l := FreshLoad(r.rec.Load, seen.load, now.Sub(seen.at)); l != r.rec.Load {
				pv.Load = &l
			}
		}
		if pc, ok := v.m.coords.Observed(p); ok && p != self && now.Sub(pc.At) <= observedCoordFresh && ValidateCoordinate(pc.Coord) == nil {
			pv.Coord = &pc.Coord
		}
		switch {
		case p == self:
		case pv.Coord != nil:
			pv.RTT = EstimateRTT(myCoord, *pv.Coord)
		case r.rec.Coord != nil:
			pv.RTT = EstimateRTT(myCoord, *r.rec.Coord)
		default:
			pv.RTT = UnknownRTT
		}
		if !SpanFits(span, mv.Blocks) {
			if !r.misfit[mv.Model] {
				if r.misfit == nil {
					r.misfit = map[string]bool{}
				}
				r.misfit[mv.Model] = true
				v.m.log.Debug("ignoring a capacity record that does not fit the model", "peer", p, "model", mv.Model,
					"blocks", mv.Blocks, "claimed_blocks", span.Blocks, "start", span.Start, "end", span.End)
			}
			mv.Ignored = append(mv.Ignored, pv)
			continue
		}
		if r.distrusted {
			mv.Distrusted = append(mv.Distrusted, pv)
			continue
		}
		mv.Peers = append(mv.Peers, pv)
	}
	if len(mv.Peers) == 0 && len(mv.Distrusted) == 0 {
		mv.Blocks = 0 // nobody usable serves it (whatever the manifest says)
	}
	byID := func(a, b PeerView) int { return strings.Compare(string(a.ID), string(b.ID)) }
	slices.SortFunc(mv.Distrusted, byID)
	slices.SortFunc(mv.Ignored, byID)
	sort.Slice(mv.Peers, func(i, j int) bool {
		a, b := mv.Peers[i], mv.Peers[j]
		if a.RTT != b.RTT { // unknown distances last
			return (a.RTT >= 0 && (b.RTT < 0 || a.RTT < b.RTT))
		}
		return a.ID < b.ID
	})
	mv.ByBlock = make([][]int, mv.Blocks)
	for i, p := range mv.Peers {
		for b := p.Span.Start; b < p.Span.End && b < mv.Blocks; b++ {
			mv.ByBlock[b] = append(mv.ByBlock[b], i)
		}
	}
	for b, who := range mv.ByBlock {
		if len(who) == 0 {
			mv.Uncovered = append(mv.Uncovered, b)
		}
	}
	return mv
}

// evictLocked drops the least recently used models beyond MaxModels, and
// records no kept model refers to.
func (v *View) evictLocked() {
	if len(v.models) <= v.m.cfg.MaxModels {
		return
	}
	keys := make([]string, 0, len(v.models))
	for k := range v.models {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int { return v.models[a].used.Compare(v.models[b].used) })
	for _, k := range keys[:len(keys)-v.m.cfg.MaxModels] {
		if v.models[k].inflight == nil {
			delete(v.models, k)
		}
	}
	keep := map[peer.ID]bool{v.m.host.ID(): true}
	for _, e := range v.models {
		for p := range e.providers {
			keep[p] = true
		}
	}
	for p := range v.records {
		if !keep[p] {
			delete(v.records, p)
		}
	}
}

// modelIdle is how long the view keeps refreshing a model nobody looked up.
const modelIdle = 10 * time.Minute

// refreshLoop keeps recently used models fresh, so that lookups are
// answered from memory.
func (v *View) refreshLoop() {
	t := time.NewTicker(v.m.cfg.ViewRefresh)
	defer t.Stop()
	for {
		select {
		case <-v.m.ctx.Done():
			return
		case <-t.C:
		}
		v.mu.Lock()
		for k, e := range v.models {
			if time.Since(e.used) > modelIdle {
				delete(v.models, k)
				continue
			}
			if time.Since(e.refreshed) >= v.m.cfg.ViewRefresh {
				v.startRefreshLocked(e)
			}
		}
		v.mu.Unlock()
	}
}

// KnownModels lists, sorted, the models this node has heard of: those it
// was asked about and those in the unexpired capacity records it holds.
// The DHT cannot list every model of the mesh; this is what the node has
// seen.
func (v *View) KnownModels() []string {
	now := time.Now()
	v.mu.Lock()
	seen := map[string]bool{}
	for id := range v.models {
		seen[id] = true
	}
	for _, r := range v.records {
		if r.rec.Check(now) != nil {
			continue
		}
		for _, s := range r.rec.Models {
			seen[s.Model] = true
		}
	}
	v.mu.Unlock()
	out := make([]string, 0, len(seen))
	for id := range seen {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}
