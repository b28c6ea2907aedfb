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
	m := d.model
	lm, err := n.localModel(m.ID, m.Manifest)
	if err != nil {
		return err
	}
	var copyCIDs []cid.Cid
	for _, f := range m.Manifest.Files {
		if c, err := shards.ParseCID(f.CID); err == nil {
			copyCIDs = append(copyCIDs, c)
		}
	}
	for _, b := range m.Manifest.Blocks[d.start:d.end] {
		if c, err := shards.ParseCID(b.CID); err == nil && !slices.ContainsFunc(d.missing, c.Equals) {
			copyCIDs = append(copyCIDs, c)
		}
	}
	for _, c := range copyCIDs {
		if ok, _ := n.own.Has(c); ok {
			continue
		}
		data, err := m.Store.Get(c)
		if err != nil {
			continue // a file: fetched from peers below, like the missing blocks
		}
		if _, err := n.own.Put(c.Prefix().Codec, data); err != nil {
			return err
		}
	}
	if len(d.missing) > 0 {
		if len(n.cfg.Bootstrap) == 0 && n.cfg.NoMDNS {
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
	s, err := n.serveFetched(fctx, lm, d.start, d.end)
	if err != nil {
		return err
	}
	s.reason = "--serve " + d.spec + " (repaired into the node's own store)"
	n.addServed(s)
	n.log.Info("repaired", "serve", d.spec, "model", m.ID, "blocks", fmt.Sprintf("%d-%d", d.start, d.end-1), "fetched", len(d.missing), "store", n.own.Dir())
	return nil
}
