package node

// The node's own block store under a size cap (Config.MaxDisk, --max-disk),
// as kubo's Datastore.StorageMax with its garbage collection, but safe for
// a mesh.
//
// # Accounting
//
// What counts is the CID-named files of DATA/blocks (the --serve folders
// are never counted nor touched), plus the bytes this node has reserved
// for blocks it is fetching and not yet stored. Every write to the store
// passes the admission check (shards.FileStore.SetAdmit) once its content
// is complete: it is refused when it does not fit even after eviction. A
// span's fetch (serveFetched) reserves its bytes first, so it fails before
// transferring anything, with an error naming the cap, what the store
// holds and what it needs (DiskFullError). Blocks being written may take
// the store past the cap by a block per transfer until admitted or not.
//
// # What may be evicted
//
// Never: blocks of the spans the node serves, the model files (tokenizer)
// of the models it serves, manifests, blocks reserved for a span it is
// fetching (for pinGrace after the fetch, for the caller to start serving
// it), blocks written less than freshGrace ago (a pull or repair may still
// need them), and blocks of no model this node knows. The others may go
// only if the mesh keeps them: the view of their model shows at least
// Replicas other nodes serving them; or, with fewer, when no peer in the
// view has room for a copy: every other peer serving the model holds it or
// advertises less free memory than the block takes loaded, and the node is
// connected to no other peer (whose record it has not read, and which is
// assumed to have room). Such an eviction is logged at warn level: the
// mesh may lose the block. Well-held blocks go first, then the others,
// each least recently used first (last read by a peer or written); the
// eviction stops as soon as the new blocks fit.
//
// # Placement
//
// A node choosing its span of a --model (place) takes no more blocks than
// fit under the cap beside what it must keep: the bytes of the blocks it
// cannot evict (those of the model it serves now excepted: the new span
// replaces them), the model's files, and every window of that many
// consecutive blocks (diskSpan). A rebalancing move keeps the old span
// until the new one is served, so it fetches only when both fit; if they
// do not, the move fails and is retried later like any failed move.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
)

// Bounds of the store's cap.
const (
	// pinGrace is how long the blocks of a span stay reserved after its
	// fetch ended: the caller starts serving it meanwhile.
	pinGrace = time.Minute
	// freshGrace is how long a block just written is never evicted: a
	// pull or a repair writing several may still need it.
	freshGrace = time.Minute
	// diskViewTimeout bounds the lookup of a model's view when eviction
	// counts who else holds its blocks.
	diskViewTimeout = 3 * time.Second
)

// ErrDiskFull is wrapped by every error of a write or fetch that does not
// fit under --max-disk.
var ErrDiskFull = errors.New("block store full")

// DiskFullError says why something does not fit under --max-disk.
type DiskFullError struct {
	What     string // what was to be stored
	Max      int64  // the cap
	Used     int64  // bytes the store holds or has reserved now
	Need     int64  // bytes more it needs
	Freeable int64  // bytes eviction could free
	Needed   int64  // bytes of blocks served, being fetched or just written here (and manifests)
	Kept     int64  // bytes of blocks too few other nodes hold (or of unknown models)
}

func (e *DiskFullError) Error() string {
	return fmt.Sprintf("--max-disk %s: cannot store %s (%s more) in a block store holding %s: eviction can free only %s "+
		"(the rest: %s of blocks this node serves, is fetching or just wrote, %s of blocks the mesh holds too few other copies of)",
		ByteSize(e.Max), e.What, humanBytes(e.Need), humanBytes(e.Used), humanBytes(e.Freeable), humanBytes(e.Needed), humanBytes(e.Kept))
}

func (e *DiskFullError) Unwrap() error { return ErrDiskFull }

// diskItem is a file of the node's store as eviction sees it.
type diskItem struct {
	CID  string
	Size int64
	Used time.Time // last written or read by a peer
	// Needed: served, reserved, just written, or a manifest: never evicted.
	Needed bool
	// Holders is how many other nodes the view shows holding it (serving
	// a span with the block; any span of the model for its files); -1 when
	// unknown (no view of its model, or no model this node knows has it).
	Holders int
	// Room: some peer could take a copy (see the file comment).
	Room bool
	What string // for logs: "block 3 of model X"
}

