package node

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Defaults of joining by model.
const (
	defaultRebalance = 2 * time.Minute
	// dropGrace is how long a node keeps serving its old span after moving,
	// so that sessions on it finish or fail over cleanly.
	dropGrace = 30 * time.Second
	// DefaultReplicas is Config.Replicas' default: every block on two
	// nodes, so that one leaving loses nothing.
	DefaultReplicas = 2
	// rebalanceHurry is how often (half to all of it, at random) the
	// rebalancing loop looks whether some block is served by nobody, in
	// which case it checks at once rather than in its turn: a peer handing
	// its blocks off (see handoff) is noticed in seconds, not minutes.
	rebalanceHurry = 2 * time.Second
	// A rebalancing move that fails (the blocks cannot be fetched: nobody
	// holds them, or their holders are unreachable) is retried after
	// rebalanceRetryBase, doubling with each failure up to
	// rebalanceRetryMax, with jitter; a success resets it.
	rebalanceRetryBase = 2 * time.Second
	rebalanceRetryMax  = 5 * time.Minute
)

// joined is a model served by ID (--model): its blocks come from peers.
type joined struct {
	id     cid.Cid
	pinned bool // the operator chose the span
}

// joinModels starts serving each --model: manifest and blocks fetched from
// peers and verified, the span chosen (or as pinned), loaded, measured and
// announced.
func (n *Node) joinModels(ctx context.Context) error {
	if len(n.cfg.Models) == 0 {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := n.mesh.WaitRouting(wctx)
	cancel()
	if err != nil {
		return fmt.Errorf("joining by model needs peers: %w (give --bootstrap peers)", err)
	}
	for _, spec := range n.cfg.Models {
		id, start, end, _ := ParseModel(spec)
		man, err := n.Manifest(ctx, id)
		if err != nil {
			return fmt.Errorf("--model %s: %w", id, err)
		}
		model, err := n.localModel(id, man)
		if err != nil {
			return err
		}
		pinned := end >= 0
		var reason string
		if !pinned {
			p, err := n.place(ctx, model, nil)
			if err != nil {
				return fmt.Errorf("--model %s: %w", id, err)
			}
			start, end, reason = p.Start, p.End, p.Reason
			n.log.Info("chose blocks", "model", id, "blocks", fmt.Sprintf("%d-%d of %d", start, end-1, len(man.Blocks)), "why", p.Reason)
		}
		if end > len(man.Blocks) {
			return fmt.Errorf("--model %s: it has %d blocks (0-%d)", spec, len(man.Blocks), len(man.Blocks)-1)
		}
		s, err := n.serveFetched(ctx, model, start, end)
		if err != nil {
			return fmt.Errorf("--model %s: %w", id, err)
		}
		s.joined = &joined{id: id, pinned: pinned}
		s.reason = "pinned by --model"
		if !pinned {
			s.reason = reason
		}
		n.addServed(s)
	}
	return nil
}

// localModel is a model whose blocks live in the node's own store, with its
// manifest saved there too (DATA/models/ID/manifest.json).
func (n *Node) localModel(id cid.Cid, man *shards.Manifest) (*shards.Model, error) {
	dir := filepath.Join(n.opts.DataDir, "models", id.String())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	enc, err := man.Encode()
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, shards.ManifestFile), enc, 0o644); err != nil {
		return nil, err
	}
	return &shards.Model{Dir: dir, Manifest: man, ID: id, Store: n.own}, nil
}

// replicas is Config.Replicas or its default.
func (n *Node) replicas() int {
	if n.cfg.Replicas > 0 {
		return n.cfg.Replicas
	}
	return DefaultReplicas
}

// place chooses the span this node should serve, from what the mesh serves
// without it.
func (n *Node) place(ctx context.Context, m *shards.Model, current *[2]int) (mesh.Placement, error) {
	mv, err := n.mesh.View().Model(ctx, m.ID)
	if err != nil {
		return mesh.Placement{}, err
	}
	req := mesh.PlaceRequest{Blocks: len(m.Manifest.Blocks), Span: min(n.spanCapacity(m), n.disk.span(ctx, m)), Self: n.mesh.ID(),
		Replicas: n.replicas(), Spread: mesh.DefaultPlaceSpread}
	cands := mesh.Candidates(mv)
	if current == nil {
		return mesh.Place(cands, req)
	}
	// Rebalancing looks at copies, then at speeds only, with a margin
	// (mesh.Rebalance).
	p, _ := mesh.Rebalance(cands, req, *current)
	return p, nil
}

