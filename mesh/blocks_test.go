package mesh

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/quic-go/quic-go"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// lockedBuffer collects a node's log for assertions.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// blockNode starts a mesh node on loopback serving store (nil: none),
// closed when the test ends.
func blockNode(t testing.TB, store shards.Store, log io.Writer, boot ...*Mesh) *Mesh {
	t.Helper()
	key, _ := newKey(t)
	logger := slog.New(slog.DiscardHandler)
	if log != nil {
		logger = slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	cfg := Config{Key: key, ListenAddrs: []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, DHTMode: "server",
		Version: "test", Logger: logger, Store: store}
	for _, b := range boot {
		cfg.Bootstrap = append(cfg.Bootstrap, addrInfo(b))
	}
	m, err := New(context.Background(), cfg, func() Advert { return Advert{} })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// blockModel builds a small GPT model and returns it with every CID in
// its store (blocks and manifest).
func blockModel(t testing.TB, cfg build.GPTConfig) (*shards.Model, []cid.Cid) {
	t.Helper()
	model, err := build.GPT(cfg, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cids, err := model.Store.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(cids) < 3 {
		t.Fatalf("model store holds %d CIDs", len(cids))
	}
	return model, cids
}

// waitRouting waits until every node has someone in its DHT routing table.
func waitRouting(t testing.TB, nodes ...*Mesh) {
	t.Helper()
	waitFor(t, 10*time.Second, "DHT routing tables filled", func() (bool, string) {
		for _, n := range nodes {
			if n.DHT().RoutingTable().Size() == 0 {
				return false, fmt.Sprintf("%s has an empty routing table", n.ID())
			}
		}
		return true, ""
	})
}

// provide announces m as a provider of cids.
func provide(t testing.TB, m *Mesh, cids []cid.Cid) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Provide(ctx, cids...); err != nil {
		t.Error(err) // also called from stream handlers: no Fatal
	}
}

// checkStored fails unless every CID is in store and verifies.
func checkStored(t testing.TB, store shards.Store, cids []cid.Cid) {
	t.Helper()
	for _, c := range cids {
		if _, err := store.Get(c); err != nil {
			t.Fatal(err)
		}
	}
}

// progressLog records progress reports.
type progressLog struct {
	mu      sync.Mutex
	reports []FetchProgress
}

func (p *progressLog) add(r FetchProgress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reports = append(p.reports, r)
}

func (p *progressLog) all() []FetchProgress {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.reports)
}

func fetchAll(t testing.TB, m *Mesh, cids []cid.Cid, store shards.Store, opts FetchOptions) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.FetchBlocks(ctx, cids, store, opts); err != nil {
		t.Fatal(err)
	}
}

func TestFetchBlocks(t *testing.T) {
	model, cids := blockModel(t, build.GPTConfig{Layers: 4, Dim: 64, Heads: 2, Context: 64, Seed: 1})
	for _, n := range []int{1, 3} {
		t.Run(fmt.Sprintf("%d-providers", n), func(t *testing.T) {
			var provs []*Mesh
			for i := range n {
				provs = append(provs, blockNode(t, model.Store, nil, provs[:i]...))
			}
			store, err := shards.OpenFileStore(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			fetcher := blockNode(t, store, nil, provs...)
			waitRouting(t, append(provs, fetcher)...)
			for _, p := range provs {
				provide(t, p, cids)
			}
			var progress progressLog
			fetchAll(t, fetcher, cids, store, FetchOptions{Providers: 3, Progress: progress.add})
			checkStored(t, store, cids)

			from := map[peer.ID]bool{}
			stored := 0
			for _, r := range progress.all() {
				from[r.Peer] = true
				if r.Stored {
					stored++
				}
			}
			if stored != len(cids) {
				t.Errorf("%d blocks reported stored, want %d", stored, len(cids))
			}
			if n > 1 && len(from) < 2 {
				t.Errorf("fetched from %d providers of %d", len(from), n)
			}

			// Fetching again is a no-op.
			before := len(progress.all())
			fetchAll(t, fetcher, cids, store, FetchOptions{Progress: progress.add})
			if len(progress.all()) != before {
				t.Error("blocks already held were fetched again")
			}

			// The fetcher now provides what it got: a newcomer finds it.
			other := blockNode(t, nil, nil, provs[0])
			waitRouting(t, other)
			waitFor(t, 10*time.Second, "fetcher listed as provider", func() (bool, string) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				for ai := range other.DHT().FindProvidersAsync(ctx, cids[0], 20) {
					if ai.ID == fetcher.ID() {
						return true, ""
					}
				}
				return false, "not among the providers"
			})
		})
	}
}