// diskEviction is an item chosen for eviction, and why.
type diskEviction struct {
	diskItem
	Lost bool // fewer than Replicas other nodes hold it: the mesh may lose it
	Why  string
}

// diskEvictable reports whether it may be evicted with replicas wanted, if
// the mesh may then lose it, and why.
func diskEvictable(it diskItem, replicas int) (ok, lost bool, why string) {
	switch {
	case it.Needed:
		return false, false, "needed here"
	case it.Holders < 0:
		return false, false, "who else holds it is unknown"
	case it.Holders >= replicas:
		return true, false, fmt.Sprintf("not served here; %d other nodes hold it (replicas %d)", it.Holders, replicas)
	case it.Room:
		return false, false, fmt.Sprintf("only %d other nodes hold it, fewer than %d, and peers have room for a copy", it.Holders, replicas)
	default:
		return true, true, fmt.Sprintf("not served here; only %d other nodes hold it, fewer than %d, and no peer in the view has room for a copy", it.Holders, replicas)
	}
}

// chooseEvictions picks what to evict from items so that a store holding
// used bytes can take need more under limit: the evictable items
// (diskEvictable), those the mesh holds enough copies of first, then the
// others, each least recently used first (ties by CID), stopping as soon
// as it fits. It returns nothing when it fits already, and a
// *DiskFullError (What left empty) when eviction cannot make it fit; then
// nothing should be evicted. It is pure.
func chooseEvictions(items []diskItem, used, need, limit int64, replicas int) ([]diskEviction, error) {
	over := used + need - limit
	if over <= 0 {
		return nil, nil
	}
	var cands []diskEviction
	full := &DiskFullError{Max: limit, Used: used, Need: need}
	for _, it := range items {
		ok, lost, why := diskEvictable(it, replicas)
		switch {
		case ok:
			cands = append(cands, diskEviction{diskItem: it, Lost: lost, Why: why})
			full.Freeable += it.Size
		case it.Needed:
			full.Needed += it.Size
		default:
			full.Kept += it.Size
		}
	}
	if full.Freeable < over {
		return nil, full
	}
	slices.SortFunc(cands, func(a, b diskEviction) int {
		if a.Lost != b.Lost {
			if a.Lost {
				return 1
			}
			return -1
		}
		if c := a.Used.Compare(b.Used); c != 0 {
			return c
		}
		return strings.Compare(a.CID, b.CID)
	})
	var out []diskEviction
	for _, c := range cands {
		if over <= 0 {
			break
		}
		out = append(out, c)
		over -= c.Size
	}
	return out, nil
}

// fitSpan is the most consecutive blocks such that every run of that many
// fits in budget bytes, counting the blocks not already kept (kept[b]:
// block b is on disk and stays whatever the span; kept may be nil). It is
// at most len(sizes), and 0 when even one block does not fit. It is pure.
func fitSpan(sizes []int64, kept []bool, budget int64) int {
	cost := func(b int) int64 {
		if b < len(kept) && kept[b] {
			return 0
		}
		return sizes[b]
	}
	best := 0
	for l := 1; l <= len(sizes); l++ {
		var sum int64
		fits := true
		for b := 0; b < len(sizes) && fits; b++ {
			sum += cost(b)
			if b >= l {
				sum -= cost(b - l)
			}
			if b >= l-1 && sum > budget {
				fits = false
			}
		}
		if !fits {
			break // a longer run holds a shorter one that does not fit
		}
		best = l
	}
	return best
}

// diskFile is a file of the store on disk.
type diskFile struct {
	size int64
	mod  time.Time
}

// diskPin reserves blocks being fetched for a span: they count as stored
// (sizes from the manifest) and are never evicted while it holds.
type diskPin struct {
	sizes map[string]int64
	until time.Time // zero: until released
}

// freshWrite is a write admitted recently.
type freshWrite struct {
	size int64
	at   time.Time
}