// unserved reports whether, per the view, some block of s's model is served
// by nobody (this node on s included): a peer left, and the check should
// not wait for its turn.
func (n *Node) unserved(s *servedSpan) bool {
	ctx, cancel := context.WithTimeout(n.ctx, 2*time.Second)
	defer cancel()
	mv, err := n.mesh.View().Model(ctx, s.model.ID)
	if err != nil {
		return false
	}
	blocks := len(s.model.Manifest.Blocks)
	held := make([]bool, blocks)
	for b := s.start; b < min(s.end, blocks); b++ {
		held[b] = true
	}
	for _, c := range mesh.Candidates(mv) {
		for b := max(c.Start, 0); b < min(c.End, blocks); b++ {
			held[b] = true
		}
	}
	return slices.Contains(held, false)
}

// spanCapacity is how many blocks of m this node takes on: MaxBlocks, or
// what the memory budget holds of its average block once loaded (real
// bytes: quantized blocks take far less than float ones).
func (n *Node) spanCapacity(m *shards.Model) int {
	blocks := len(m.Manifest.Blocks)
	if n.cfg.MaxBlocks > 0 {
		return min(n.cfg.MaxBlocks, blocks)
	}
	budget := n.memoryBudget()
	avg := m.Manifest.ResidentBytes(0, blocks) / int64(blocks)
	if budget <= 0 || avg <= 0 {
		return blocks
	}
	return int(max(1, min(int64(blocks), budget/avg)))
}

// memoryBudget is the memory a model's loaded blocks may take here:
// MaxMemory, else a quarter of the machine's; 0 when unknown.
func (n *Node) memoryBudget() int64 {
	if n.cfg.MaxMemory > 0 {
		return n.cfg.MaxMemory
	}
	for _, a := range n.accelerators {
		if a.Kind == "cpu" && a.MemoryBytes > 0 {
			return a.MemoryBytes / 4
		}
	}
	return 0
}

// serveFetched fetches blocks [start, end) of m from peers (what the store
// lacks), loads and measures them.
func (n *Node) serveFetched(ctx context.Context, m *shards.Model, start, end int) (*servedSpan, error) {
	cids := m.Manifest.FileCIDs() // a server of any span hands out the tokenizer too
	for _, b := range m.Manifest.Blocks[start:end] {
		c, err := shards.ParseCID(b.CID)
		if err != nil {
			return nil, err
		}
		cids = append(cids, c)
	}
	release, err := n.disk.reserve(ctx, m.Manifest, cids, fmt.Sprintf("blocks %d-%d of model %s", start, end-1, m.ID))
	if err != nil {
		return nil, err
	}
	defer release()
	t0 := time.Now()
	if err := n.mesh.FetchBlocks(ctx, cids, n.own, mesh.FetchOptions{}); err != nil {
		return nil, fmt.Errorf("fetching blocks %d-%d: %w", start, end-1, err)
	}
	n.log.Info("fetched blocks", "model", m.ID, "blocks", fmt.Sprintf("%d-%d", start, end-1), "took", time.Since(t0).Round(time.Millisecond))
	if n.rt == nil {
		rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: n.cfg.Threads, Provider: n.cfg.Provider, Logger: n.log})
		if err != nil {
			return nil, err
		}
		n.rt = rt
	}
	span, err := n.rt.LoadSpan(m, start, end)
	if errors.Is(err, shards.ErrCorrupt) {
		// A copy here went bad since it was stored: set it aside and
		// fetch it again, once.
		if bad := n.quarantineSpan(m, start, end); len(bad) > 0 {
			if err = n.mesh.FetchBlocks(ctx, bad, n.own, mesh.FetchOptions{}); err == nil {
				span, err = n.rt.LoadSpan(m, start, end)
			}
		}
	}
	if err != nil {
		return nil, err
	}
	micros, err := measureSpan(ctx, n.rt, m, start, end, n.opts.MeasureRounds)
	if err != nil {
		span.Close()
		return nil, err
	}
	n.log.Info("serving", "model", m.ID, "name", m.Manifest.Name, "blocks", fmt.Sprintf("%d-%d of %d", start, end-1, len(m.Manifest.Blocks)),
		"pass_us", fmt.Sprintf("%.0f", sum(micros)))
	return &servedSpan{model: m, span: span, start: start, end: end, micros: micros}, nil
}