// lyingStore serves every block with one byte flipped.
type lyingStore struct{ shards.Store }

func (l lyingStore) Get(c cid.Cid) ([]byte, error) {
	data, err := l.Store.Get(c)
	if err != nil {
		return nil, err
	}
	data = slices.Clone(data)
	data[len(data)/2] ^= 0xff
	return data, nil
}

// serveWith replaces m's block handler with a server on store; before the
// first request is answered, first runs.
func serveWith(m *Mesh, store shards.Store, first func()) (*blockServer, *atomic.Int64) {
	srv := newBlockServer(m, store)
	var asked atomic.Int64
	var once sync.Once
	m.Host().SetStreamHandler(BlocksProtocol, func(s network.Stream) {
		asked.Add(1)
		once.Do(first)
		srv.handle(s)
	})
	return srv, &asked
}

func TestFetchBlocksBansLiar(t *testing.T) {
	model, cids := blockModel(t, build.GPTConfig{Layers: 4, Dim: 64, Heads: 2, Context: 64, Seed: 1})
	var fetcherLog lockedBuffer
	liar := blockNode(t, nil, nil)
	honest := blockNode(t, model.Store, nil, liar)
	store, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fetcher := blockNode(t, store, &fetcherLog, liar, honest)
	waitRouting(t, liar, honest, fetcher)
	// Only the liar provides at first, so that it is asked first; the
	// honest node provides as the liar gets its first request.
	_, asked := serveWith(liar, lyingStore{model.Store}, func() { provide(t, honest, cids) })
	provide(t, liar, cids)

	var progress progressLog
	fetchAll(t, fetcher, cids, store, FetchOptions{Providers: 1, Progress: progress.add})
	checkStored(t, store, cids)
	if asked.Load() != 1 {
		t.Errorf("liar asked %d times, want once (then banned)", asked.Load())
	}
	if log := fetcherLog.String(); !bytes.Contains([]byte(log), []byte("banned")) || !bytes.Contains([]byte(log), []byte(liar.ID().String())) {
		t.Errorf("no ban of the liar logged:\n%s", log)
	}
	for _, r := range progress.all() {
		if r.Stored && r.Peer != honest.ID() {
			t.Errorf("block %s stored from %s, not the honest provider", r.CID, r.Peer)
		}
	}
}

// stallAfter serves the first half of any block and then stalls until the
// test lets go of it (after killing m); it signals on sent once the half is
// written.
func stallAfter(m *Mesh, store shards.Store, sent chan<- int64, hold <-chan struct{}) {
	m.Host().SetStreamHandler(BlocksProtocol, func(s network.Stream) {
		defer s.Close()
		frame, err := readFrame(s, maxBlockRequestBytes)
		if err != nil {
			s.Reset()
			return
		}
		var req blockRequest
		json.Unmarshal(frame, &req)
		c, _ := shards.ParseCID(req.CID)
		data, err := store.Get(c)
		if err != nil {
			s.Write([]byte{blockNotFound})
			return
		}
		hdr := binary.AppendUvarint([]byte{blockOK}, uint64(len(data)))
		half := int64(len(data)) / 2
		s.Write(append(hdr, data[:half]...))
		sent <- half
		<-hold
		s.Reset()
	})
}