// disk enforces Config.MaxDisk on the node's own store (see the file
// comment). Safe for concurrent use.
type disk struct {
	n   *Node
	own *shards.FileStore
	max int64 // 0: no cap

	mu    sync.Mutex // one admission, reservation or eviction at a time
	pins  []*diskPin
	fresh map[string]freshWrite

	useMu sync.Mutex
	used  map[string]time.Time // last read by a peer or written

	evictions, evicted atomic.Int64 // count and bytes
}

// newDisk puts own under the node's cap, and registers its metrics on reg.
func newDisk(n *Node, own *shards.FileStore, reg prometheus.Registerer) *disk {
	d := &disk{n: n, own: own, max: int64(n.cfg.MaxDisk), fresh: map[string]freshWrite{}, used: map[string]time.Time{}}
	if d.max > 0 {
		own.SetAdmit(d.admit)
		if files, err := d.scan(); err == nil {
			if used := sumFiles(files); used > d.max {
				n.log.Warn("the block store is over --max-disk: blocks nobody needs here are evicted as fetches need room",
					"dir", own.Dir(), "used", humanBytes(used), "max_disk", ByteSize(d.max))
			}
		}
	}
	if reg != nil {
		reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "infermesh_store_bytes",
				Help: "Bytes of blocks, files and manifests in this node's own store (DATA/blocks)."}, func() float64 {
				files, _ := d.scan()
				return float64(sumFiles(files))
			}),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "infermesh_store_max_bytes",
				Help: "The store's cap (--max-disk); 0: none."}, func() float64 { return float64(d.max) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "infermesh_store_evictions_total",
				Help: "Blocks evicted from this node's store to stay under --max-disk."}, func() float64 { return float64(d.evictions.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "infermesh_store_evicted_bytes_total",
				Help: "Bytes evicted from this node's store to stay under --max-disk."}, func() float64 { return float64(d.evicted.Load()) }),
		)
	}
	return d
}

// DiskStatus is the node's own block store in GET /v1/status.
type DiskStatus struct {
	Dir          string `json:"dir"`
	UsedBytes    int64  `json:"used_bytes"`
	MaxBytes     int64  `json:"max_bytes"` // --max-disk; 0: no cap
	Files        int    `json:"files"`
	Evictions    int64  `json:"evictions"`
	EvictedBytes int64  `json:"evicted_bytes"`
}

// status is the store's DiskStatus.
func (d *disk) status() DiskStatus {
	if d == nil {
		return DiskStatus{}
	}
	files, _ := d.scan()
	return DiskStatus{Dir: d.own.Dir(), UsedBytes: sumFiles(files), MaxBytes: d.max, Files: len(files),
		Evictions: d.evictions.Load(), EvictedBytes: d.evicted.Load()}
}

// touch records a use of c (a peer read it, or it was written).
func (d *disk) touch(c cid.Cid) {
	if d == nil || d.max <= 0 {
		return
	}
	d.useMu.Lock()
	d.used[c.String()] = time.Now()
	d.useMu.Unlock()
}

// scan lists the CID-named files of the store with their sizes.
func (d *disk) scan() (map[string]diskFile, error) {
	entries, err := os.ReadDir(d.own.Dir())
	if err != nil {
		return nil, err
	}
	out := make(map[string]diskFile, len(entries))
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if _, err := cid.Decode(e.Name()); err != nil {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		out[e.Name()] = diskFile{size: info.Size(), mod: info.ModTime()}
	}
	return out, nil
}

func sumFiles(files map[string]diskFile) int64 {
	var t int64
	for _, f := range files {
		t += f.size
	}
	return t
}