// measureSpan times the blocks of a span: with real inputs when the blocks
// before it are at hand (MeasureBlocks), else with synthetic ones shaped
// like its inputs (a node that fetched only its span).
func measureSpan(ctx context.Context, rt *shards.Runtime, m *shards.Model, start, end, rounds int) ([]float64, error) {
	all := true
	for i := range start {
		c, err := shards.ParseCID(m.Manifest.Blocks[i].CID)
		if ok, _ := m.Store.Has(c); err != nil || !ok {
			all = false
			break
		}
	}
	if all {
		micros, err := MeasureBlocks(ctx, rt, m, start, end, rounds)
		if !errors.Is(err, shards.ErrCorrupt) && !errors.Is(err, shards.ErrNotFound) {
			return micros, err
		}
		// A block before the span is damaged: the span's own were
		// verified when it loaded, so time it on synthetic inputs.
	}
	out := make([]float64, 0, end-start)
	for i := start; i < end; i++ {
		span, err := rt.LoadSpan(m, i, i+1)
		if err != nil {
			return nil, err
		}
		in := syntheticInputs(span.Inputs())
		var times []time.Duration
		for r := range rounds + 1 {
			if err := ctx.Err(); err != nil {
				span.Close()
				return nil, err
			}
			t0 := time.Now()
			if _, err := span.Run(in); err != nil {
				span.Close()
				return nil, fmt.Errorf("block %d on synthetic inputs: %w", i, err)
			}
			if r > 0 { // the first run warms up
				times = append(times, time.Since(t0))
			}
		}
		span.Close()
		out = append(out, float64(median(times).Microseconds()))
	}
	return out, nil
}

// syntheticInputs makes inputs of the given specs with every symbolic
// dimension 1: small floats, integer ones (valid token IDs, positions and
// mask entries).
func syntheticInputs(specs []shards.TensorSpec) shards.Tensors {
	rng := rand.New(rand.NewPCG(1, 1))
	in := shards.Tensors{}
	for _, spec := range specs {
		shape := make([]int64, len(spec.Shape))
		for i, d := range spec.Shape {
			shape[i] = max(d.Size, 1)
		}
		n := protocol.NumElements(shape)
		t := &protocol.Tensor{DType: spec.DType, Shape: shape, Data: make([]byte, n*int64(spec.DType.Size()))}
		switch spec.DType {
		case protocol.Float32:
			v := make([]float32, n)
			for i := range v {
				v[i] = rng.Float32()*0.2 - 0.1
			}
			t = protocol.NewTensor(shape, v)
		case protocol.Int64:
			v := make([]int64, n)
			for i := range v {
				v[i] = 1
			}
			t = protocol.NewTensor(shape, v)
		}
		in[spec.Name] = t
	}
	return in
}

// rebalanceLoop moves spans the node chose itself when the mesh drifts:
// the new span is fetched, loaded and announced before the old one is
// dropped, so no block goes uncovered because of the move. It checks each
// span every Rebalance (half to all of it, at random), and at once when
// some block of the model is served by nobody; a span whose move failed
// waits rebalanceBackoff first.
func (n *Node) rebalanceLoop() {
	every := time.Duration(n.cfg.Rebalance)
	if every <= 0 {
		every = defaultRebalance
	}
	jittered := func(d time.Duration) time.Duration { return d/2 + time.Duration(rand.Int64N(int64(d)/2+1)) }
	type state struct {
		next    time.Time // the next check in turn
		fails   int
		retryAt time.Time
	}
	states := map[*joined]*state{}
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(jittered(min(every, rebalanceHurry))):
		}
		for _, s := range n.servedSpans() {
			if s.joined == nil || s.joined.pinned {
				continue
			}
			st := states[s.joined]
			if st == nil {
				st = &state{next: time.Now().Add(jittered(every))}
				states[s.joined] = st
			}
			now := time.Now()
			if now.Before(st.retryAt) || now.Before(st.next) && !n.unserved(s) {
				continue
			}
			st.next = now.Add(jittered(every))
			err := n.rebalance(s)
			if err == nil {
				st.fails = 0
				continue
			}
			if n.ctx.Err() != nil {
				return
			}
			st.fails++
			d := rebalanceBackoff(st.fails, rand.Float64())
			st.retryAt = time.Now().Add(d)
			n.log.Warn("rebalancing failed", "model", s.model.ID, "err", err, "failures", st.fails, "retry_in", d.Round(100*time.Millisecond))
		}
	}
}

