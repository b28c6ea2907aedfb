package mesh

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/shards"
)

// BlocksProtocol moves one block (or manifest) from a provider to a
// requester; the requester may ask for it from an offset, to resume a
// transfer another provider dropped. One exchange per stream:
//
//	request:  uvarint length | JSON {"cid": "<CID string>", "offset": N}
//	response: status byte (0 ok, 1 not found, 2 busy, 3 bad request)
//	          ok only: uvarint total size of the content | bytes [offset, total)
//
// then the provider closes the stream. The provider reads the content once
// through its verified Store.Get; the requester verifies the whole content
// against its CID before keeping it.
const BlocksProtocol = "/infermesh/blocks/1.0.0"

// Status bytes of a block response.
const (
	blockOK         byte = 0
	blockNotFound   byte = 1
	blockBusy       byte = 2
	blockBadRequest byte = 3
)

// Bounds of the block protocol.
const (
	// MaxUploads is how many blocks a node sends at once; a request over it
	// is answered busy at once, so that uploads do not starve inference.
	MaxUploads = 4
	// maxBlockRequestBytes bounds a request frame.
	maxBlockRequestBytes = 512
	// maxBlockBytes bounds the size a provider may announce (blocks are at
	// most a few hundred MB).
	maxBlockBytes = 2 << 30
	// maxPrealloc bounds the memory set aside for a block before its bytes
	// arrive; a bigger block grows as they do.
	maxPrealloc = 256 << 20
	// blockRequestTimeout bounds opening a stream, sending the request and
	// reading the response header.
	blockRequestTimeout = 10 * time.Second
	// blockIdleTimeout bounds each chunk of the body, either side: a
	// provider that stalls longer is dropped and the block resumed elsewhere.
	blockIdleTimeout = 10 * time.Second
	// blockChunk is the unit of writes, reads, deadlines and progress.
	blockChunk = 1 << 20
	// transfersPerProvider bounds the blocks one fetch takes from one
	// provider at once: one stream moves bytes as fast as several on
	// the same connection, and the other workers meanwhile verify and
	// store what they received.
	transfersPerProvider = 2
	// DefaultFetchProviders is FetchOptions.Providers when zero.
	DefaultFetchProviders = 3
	// lookupRounds bounds how many times a block waits for busy providers
	// or looks up more, after every provider known failed or was busy
	// (waits of 0.1 s doubling to 5 s: 16 s in all).
	lookupRounds = 8
)

// blockRequest is the JSON request of BlocksProtocol.
type blockRequest struct {
	CID    string `json:"cid"`              // block or manifest CID, string form
	Offset int64  `json:"offset,omitempty"` // first byte wanted; 0: all
}

// Errors of a block request to one provider.
var (
	errBlockBusy     = errors.New("provider busy")
	errBlockNotHere  = errors.New("provider does not have it")
	errBlockRefused  = errors.New("provider refused the request")
	errBlockMismatch = errors.New("provider's size differs from the others'")
)

// blockServer answers BlocksProtocol from a store, at most MaxUploads at
// a time.
type blockServer struct {
	m     *Mesh
	store shards.Store // nil: answers not found
	slots chan struct{}
}

func newBlockServer(m *Mesh, store shards.Store) *blockServer {
	return &blockServer{m: m, store: store, slots: make(chan struct{}, MaxUploads)}
}

func (b *blockServer) handle(s network.Stream) {
	defer s.Close()
	s.SetDeadline(time.Now().Add(blockRequestTimeout))
	frame, err := readFrame(s, maxBlockRequestBytes)
	if err != nil {
		s.Reset()
		return
	}
	var req blockRequest
	c, err := cid.Cid{}, json.Unmarshal(frame, &req)
	if err == nil {
		c, err = shards.ParseCID(req.CID)
	}
	if err != nil || req.Offset < 0 {
		s.Write([]byte{blockBadRequest})
		return
	}
	select {
	case b.slots <- struct{}{}:
		defer func() { <-b.slots }()
	default:
		s.Write([]byte{blockBusy})
		return
	}
	var data []byte
	if b.store != nil {
		data, err = b.store.Get(c)
	}
	if b.store == nil || err != nil {
		if err != nil && !errors.Is(err, shards.ErrNotFound) {
			b.m.log.Warn("cannot serve block", "cid", c, "err", err)
		}
		s.Write([]byte{blockNotFound})
		return
	}
	if req.Offset > int64(len(data)) {
		s.Write([]byte{blockBadRequest})
		return
	}
	var hdr [1 + binary.MaxVarintLen64]byte
	hdr[0] = blockOK
	n := 1 + binary.PutUvarint(hdr[1:], uint64(len(data)))
	if _, err := s.Write(hdr[:n]); err != nil {
		s.Reset()
		return
	}
	for rest := data[req.Offset:]; len(rest) > 0; {
		k := min(len(rest), blockChunk)
		s.SetWriteDeadline(time.Now().Add(blockIdleTimeout))
		if _, err := s.Write(rest[:k]); err != nil {
			s.Reset()
			b.m.log.Debug("block upload dropped", "cid", c, "peer", s.Conn().RemotePeer(), "err", err)
			return
		}
		rest = rest[k:]
	}
}