// reserve makes room for the cids of man (blocks and files) not stored yet,
// evicting what it may, and pins them all until the returned release is
// called and pinGrace has passed. what names them in errors and logs. With
// no cap it does nothing.
func (d *disk) reserve(ctx context.Context, man *shards.Manifest, cids []cid.Cid, what string) (release func(), err error) {
	if d == nil || d.max <= 0 {
		return func() {}, nil
	}
	sizes := map[string]int64{}
	for _, c := range cids {
		sizes[c.String()] = 0
	}
	for _, b := range man.Blocks {
		if _, ok := sizes[b.CID]; ok {
			sizes[b.CID] = b.Size
		}
	}
	for _, f := range man.Files {
		if _, ok := sizes[f.CID]; ok {
			sizes[f.CID] = f.Size
		}
	}
	pin := &diskPin{sizes: sizes}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pins = append(d.pins, pin)
	acc := d.accountLocked("", pin)
	var need int64
	for c, size := range sizes {
		if _, ok := acc.files[c]; !ok {
			need += size
		}
	}
	if err := d.makeRoomLocked(ctx, acc, need, what); err != nil {
		d.pins = slices.DeleteFunc(d.pins, func(p *diskPin) bool { return p == pin })
		return nil, err
	}
	return func() {
		d.mu.Lock()
		pin.until = time.Now().Add(pinGrace)
		d.mu.Unlock()
	}, nil
}

// admit is the store's admission check (shards.FileStore.SetAdmit): a
// write of size bytes under c fits, after eviction if need be, or is
// refused.
func (d *disk) admit(c cid.Cid, size int64) error {
	key := c.String()
	d.touch(c)
	d.mu.Lock()
	defer d.mu.Unlock()
	var reserved int64
	for _, p := range d.pins {
		if s, ok := p.sizes[key]; ok && d.holds(p, time.Now()) {
			reserved = max(reserved, s)
		}
	}
	if reserved >= size {
		d.fresh[key] = freshWrite{size: size, at: time.Now()}
		return nil
	}
	acc := d.accountLocked("", nil)
	if f, ok := acc.files[key]; ok && f.size >= size {
		return nil // the same content again
	}
	what := "block " + key
	if acc.used+size-reserved > d.max {
		if ref, ok := d.index()[key]; ok {
			what = describeBlock(ref.man, ref.block)
		}
	}
	ctx, cancel := context.WithTimeout(d.n.ctx, 2*diskViewTimeout)
	defer cancel()
	if err := d.makeRoomLocked(ctx, acc, size-reserved, what); err != nil {
		d.n.log.Warn("not storing: the block store is full", "cid", c, "err", err)
		return err
	}
	d.fresh[key] = freshWrite{size: size, at: time.Now()}
	return nil
}

// holds reports whether pin p holds at time now.
func (d *disk) holds(p *diskPin, now time.Time) bool { return p.until.IsZero() || now.Before(p.until) }

// makeRoomLocked evicts what chooseEvictions picks for need more bytes
// beside what acc counts, or returns its error, naming what.
func (d *disk) makeRoomLocked(ctx context.Context, acc diskAccount, need int64, what string) error {
	if acc.used+need <= d.max {
		return nil // fits: no need to ask who else holds what
	}
	evs, err := chooseEvictions(d.itemsLocked(ctx, acc, d.index()), acc.used, need, d.max, d.n.replicas())
	if err != nil {
		var full *DiskFullError
		if errors.As(err, &full) {
			full.What = what
		}
		return err
	}
	for _, e := range evs {
		c, err := cid.Decode(e.CID)
		if err == nil {
			err = d.own.Remove(c)
		}
		if err != nil {
			d.n.log.Warn("evicting a block from the store", "block", e.What, "cid", e.CID, "err", err)
			continue
		}
		d.evictions.Add(1)
		d.evicted.Add(e.Size)
		d.useMu.Lock()
		delete(d.used, e.CID)
		d.useMu.Unlock()
		args := []any{"block", e.What, "cid", e.CID, "bytes", e.Size, "why", e.Why, "for", what, "max_disk", ByteSize(d.max)}
		if e.Lost {
			d.n.log.Warn("evicted a block the mesh may lose: the store is full and no peer has room for it", args...)
		} else {
			d.n.log.Info("evicted a block from the store", args...)
		}
	}
	return nil
}

// diskAccount is what the store holds and what of it must stay.
type diskAccount struct {
	files  map[string]diskFile // on disk
	used   int64               // on disk, plus reserved or admitted and not on disk yet
	needed map[string]bool     // never evicted: served, reserved, just written
}