// rebalanceBackoff is the pause after the given number (>= 1) of failed
// moves in a row: rebalanceRetryBase doubled with each, capped at
// rebalanceRetryMax, times 0.5 to 1 by r in [0, 1) (jitter).
func rebalanceBackoff(fails int, r float64) time.Duration {
	d := rebalanceRetryMax
	if fails-1 < 20 {
		d = min(rebalanceRetryBase<<max(fails-1, 0), rebalanceRetryMax)
	}
	return time.Duration(float64(d) * (0.5 + r/2))
}

// rebalance moves s if the mesh is better served elsewhere.
func (n *Node) rebalance(s *servedSpan) error {
	ctx, cancel := context.WithTimeout(n.ctx, 5*time.Minute)
	defer cancel()
	p, err := n.place(ctx, s.model, &[2]int{s.start, s.end})
	if err != nil {
		return err
	}
	if p.Start == s.start && p.End == s.end {
		return nil
	}
	n.log.Info("moving", "model", s.model.ID, "from", fmt.Sprintf("%d-%d", s.start, s.end-1), "to", fmt.Sprintf("%d-%d", p.Start, p.End-1), "why", p.Reason)
	next, err := n.serveFetched(ctx, s.model, p.Start, p.End)
	if err != nil {
		return err
	}
	next.joined, next.reason = s.joined, p.Reason
	n.addServed(next)
	n.dropServed(s)
	if err := n.mesh.Publish(ctx); err != nil {
		n.log.Warn("announcing the new span", "err", err)
	}
	n.mesh.Provide(ctx, n.provided()...)
	n.wg.Go(func() {
		select {
		case <-time.After(dropGrace):
		case <-n.ctx.Done():
		}
		s.span.Close()
	})
	return nil
}

// Bounds of the handoff of a graceful stop.
const (
	// handoffPoll is how often the leaving node looks for peers fetching
	// blocks from it (its view, every fourth time).
	handoffPoll = 50 * time.Millisecond
	// handoffNotice is how long it waits for a sign that a peer takes its
	// blocks (a peer opening a block-transfer stream to it, or some of the
	// blocks served elsewhere) before it concludes that nobody will:
	// pinned peers never move.
	handoffNotice = 5 * time.Second
	// handoffPublish bounds storing the withdrawn record in the DHT.
	handoffPublish = 2 * time.Second
)

// soleBlocks lists, per model served here, the blocks of its spans that
// no other peer serves, per the view (models the view cannot say are left
// out); and how many other peers serve those models.
func (n *Node) soleBlocks(ctx context.Context) (sole map[*shards.Model][]int, others int) {
	sole = map[*shards.Model][]int{}
	seen := map[string]bool{}
	for _, s := range n.servedSpans() {
		mv, err := n.mesh.View().Model(ctx, s.model.ID)
		if err != nil {
			continue // unknown: claim nothing
		}
		cands := mesh.Candidates(mv)
		for _, c := range cands {
			if c.Peer == n.mesh.ID() {
				continue
			}
			key := s.model.ID.String() + "/" + c.Peer.String()
			if !seen[key] {
				seen[key] = true
				others++
			}
		}
		for b := s.start; b < s.end; b++ {
			held := false
			for _, c := range cands {
				if c.Peer != n.mesh.ID() && c.Start <= b && b < c.End {
					held = true
					break
				}
			}
			if !held && !slices.Contains(sole[s.model], b) {
				sole[s.model] = append(sole[s.model], b)
			}
		}
		if len(sole[s.model]) == 0 {
			delete(sole, s.model)
		}
	}
	return sole, others
}

// soleCount is how many blocks sole lists.
func soleCount(sole map[*shards.Model][]int) int {
	n := 0
	for _, bs := range sole {
		n += len(bs)
	}
	return n
}