// FetchProgress reports a block transfer; Done grows by up to 1 MiB per
// report.
type FetchProgress struct {
	CID   cid.Cid
	Peer  peer.ID // provider sending it now
	Done  int64   // bytes of the block received so far, across providers
	Total int64   // size of the block
	// Offset is where this provider's part began: above 0, the transfer
	// was resumed after another provider dropped.
	Offset int64
	// Stored is set once, on the last report of a block: verified and in
	// the store.
	Stored bool
}

// FetchOptions tune FetchBlocks. Zero values take the defaults named.
type FetchOptions struct {
	// Providers is how many blocks are fetched at once, each from a
	// different provider where there are enough (DefaultFetchProviders).
	Providers int
	// Progress, if set, is called after each chunk received; calls are
	// serialised.
	Progress func(FetchProgress)
}

// FetchBlocks fetches every CID (blocks or manifests) not already in store
// from the peers that provide it, several at once from different providers.
// A provider that drops mid-block is replaced by another, asked for the
// rest from the bytes received so far. Each block is verified whole against
// its CID (store.Add) before it enters the store; a provider whose bytes do
// not match is banned for the rest of the fetch and the block fetched again
// from others. Once done the node provides what it got, so popular blocks
// spread: store should be Config.Store, which the node serves from.
func (m *Mesh) FetchBlocks(ctx context.Context, cids []cid.Cid, store shards.Store, opts FetchOptions) error {
	if opts.Providers <= 0 {
		opts.Providers = DefaultFetchProviders
	}
	f := &fetch{m: m, store: store, opts: opts, banned: map[peer.ID]bool{}, active: map[peer.ID]int{}}
	f.idle = sync.NewCond(&f.mu)
	var todo []cid.Cid
	for _, c := range cids {
		if ok, err := store.Has(c); err != nil {
			return err
		} else if !ok && !slices.ContainsFunc(todo, c.Equals) {
			todo = append(todo, c)
		}
	}
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	queue := make(chan cid.Cid)
	errs := make([]error, len(todo))
	var got []cid.Cid
	var gotMu sync.Mutex
	var wg sync.WaitGroup
	for range min(opts.Providers, len(todo)) {
		wg.Go(func() {
			for c := range queue {
				i := slices.IndexFunc(todo, c.Equals)
				if errs[i] = f.block(ctx, c); errs[i] != nil {
					cancel()
					continue
				}
				gotMu.Lock()
				got = append(got, c)
				gotMu.Unlock()
			}
		})
	}
feed:
	for _, c := range todo {
		select {
		case queue <- c:
		case <-ctx.Done():
			break feed
		}
	}
	close(queue)
	wg.Wait()
	if len(got) > 0 && m.cfg.Store != nil {
		pctx, pcancel := context.WithTimeout(m.ctx, publishTimeout)
		if err := m.Provide(pctx, got...); err != nil {
			m.log.Warn("providing fetched blocks", "blocks", len(got), "err", err)
		}
		pcancel()
	}
	if err := parent.Err(); err != nil {
		return err
	}
	// One block failing cancels the others: report the failures, not
	// the cancellations they caused.
	errs = slices.DeleteFunc(errs, func(err error) bool { return errors.Is(err, context.Canceled) })
	return errors.Join(errs...)
}