// accountLocked counts the store: its files, the bytes used (those of the
// reservation skip not on disk yet excepted), and what is needed (the
// blocks of exclude's served spans not counted as needed; exclude ""
// counts them all). Expired reservations and fresh writes are dropped.
func (d *disk) accountLocked(exclude string, skip *diskPin) diskAccount {
	files, err := d.scan()
	if err != nil {
		files = map[string]diskFile{}
	}
	now := time.Now()
	d.pins = slices.DeleteFunc(d.pins, func(p *diskPin) bool { return !d.holds(p, now) })
	for c, f := range d.fresh {
		if now.Sub(f.at) >= freshGrace {
			delete(d.fresh, c)
		}
	}
	needed := map[string]bool{}
	pending := map[string]int64{}
	for _, p := range d.pins {
		for c, size := range p.sizes {
			needed[c] = true
			if _, on := files[c]; !on && p != skip {
				pending[c] = max(pending[c], size)
			}
		}
	}
	for c, f := range d.fresh {
		needed[c] = true
		if _, on := files[c]; !on {
			pending[c] = max(pending[c], f.size)
		}
	}
	for _, s := range d.n.servedSpans() {
		needed[s.model.ID.String()] = true
		for _, c := range s.model.Manifest.FileCIDs() {
			needed[c.String()] = true
		}
		if s.model.ID.String() == exclude {
			continue
		}
		for _, b := range s.model.Manifest.Blocks[s.start:s.end] {
			needed[b.CID] = true
		}
	}
	used := sumFiles(files)
	for _, size := range pending {
		used += size
	}
	return diskAccount{files: files, used: used, needed: needed}
}

// itemsLocked lists the store's files as eviction sees them: needed or
// not, and for the blocks and files of known models (index) who else
// holds them per the view.
func (d *disk) itemsLocked(ctx context.Context, acc diskAccount, index map[string]blockRef) []diskItem {
	views := map[string]*mesh.ModelView{}
	var self peer.ID
	var connected []peer.ID
	if d.n.mesh != nil {
		self, connected = d.n.mesh.ID(), d.n.mesh.Host().Network().Peers()
	}
	d.useMu.Lock()
	lastUse := maps.Clone(d.used)
	d.useMu.Unlock()
	items := make([]diskItem, 0, len(acc.files))
	for c, f := range acc.files {
		it := diskItem{CID: c, Size: f.size, Used: f.mod, Holders: -1, What: "block " + c}
		if t, ok := lastUse[c]; ok && t.After(it.Used) {
			it.Used = t
		}
		id, _ := cid.Decode(c)
		ref, known := index[c]
		switch {
		case acc.needed[c] || id.Prefix().Codec == shards.CodecManifest:
			it.Needed = true
		case known:
			it.What = describeBlock(ref.man, ref.block)
			mv, ok := views[ref.model]
			if !ok && d.n.mesh != nil {
				if mid, err := cid.Decode(ref.model); err == nil {
					vctx, cancel := context.WithTimeout(ctx, diskViewTimeout)
					mv, _ = d.n.mesh.View().Model(vctx, mid)
					cancel()
				}
				views[ref.model] = mv
			}
			if mv != nil {
				it.Holders, it.Room = holdersOf(mv, self, connected, ref.block, ref.man.ResidentBytes(ref.block, ref.block+1))
			}
		}
		items = append(items, it)
	}
	return items
}

// holdersOf counts the peers other than self that the view shows holding
// block b of the model (b < 0: one of its files, which every server holds),
// and reports whether some peer has room for a copy: a server of the model
// without it whose free memory holds it loaded (resident bytes), or a
// connected peer not in the view (its record unread: assumed to).
func holdersOf(mv *mesh.ModelView, self peer.ID, connected []peer.ID, b int, resident int64) (holders int, room bool) {
	inView := map[peer.ID]bool{self: true}
	for _, p := range mv.Peers {
		if p.ID == self || inView[p.ID] {
			continue
		}
		inView[p.ID] = true
		if b < 0 || p.Span.Start <= b && b < p.Span.End {
			holders++
			continue
		}
		var free int64
		if p.Load != nil {
			free = p.Load.FreeKVBytes
		} else if p.Record != nil {
			free = p.Record.Load.FreeKVBytes
		}
		if free >= resident {
			room = true
		}
	}
	for _, c := range connected {
		if !inView[c] {
			room = true
		}
	}
	return holders, room
}