// handoff runs first in a graceful stop. When this node is, per its view,
// the only server of some blocks, it publishes a record that serves
// nothing: peers' views drop it at once, so their rebalancing sees those
// blocks unserved within seconds (rebalanceHurry) and fetches them from
// here (the block store still answers). It waits until other peers serve
// them, or no peer serving the model is left, or nothing shows that a peer
// is taking them within handoffNotice, or HandoffWait has passed. Blocks
// nobody took are logged as lost, at warn level.
func (n *Node) handoff() {
	if n.mesh == nil || n.ctx == nil || n.ctx.Err() != nil || len(n.servedSpans()) == 0 {
		return
	}
	wait := time.Duration(n.cfg.HandoffWait)
	ctx, cancel := context.WithTimeout(n.ctx, max(wait, 0)+2*time.Second)
	defer cancel()
	// The view answers from memory for a model looked up before; a first
	// lookup waits for the DHT, bounded here.
	fctx, fcancel := context.WithTimeout(ctx, time.Second)
	sole, others := n.soleBlocks(fctx)
	fcancel()
	if len(sole) == 0 {
		return
	}
	lost := func(sole map[*shards.Model][]int, why string) {
		for m, bs := range sole {
			slices.Sort(bs)
			n.log.Warn("leaving the mesh: blocks no other node serves are now lost from the mesh", "model", m.ID, "name", m.Manifest.Name,
				"blocks", blockRanges(bs), "why", why)
		}
	}
	if wait <= 0 || others == 0 {
		why := "no other node serves the model"
		if wait <= 0 {
			why = "handoff_wait is 0"
		}
		lost(sole, why)
		return
	}
	for m, bs := range sole {
		n.log.Info("only server of blocks: waiting for peers to take them before leaving", "model", m.ID, "blocks", blockRanges(bs), "up_to", wait)
	}
	n.leaving.Store(true)
	// The record goes to connected peers at once; storing it in the DHT
	// may wait on peers that vanished: in the background, bounded.
	var pub sync.WaitGroup
	defer pub.Wait()
	pub.Go(func() {
		pctx, cancel := context.WithTimeout(ctx, handoffPublish)
		defer cancel()
		if err := n.mesh.Publish(pctx); err != nil {
			n.log.Debug("withdrawing the record", "err", err)
		}
	})
	t0 := time.Now()
	before, count := n.blockStreams(), soleCount(sole)
	// Until a sign that a peer takes them, it waits handoffNotice; a
	// peer fetching from it extends that by 3 handoffNotice (loading and
	// timing the blocks take a while); some of them served elsewhere, to
	// the whole wait.
	until := t0.Add(min(handoffNotice, wait))
	extend := func(d time.Duration) {
		if t := time.Now().Add(d); t.After(until) {
			until = t
		}
		if end := t0.Add(wait); until.After(end) {
			until = end
		}
	}
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
		case <-time.After(handoffPoll):
		}
		for id := range n.blockStreams() {
			if !before[id] {
				before[id] = true
				n.log.Info("a peer is fetching blocks from this node", "after", time.Since(t0).Round(time.Millisecond))
				extend(3 * handoffNotice)
			}
		}
		if i%4 != 3 && ctx.Err() == nil {
			continue // the view every fourth time
		}
		sole, others = n.soleBlocks(ctx)
		if c := soleCount(sole); c < count && c > 0 {
			count = c
			n.log.Info("peers took some of the blocks", "left", c, "after", time.Since(t0).Round(time.Millisecond))
			extend(wait)
		}
		switch {
		case len(sole) == 0:
			n.log.Info("peers took the blocks only this node served", "took", time.Since(t0).Round(time.Millisecond))
			return
		case others == 0:
			lost(sole, "no other node serves the model any more")
			return
		case ctx.Err() != nil || !time.Now().Before(until):
			lost(sole, fmt.Sprintf("no peer took them within %s", time.Since(t0).Round(100*time.Millisecond)))
			return
		}
	}
}

// blockStreams lists the block-transfer streams peers have open to this
// node, by stream ID.
func (n *Node) blockStreams() map[string]bool {
	out := map[string]bool{}
	for _, c := range n.mesh.Host().Network().Conns() {
		for _, s := range c.GetStreams() {
			if s.Protocol() == mesh.BlocksProtocol && s.Stat().Direction == network.DirInbound {
				out[s.ID()] = true
			}
		}
	}
	return out
}