func TestFetchBlocksResumes(t *testing.T) {
	model, cids := blockModel(t, build.GPTConfig{Layers: 4, Dim: 64, Heads: 2, Context: 64, Seed: 1})
	// The largest block.
	var want cid.Cid
	size := 0
	for _, c := range cids {
		if data, _ := model.Store.Get(c); len(data) > size {
			want, size = c, len(data)
		}
	}
	victim := blockNode(t, model.Store, nil)
	good := blockNode(t, model.Store, nil, victim)
	store, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fetcher := blockNode(t, store, nil, victim, good)
	waitRouting(t, victim, good, fetcher)
	sent := make(chan int64, 1)
	hold := make(chan struct{})
	var letGo sync.Once
	t.Cleanup(func() { letGo.Do(func() { close(hold) }) })
	stallAfter(victim, model.Store, sent, hold)
	provide(t, victim, cids)

	var progress progressLog
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		done <- fetcher.FetchBlocks(ctx, []cid.Cid{want}, store, FetchOptions{Progress: progress.add})
	}()
	var half int64
	select {
	case half = <-sent:
	case err := <-done:
		t.Fatalf("fetch ended before the victim sent anything: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the victim was never asked")
	}
	// The block now has another provider; the victim dies mid-block.
	provide(t, good, cids)
	victim.Kill()
	letGo.Do(func() { close(hold) })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	checkStored(t, store, []cid.Cid{want})
	resumed := false
	for _, r := range progress.all() {
		if r.Peer == victim.ID() && r.Done > half {
			t.Errorf("progress from the victim beyond the half it sent: %+v", r)
		}
		if r.Peer == good.ID() && !r.Stored {
			if r.Offset != half {
				t.Errorf("good provider's part began at %d, want %d (a resume)", r.Offset, half)
			}
			resumed = true
		}
	}
	if !resumed {
		t.Error("no bytes from the good provider")
	}
}

