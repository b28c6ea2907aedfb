package node

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/ipfs/go-cid"

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

// place chooses the span this node should serve, from what the mesh serves
// without it.
func (n *Node) place(ctx context.Context, m *shards.Model, current *[2]int) (mesh.Placement, error) {
	mv, err := n.mesh.View().Model(ctx, m.ID)
	if err != nil {
		return mesh.Placement{}, err
	}
	req := mesh.PlaceRequest{Blocks: len(m.Manifest.Blocks), Span: n.spanCapacity(m), Self: n.mesh.ID()}
	cands := mesh.Candidates(mv)
	if current == nil {
		return mesh.Place(cands, req)
	}
	// Rebalancing looks at speeds only, with a margin (mesh.Rebalance).
	p, _ := mesh.Rebalance(cands, req, *current)
	return p, nil
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
// dropped, so no block goes uncovered because of the move.
func (n *Node) rebalanceLoop() {
	every := time.Duration(n.cfg.Rebalance)
	if every <= 0 {
		every = defaultRebalance
	}
	for {
		jitter := time.Duration(rand.Int64N(int64(every)/2 + 1))
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(every/2 + jitter):
		}
		for _, s := range n.servedSpans() {
			if s.joined == nil || s.joined.pinned {
				continue
			}
			if err := n.rebalance(s); err != nil && n.ctx.Err() == nil {
				n.log.Warn("rebalancing failed", "model", s.model.ID, "err", err)
			}
		}
	}
}

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