// blockRef is where a CID is in a known model: block index, -1 for a file.
type blockRef struct {
	model string
	man   *shards.Manifest
	block int
}

// index maps the CIDs of the blocks and files of every model this node
// knows (served, fetched manifests, DATA/models, manifests in the store)
// to where they are.
func (d *disk) index() map[string]blockRef {
	mans := map[string]*shards.Manifest{}
	for _, s := range d.n.servedSpans() {
		mans[s.model.ID.String()] = s.model.Manifest
	}
	d.n.manifests.Lock()
	for id, m := range d.n.manifests.m {
		mans[id] = m
	}
	d.n.manifests.Unlock()
	dirs, _ := filepath.Glob(filepath.Join(d.n.opts.DataDir, "models", "*", shards.ManifestFile))
	for _, p := range dirs {
		id := filepath.Base(filepath.Dir(p))
		if _, ok := mans[id]; ok {
			continue
		}
		if b, err := os.ReadFile(p); err == nil {
			if m, err := shards.DecodeManifest(b); err == nil {
				if mid, err := m.ID(); err == nil && mid.String() == id {
					mans[id] = m
				}
			}
		}
	}
	if l, err := d.own.List(); err == nil {
		for _, c := range l {
			if c.Prefix().Codec != shards.CodecManifest || mans[c.String()] != nil {
				continue
			}
			if b, err := d.own.Get(c); err == nil {
				if m, err := shards.DecodeManifest(b); err == nil {
					mans[c.String()] = m
				}
			}
		}
	}
	out := map[string]blockRef{}
	for id, m := range mans {
		for i, b := range m.Blocks {
			out[b.CID] = blockRef{model: id, man: m, block: i}
		}
		for _, f := range m.Files {
			out[f.CID] = blockRef{model: id, man: m, block: -1}
		}
	}
	return out
}

// describeBlock names block b of man (b < 0: one of its files) for logs.
func describeBlock(man *shards.Manifest, b int) string {
	id, _ := man.ID()
	if b < 0 {
		return fmt.Sprintf("a file of model %s", id)
	}
	return fmt.Sprintf("block %d of model %s", b, id)
}

// span is how many consecutive blocks of m fit under the cap beside what
// the node must keep (see Placement in the file comment); len(blocks)
// with no cap, at least 1 (a span that does not fit then fails its
// reservation, saying why).
func (d *disk) span(ctx context.Context, m *shards.Model) int {
	blocks := len(m.Manifest.Blocks)
	if d == nil || d.max <= 0 {
		return blocks
	}
	d.mu.Lock()
	acc := d.accountLocked(m.ID.String(), nil)
	items := d.itemsLocked(ctx, acc, d.index())
	d.mu.Unlock()
	keep := acc.used
	kept := make([]bool, blocks)
	pos := map[string]int{}
	for i, b := range m.Manifest.Blocks {
		pos[b.CID] = i
	}
	for _, it := range items {
		if ok, _, _ := diskEvictable(it, d.n.replicas()); ok {
			keep -= it.Size
		} else if i, ok := pos[it.CID]; ok {
			kept[i] = true
		}
	}
	for _, f := range m.Manifest.Files {
		if _, on := acc.files[f.CID]; !on {
			keep += f.Size
		}
	}
	sizes := make([]int64, blocks)
	for i, b := range m.Manifest.Blocks {
		sizes[i] = b.Size
	}
	n := fitSpan(sizes, kept, d.max-keep)
	if n < blocks {
		d.n.log.Debug("--max-disk limits the span", "model", m.ID, "blocks", n, "max_disk", ByteSize(d.max),
			"must_keep", humanBytes(keep))
	}
	return max(n, 1)
}
