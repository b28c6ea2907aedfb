package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
)

// stores is what a node serves blocks from: its own store (DATA/blocks,
// where fetched blocks go) and the block folders of local models given with
// --serve. Writes go to the first.
type stores []shards.Store

var _ shards.Store = stores(nil)

func (s stores) Put(codec uint64, data []byte) (cid.Cid, error) { return s[0].Put(codec, data) }
func (s stores) Add(c cid.Cid, r io.Reader) error               { return s[0].Add(c, r) }
func (s stores) Remove(c cid.Cid) error                         { return s[0].Remove(c) }

func (s stores) Get(c cid.Cid) ([]byte, error) {
	var errs []error
	for _, st := range s {
		data, err := st.Get(c)
		if err == nil {
			return data, nil
		}
		if !errors.Is(err, shards.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return nil, fmt.Errorf("%s: %w", c, shards.ErrNotFound)
}

func (s stores) Has(c cid.Cid) (bool, error) {
	for _, st := range s {
		if ok, _ := st.Has(c); ok {
			return true, nil
		}
	}
	return false, nil
}

func (s stores) List() ([]cid.Cid, error) {
	var out []cid.Cid
	for _, st := range s {
		l, err := st.List()
		if err != nil {
			return nil, err
		}
		out = append(out, l...)
	}
	return out, nil
}

// QuarantineDir is where a node moves block files that failed
// verification (DATA/quarantine), so they are never read again.
const QuarantineDir = "quarantine"

// damagedSpan is a --serve span one or more of whose blocks failed
// verification at start.
type damagedSpan struct {
	spec       string        // as given to --serve
	model      *shards.Model // the operator's model folder
	start, end int
	missing    []cid.Cid // blocks with no good copy here: fetched from peers
	why        error     // what loading the span said
}

// damagedSpan finds which blocks of [start, end) of m have no good copy
// in the model's folder or the node's own store, and quarantines the copies
// that failed verification.
func (n *Node) damagedSpan(spec string, m *shards.Model, start, end int, why error) *damagedSpan {
	d := &damagedSpan{spec: spec, model: m, start: start, end: end, why: why}
	qdir := filepath.Join(n.opts.DataDir, QuarantineDir)
	for i := start; i < end; i++ {
		c, err := shards.ParseCID(m.Manifest.Blocks[i].CID)
		if err != nil {
			continue // Validate refused such manifests already
		}
		_, err = m.Store.Get(c)
		if err == nil {
			continue
		}
		n.quarantine(m.Store, c, i, qdir, err)
		if _, err := n.own.Get(c); err != nil {
			n.quarantine(n.own, c, i, qdir, err)
			d.missing = append(d.missing, c)
		}
	}
	n.log.Warn("cannot load blocks as they are; repairing from peers", "serve", spec, "model", m.ID,
		"blocks", fmt.Sprintf("%d-%d", start, end-1), "missing", len(d.missing), "err", why)
	return d
}

// quarantine moves a copy of block c that failed verification out of st.
func (n *Node) quarantine(st *shards.FileStore, c cid.Cid, i int, qdir string, why error) {
	if !errors.Is(why, shards.ErrCorrupt) {
		return
	}
	to, err := st.Quarantine(c, qdir)
	if err != nil {
		// The good copy fetched into the node's own store is read first.
		n.log.Warn("block failed verification; could not move it aside", "block", i, "cid", c, "err", err)
		return
	}
	n.log.Warn("block failed verification; moved aside", "block", i, "cid", c, "from", st.Dir(), "to", to)
}

// repairSpans serves the damaged --serve spans: their blocks are gathered in
// the node's own store (good copies from the model's folder, the others
// fetched from peers, verified), and the span is loaded from there, so the
// operator's folder is never written. A span that cannot be repaired is not
// served (nor announced); repairSpans logs why and returns the reasons.
func (n *Node) repairSpans(ctx context.Context) []error {
	var errs []error
	routed := false
	for _, d := range n.damaged {
		err := n.repairSpan(ctx, d, &routed)
		if err != nil {
			err = fmt.Errorf("--serve %s: not serving blocks %d-%d: %w (loading them said: %v)", d.spec, d.start, d.end-1, err, d.why)
			n.log.Error("not serving a span", "serve", d.spec, "model", d.model.ID, "blocks", fmt.Sprintf("%d-%d", d.start, d.end-1), "err", err)
			errs = append(errs, err)
		}
	}
	n.damaged = nil
	return errs
}

// repairFetchTimeout bounds the fetch of a damaged span's blocks at start.
const repairFetchTimeout = 2 * time.Minute

func (n *Node) repairSpan(ctx context.Context, d *damagedSpan, routed *bool) error {
	lm, err := n.ownCopy(d.model, d.start, d.end)
	if err != nil {
		return err
	}
	if len(d.missing) > 0 {
		if n.alone() {
			return fmt.Errorf("%d block(s) failed verification and no peer is known to fetch them from (no --bootstrap)", len(d.missing))
		}
		if !*routed {
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := n.mesh.WaitRouting(wctx)
			cancel()
			if err != nil {
				return fmt.Errorf("%d block(s) failed verification and no peer answered to fetch them from: %w", len(d.missing), err)
			}
			*routed = true
		}
	}
	fctx, cancel := context.WithTimeout(ctx, repairFetchTimeout)
	defer cancel()
	s, err := n.serveFetched(fctx, lm, d.start, d.end) // fetches what ownCopy could not copy
	if err != nil {
		return err
	}
	s.reason = "--serve " + d.spec + " (repaired into the node's own store)"
	n.addServed(s)
	n.log.Info("repaired", "serve", d.spec, "model", d.model.ID, "blocks", fmt.Sprintf("%d-%d", d.start, d.end-1), "fetched", len(d.missing), "store", n.own.Dir())
	return nil
}

// ownCopy is model m served from the node's own store: the good copies of
// its files and of blocks [start, end) in m's folder are copied there (what
// has no good copy is left for the caller to fetch).
func (n *Node) ownCopy(m *shards.Model, start, end int) (*shards.Model, error) {
	lm, err := n.localModel(m.ID, m.Manifest)
	if err != nil || m.Store == n.own {
		return lm, err
	}
	var cids []cid.Cid
	for _, f := range m.Manifest.Files {
		if c, err := shards.ParseCID(f.CID); err == nil {
			cids = append(cids, c)
		}
	}
	for _, b := range m.Manifest.Blocks[start:end] {
		if c, err := shards.ParseCID(b.CID); err == nil {
			cids = append(cids, c)
		}
	}
	for _, c := range cids {
		if ok, _ := n.own.Has(c); ok {
			continue
		}
		data, err := m.Store.Get(c)
		if err != nil {
			continue
		}
		if _, err := n.own.Put(c.Prefix().Codec, data); err != nil {
			return nil, err
		}
	}
	return lm, nil
}

// quarantineSpan moves aside the copies of blocks [start, end) of m that
// fail verification in m's store, and returns their CIDs.
func (n *Node) quarantineSpan(m *shards.Model, start, end int) []cid.Cid {
	var bad []cid.Cid
	for i := start; i < end; i++ {
		c, err := shards.ParseCID(m.Manifest.Blocks[i].CID)
		if err != nil {
			continue
		}
		if _, err := m.Store.Get(c); err != nil {
			n.quarantine(m.Store, c, i, filepath.Join(n.opts.DataDir, QuarantineDir), err)
			bad = append(bad, c)
		}
	}
	return bad
}

// watchedStore is the store the mesh serves blocks from: a read that fails
// verification there starts the repair of that block (blockFailed).
type watchedStore struct{ n *Node }

var _ shards.Store = watchedStore{}

func (w watchedStore) Put(codec uint64, data []byte) (cid.Cid, error) {
	return w.n.store.Put(codec, data)
}
func (w watchedStore) Add(c cid.Cid, r io.Reader) error { return w.n.store.Add(c, r) }
func (w watchedStore) Remove(c cid.Cid) error           { return w.n.store.Remove(c) }
func (w watchedStore) Has(c cid.Cid) (bool, error)      { return w.n.store.Has(c) }
func (w watchedStore) List() ([]cid.Cid, error)         { return w.n.store.List() }

func (w watchedStore) Get(c cid.Cid) ([]byte, error) {
	data, err := w.n.store.Get(c)
	if err == nil {
		w.n.disk.touch(c) // a peer read it: eviction takes it last
	}
	if errors.Is(err, shards.ErrCorrupt) {
		w.n.blockFailed(c)
	}
	return data, err
}

// blockFailed starts, in the background, the repair of block c, whose
// only copies here failed verification while the node runs: they are moved
// aside and a good copy fetched from peers into the node's own store; spans
// served from a folder that lost c are then served from the node's own
// store. If no peer sends c, the spans holding it are no longer served nor
// announced. One repair per block runs at a time.
func (n *Node) blockFailed(c cid.Cid) {
	key := c.String()
	n.repairs.Lock()
	if n.repairs.m == nil {
		n.repairs.m = map[string]bool{}
	}
	if n.repairs.m[key] || n.ctx.Err() != nil {
		n.repairs.Unlock()
		return
	}
	n.repairs.m[key] = true
	n.repairs.Unlock()
	n.wg.Go(func() {
		defer func() {
			n.repairs.Lock()
			delete(n.repairs.m, key)
			n.repairs.Unlock()
		}()
		n.repairBlock(c)
	})
}

func (n *Node) repairBlock(c cid.Cid) {
	qdir := filepath.Join(n.opts.DataDir, QuarantineDir)
	for _, st := range n.store {
		if fs, ok := st.(*shards.FileStore); ok {
			if _, err := fs.Get(c); errors.Is(err, shards.ErrCorrupt) {
				n.quarantine(fs, c, -1, qdir, err)
			}
		}
	}
	data, err := n.store.Get(c)
	if err == nil {
		// A good copy in another folder: the node's own store, which
		// spans repaired or fetched read from, gets it too.
		if ok, _ := n.own.Has(c); !ok {
			if _, err := n.own.Put(c.Prefix().Codec, data); err != nil {
				n.dropSpansOf(c, err)
				return
			}
		}
	} else {
		ctx, cancel := context.WithTimeout(n.ctx, repairFetchTimeout)
		if n.alone() {
			err = errors.New("no peer is known to fetch it from (no --bootstrap)")
		} else {
			wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
			err = n.mesh.WaitRouting(wctx)
			wcancel()
		}
		// Providers come and go: a few tries before giving the span up.
		for try := 0; err == nil; try++ {
			if err = n.mesh.FetchBlocks(ctx, []cid.Cid{c}, n.own, mesh.FetchOptions{}); err == nil || try == 2 {
				break
			}
			select {
			case <-time.After(time.Second << try):
			case <-ctx.Done():
			}
		}
		cancel()
		if err != nil {
			n.dropSpansOf(c, err)
			return
		}
		n.log.Info("repaired block from peers", "cid", c, "store", n.own.Dir())
	}
	// Spans of a model folder that lost c go on from the node's own store;
	// the loaded sessions stay as they are.
	for _, s := range n.servedSpans() {
		if s.model.Store == n.own || !spanHolds(s, c) {
			continue
		}
		lm, err := n.ownCopy(s.model, s.start, s.end)
		for i := s.start; err == nil && i < s.end; i++ {
			_, err = lm.Block(i)
		}
		if err != nil {
			n.dropSpansOf(c, err)
			return
		}
		next := *s
		next.model = lm
		n.servedMu.Lock()
		if i := slices.Index(n.served, s); i >= 0 {
			n.served[i] = &next
		}
		n.servedMu.Unlock()
	}
}

// spanHolds reports whether block c is among those s serves.
func spanHolds(s *servedSpan, c cid.Cid) bool {
	for _, b := range s.model.Manifest.Blocks[s.start:s.end] {
		if b.CID == c.String() {
			return true
		}
	}
	return false
}

// dropSpansOf stops serving and announcing the spans holding block c,
// which cannot be repaired; their loaded sessions close after dropGrace.
func (n *Node) dropSpansOf(c cid.Cid, why error) {
	var dropped []*servedSpan
	for _, s := range n.servedSpans() {
		if spanHolds(s, c) {
			n.dropServed(s)
			dropped = append(dropped, s)
			n.log.Error("not serving a span any more: a block failed verification and could not be repaired", "model", s.model.ID,
				"blocks", fmt.Sprintf("%d-%d", s.start, s.end-1), "cid", c, "err", why)
		}
	}
	if len(dropped) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, 30*time.Second)
	if err := n.mesh.Publish(ctx); err != nil && n.ctx.Err() == nil {
		n.log.Warn("announcing the dropped span", "err", err)
	}
	cancel()
	select {
	case <-time.After(dropGrace):
	case <-n.ctx.Done():
	}
	for _, s := range dropped {
		s.span.Close()
	}
}

// alone reports whether the node has no peer to fetch from and no way to
// find one.
func (n *Node) alone() bool {
	return len(n.cfg.Bootstrap) == 0 && n.cfg.NoMDNS && len(n.mesh.Host().Network().Peers()) == 0
}