func TestFetchBlocksBusy(t *testing.T) {
	model, cids := blockModel(t, build.GPTConfig{Layers: 4, Dim: 64, Heads: 2, Context: 64, Seed: 1})
	full := blockNode(t, nil, nil)
	free := blockNode(t, model.Store, nil, full)
	store, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fetcher := blockNode(t, store, nil, full, free)
	waitRouting(t, full, free, fetcher)
	srv, asked := serveWith(full, model.Store, func() { provide(t, free, cids) })
	for range MaxUploads {
		srv.slots <- struct{}{} // at the upload limit
	}
	provide(t, full, cids)

	// Only the full node provides at first; the free one provides as the
	// full one gets its first request.
	var progress progressLog
	fetchAll(t, fetcher, cids, store, FetchOptions{Progress: progress.add})
	checkStored(t, store, cids)

	// The full node answers busy at once.
	f := &fetch{m: fetcher, store: store, banned: map[peer.ID]bool{}, active: map[peer.ID]int{}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err = f.from(ctx, addrInfo(full), &blockFetch{c: cids[0], total: -1, from: map[peer.ID]bool{}})
	if !errors.Is(err, errBlockBusy) {
		t.Fatalf("full provider: %v, want busy", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("busy answer took %s", d)
	}
	if asked.Load() < 2 {
		t.Errorf("full provider asked %d times", asked.Load())
	}
	for _, r := range progress.all() {
		if r.Peer != free.ID() {
			t.Errorf("bytes from %s, not the free provider", r.Peer)
		}
	}
}

func TestBlockServerBadRequests(t *testing.T) {
	model, cids := blockModel(t, build.GPTConfig{Layers: 1, Dim: 32, Heads: 2, Context: 16, Seed: 1})
	srv := blockNode(t, model.Store, nil)
	cl := blockNode(t, nil, nil, srv)
	for _, tc := range []struct {
		name string
		req  string
		want byte
	}{
		{"not json", "hello", blockBadRequest},
		{"bad cid", `{"cid":"nope"}`, blockBadRequest},
		{"negative offset", fmt.Sprintf(`{"cid":%q,"offset":-1}`, cids[0]), blockBadRequest},
		{"offset past end", fmt.Sprintf(`{"cid":%q,"offset":1000000000}`, cids[0]), blockBadRequest},
		{"unknown", fmt.Sprintf(`{"cid":%q}`, shards.BlockCID([]byte("nobody"))), blockNotFound},
		{"ok", fmt.Sprintf(`{"cid":%q}`, cids[0]), blockOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s, err := cl.Host().NewStream(ctx, srv.ID(), BlocksProtocol)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			s.SetDeadline(time.Now().Add(5 * time.Second))
			if err := writeFrame(s, []byte(tc.req)); err != nil {
				t.Fatal(err)
			}
			s.CloseWrite()
			resp, err := io.ReadAll(s)
			if err != nil {
				t.Fatal(err)
			}
			if len(resp) == 0 || resp[0] != tc.want {
				t.Fatalf("response %x, want status %d", resp[:min(len(resp), 8)], tc.want)
			}
			if tc.want == blockOK {
				data, _ := model.Store.Get(cids[0])
				total, n := binary.Uvarint(resp[1:])
				if total != uint64(len(data)) || !bytes.Equal(resp[1+n:], data) {
					t.Fatalf("got %d bytes announcing %d, want %d", len(resp)-1-n, total, len(data))
				}
			}
		})
	}
}

// BenchmarkFetch100MB fetches a ~98 MB model (GPT, 8 layers, dim 512: 10
// blocks and a manifest) into an empty store from 1 and from 3 providers on
// loopback, and moves the same bytes over raw quic-go streams in the same
// run, as the baseline. Compare MB/s. The FileStore runs write each block
// to disk and fsync it; the memstore runs verify and keep it in memory,
// measuring the protocol alone.
//
// go test -run '^$' -bench Fetch100MB -benchtime 3x ./mesh/
func BenchmarkFetch100MB(b *testing.B) {
	model, cids := blockModel(b, build.GPTConfig{Layers: 8, Dim: 512, Seed: 1})
	var total int64
	for _, c := range cids {
		data, err := model.Store.Get(c)
		if err != nil {
			b.Fatal(err)
		}
		total += int64(len(data))
	}
	for _, tc := range []struct {
		n    int
		disk bool
	}{{1, true}, {3, true}, {1, false}, {3, false}} {
		name := fmt.Sprintf("mesh-%d-providers", tc.n)
		if !tc.disk {
			name += "-memstore"
		}
		n := tc.n
		b.Run(name, func(b *testing.B) {
			var provs []*Mesh
			for i := range n {
				provs = append(provs, blockNode(b, model.Store, nil, provs[:i]...))
			}
			fetcher := blockNode(b, nil, nil, provs...)
			waitRouting(b, append(provs, fetcher)...)
			for _, p := range provs {
				provide(b, p, cids)
			}
			b.SetBytes(total)
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				var store shards.Store = newMemStore()
				if tc.disk {
					fs, err := shards.OpenFileStore(b.TempDir())
					if err != nil {
						b.Fatal(err)
					}
					store = fs
				}
				b.StartTimer()
				fetchAll(b, fetcher, cids, store, FetchOptions{Providers: 3})
			}
		})
	}
	b.Run("raw-quic-go", func(b *testing.B) {
		blocks := make([][]byte, len(cids))
		for i, c := range cids {
			blocks[i], _ = model.Store.Get(c)
		}
		ln, err := quic.ListenAddr("127.0.0.1:0", benchTLS(), nil)
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			for {
				s, err := c.AcceptStream(context.Background())
				if err != nil {
					return
				}
				go func() {
					var i [1]byte
					if _, err := io.ReadFull(s, i[:]); err != nil {
						return
					}
					s.Write(blocks[i[0]])
					s.Close()
				}()
			}
		}()
		conn, err := quic.DialAddr(context.Background(), ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"bench"}}, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.CloseWithError(0, "")
		b.SetBytes(total)
		b.ReportAllocs()
		for b.Loop() {
			// One stream per block, one block at a time, read into memory:
			// the bytes the mesh fetch moves, without lookup, hashing or disk.
			for i := range blocks {
				s, err := conn.OpenStreamSync(context.Background())
				if err != nil {
					b.Fatal(err)
				}
				s.Write([]byte{byte(i)})
				s.Close()
				data, err := io.ReadAll(s)
				if err != nil || len(data) != len(blocks[i]) {
					b.Fatalf("block %d: %d bytes, %v", i, len(data), err)
				}
			}
		}
	})
}

// memStore is an in-memory Store that verifies what it is given, for the
// benchmark.
type memStore struct {
	shards.Store // unused methods
	mu           sync.Mutex
	blocks       map[cid.Cid][]byte
}

func newMemStore() *memStore { return &memStore{blocks: map[cid.Cid][]byte{}} }

func (s *memStore) Has(c cid.Cid) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.blocks[c]
	return ok, nil
}

func (s *memStore) Add(c cid.Cid, r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if got := shards.BlockCID(data); c.Prefix().Codec == shards.CodecBlock && !got.Equals(c) {
		return shards.ErrCorrupt
	} else if got := shards.ManifestCID(data); c.Prefix().Codec == shards.CodecManifest && !got.Equals(c) {
		return shards.ErrCorrupt
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.blocks[c] = data
	return nil
}