// fetch is the state of one FetchBlocks call shared by its workers.
type fetch struct {
	m     *Mesh
	store shards.Store
	opts  FetchOptions

	mu     sync.Mutex
	banned map[peer.ID]bool // sent bytes that did not match a CID
	active map[peer.ID]int  // transfers in progress from each peer
	idle   *sync.Cond       // on mu: a transfer ended

	progressMu sync.Mutex
}

// blockFetch is the transfer of one block, possibly from several providers.
type blockFetch struct {
	c        cid.Cid
	data     []byte // received so far
	total    int64  // -1 until a provider says
	from     map[peer.ID]bool
	noResume bool // a mixed-source copy failed to verify: one source each try
}

// block fetches c into the store.
func (f *fetch) block(ctx context.Context, c cid.Cid) error {
	// No provider yet is no reason to give up: a server's provider
	// records may still be on their way (it announces in the background
	// after it starts), so an empty lookup waits and asks again like a
	// round of busy providers does.
	provs, err := f.providers(ctx, c)
	if err != nil && ctx.Err() != nil {
		return err
	}
	b := &blockFetch{c: c, total: -1, from: map[peer.ID]bool{}}
	failed := map[peer.ID]error{} // out for this block: not here, dropped, refused
	busy := map[peer.ID]bool{}    // busy this round
	for round := 0; ; {
		p, ok := f.pick(ctx, provs, failed, busy)
		if !ok {
			// Everyone known is out or busy: wait, and ask the DHT
			// again, since providers come and go.
			if round >= lookupRounds {
				if len(provs) == 0 {
					return fmt.Errorf("block %s: no provider found", c)
				}
				if len(failed) == 0 && len(busy) == 0 {
					return fmt.Errorf("block %s: every provider banned", c)
				}
				return fmt.Errorf("block %s: no provider could send it: %w", c, joinPeerErrs(failed, busy))
			}
			wait := min(100*time.Millisecond<<round, 5*time.Second)
			round++
			select {
			case <-time.After(wait/2 + rand.N(wait/2+1)):
			case <-ctx.Done():
				return ctx.Err()
			}
			clear(busy)
			more, _ := f.providers(ctx, c)
			for _, ai := range more {
				if !slices.ContainsFunc(provs, func(p peer.AddrInfo) bool { return p.ID == ai.ID }) {
					provs = append(provs, ai)
				}
			}
			continue
		}
		if b.noResume {
			b.data, b.total, b.from = b.data[:0], -1, map[peer.ID]bool{}
		}
		err := f.from(ctx, p, b)
		f.mu.Lock()
		f.active[p.ID]--
		f.idle.Broadcast()
		f.mu.Unlock()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch {
		case errors.Is(err, errBlockBusy):
			busy[p.ID] = true
			continue
		case err != nil:
			f.m.log.Debug("block transfer failed", "cid", c, "peer", p.ID, "received", len(b.data), "err", err)
			failed[p.ID] = err
			continue
		}
		err = f.store.Add(c, bytes.NewReader(b.data))
		if err == nil {
			f.report(FetchProgress{CID: c, Peer: p.ID, Done: b.total, Total: b.total, Stored: true})
			return nil
		}
		if !errors.Is(err, shards.ErrCorrupt) {
			return err
		}
		if len(b.from) == 1 {
			f.m.log.Warn("provider sent a block that does not match its CID: banned for this fetch", "cid", c, "peer", p.ID)
			f.mu.Lock()
			f.banned[p.ID] = true
			f.mu.Unlock()
		} else {
			// Several providers contributed: we cannot tell which lied.
			// Fetch whole copies from one provider each until one fails
			// alone.
			f.m.log.Warn("block from several providers does not match its CID: refetching from one at a time", "cid", c, "peers", len(b.from))
			b.noResume = true
		}
		b.data, b.total, b.from = b.data[:0], -1, map[peer.ID]bool{}
	}
}

// providers looks up who provides c, leaving out this node.
func (f *fetch) providers(ctx context.Context, c cid.Cid) ([]peer.AddrInfo, error) {
	lctx, cancel := context.WithTimeout(ctx, blockRequestTimeout)
	defer cancel()
	var out []peer.AddrInfo
	for ai := range f.m.dht.FindProvidersAsync(lctx, c, 20) {
		if ai.ID != f.m.host.ID() {
			out = append(out, ai)
		}
	}
	if len(out) == 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("block %s: no provider found", c)
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out, nil
}

// pick chooses the usable provider with the fewest transfers from this
// fetch in progress, and counts the new one.
func (f *fetch) pick(ctx context.Context, provs []peer.AddrInfo, failed map[peer.ID]error, busy map[peer.ID]bool) (peer.AddrInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		best, usable := -1, false
		for i, p := range provs {
			if f.banned[p.ID] || failed[p.ID] != nil || busy[p.ID] {
				continue
			}
			usable = true
			if f.active[p.ID] < transfersPerProvider && (best < 0 || f.active[p.ID] < f.active[provs[best].ID]) {
				best = i
			}
		}
		if best >= 0 {
			f.active[provs[best].ID]++
			return provs[best], true
		}
		if !usable || ctx.Err() != nil {
			return peer.AddrInfo{}, false
		}
		// Every usable provider is sending us its share: wait for one
		// transfer to end (a cancelled fetch ends them all).
		f.idle.Wait()
	}
}

// from asks p for the rest of b and appends what it sends to b.data.
func (f *fetch) from(ctx context.Context, p peer.AddrInfo, b *blockFetch) error {
	if len(p.Addrs) > 0 {
		f.m.host.Peerstore().AddAddrs(p.ID, p.Addrs, time.Minute)
	}
	sctx, cancel := context.WithTimeout(ctx, blockRequestTimeout)
	s, err := f.m.host.NewStream(sctx, p.ID, BlocksProtocol)
	cancel()
	if err != nil {
		return err
	}
	// A cancelled fetch ends the read at once rather than at the deadline.
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	defer stop()
	defer s.Close()
	offset := int64(len(b.data))
	s.SetDeadline(time.Now().Add(blockRequestTimeout))
	req, _ := json.Marshal(blockRequest{CID: b.c.String(), Offset: offset})
	if err := writeFrame(s, req); err != nil {
		s.Reset()
		return err
	}
	s.CloseWrite()
	br := byteReader{r: s}
	status, err := br.ReadByte()
	if err != nil {
		s.Reset()
		return err
	}
	switch status {
	case blockOK:
	case blockBusy:
		return errBlockBusy
	case blockNotFound:
		return errBlockNotHere
	default:
		return fmt.Errorf("%w (status %d)", errBlockRefused, status)
	}
	total, err := binary.ReadUvarint(&br)
	if err != nil {
		s.Reset()
		return err
	}
	switch {
	case total > maxBlockBytes:
		s.Reset()
		return fmt.Errorf("announced %d bytes, over the %d limit", total, maxBlockBytes)
	case b.total >= 0 && int64(total) != b.total, int64(total) < offset:
		s.Reset()
		return fmt.Errorf("%w: %d bytes, not %d", errBlockMismatch, total, b.total)
	}
	b.total = int64(total)
	b.from[p.ID] = true
	if int64(cap(b.data)) < b.total {
		// Room for the whole block at once, saving the copies of growing:
		// it is within maxBlockBytes, and the provider has to send it.
		b.data = slices.Grow(b.data, int(min(b.total, maxPrealloc))-len(b.data))
	}
	for int64(len(b.data)) < b.total {
		n := int(min(b.total-int64(len(b.data)), blockChunk))
		old := len(b.data)
		b.data = slices.Grow(b.data, n)[:old+n]
		s.SetReadDeadline(time.Now().Add(blockIdleTimeout))
		k, err := io.ReadFull(s, b.data[old:])
		b.data = b.data[:old+k]
		if err != nil {
			s.Reset()
			return err
		}
		f.report(FetchProgress{CID: b.c, Peer: p.ID, Done: int64(len(b.data)), Total: b.total, Offset: offset})
	}
	return nil
}

func (f *fetch) report(p FetchProgress) {
	if f.opts.Progress == nil {
		return
	}
	f.progressMu.Lock()
	defer f.progressMu.Unlock()
	f.opts.Progress(p)
}

func joinPeerErrs(failed map[peer.ID]error, busy map[peer.ID]bool) error {
	var errs []error
	for p, err := range failed {
		errs = append(errs, fmt.Errorf("%s: %w", p, err))
	}
	for p := range busy {
		errs = append(errs, fmt.Errorf("%s: %w", p, errBlockBusy))
	}
	return errors.Join(errs...)
}
