package mesh

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

var quietLog = slog.New(slog.DiscardHandler)

// TestCoordinatesPredictRTT is acceptance 5 of issue 3: ten real libp2p
// QUIC hosts over a simulated packet network with injected pairwise
// latencies run the coord protocol; their coordinates must predict every
// pairwise RTT within 25% median relative error. The truth is a plane
// (positions up to 150 ms apart) plus a per-node access height (2-20 ms),
// RTT(a, b) = (|pa - pb| + ha + hb) * (a fixed factor per pair in 0.9-1.1),
// half of it each way plus up to 1 ms of jitter per packet. It runs in a
// synctest bubble, on virtual time.
func TestCoordinatesPredictRTT(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const (
			n      = 10
			every  = 2 * time.Second  // between rounds (virtual)
			runFor = 60 * time.Second // virtual: ~30 rounds of 9 observations per node
		)
		rng := rand.New(rand.NewPCG(20260501, 3))
		type point struct{ x, y, h float64 } // milliseconds
		pts := make([]point, n)
		for i := range pts {
			pts[i] = point{x: rng.Float64() * 150, y: rng.Float64() * 150, h: 2 + rng.Float64()*18}
		}
		// Real paths are not quite a metric space: each pair's RTT is off
		// the model by up to ±10%, symmetric and fixed.
		var distort [n][n]float64
		for i := range n {
			for j := i + 1; j < n; j++ {
				distort[i][j] = 0.9 + 0.2*rng.Float64()
				distort[j][i] = distort[i][j]
			}
		}
		truth := func(i, j int) time.Duration {
			a, b := pts[i], pts[j]
			ms := (math.Hypot(a.x-b.x, a.y-b.y) + a.h + b.h) * distort[i][j]
			return time.Duration(ms * float64(time.Millisecond))
		}
		// And every packet takes up to 1 ms more (queues).
		var jmu sync.Mutex
		jitter := rand.New(rand.NewPCG(7, 11))
		hosts := simnetHosts(t, n, func(from, to int) time.Duration {
			jmu.Lock()
			defer jmu.Unlock()
			return truth(from, to)/2 + time.Duration(jitter.Int64N(int64(time.Millisecond)))
		})
		ctx := t.Context()
		for i := range hosts {
			for j := i + 1; j < n; j++ {
				if err := hosts[i].Connect(ctx, peer.AddrInfo{ID: hosts[j].ID(), Addrs: hosts[j].Addrs()}); err != nil {
					t.Fatalf("connect %d -> %d: %v", i, j, err)
				}
			}
		}
		coords := make([]*Coordinates, n)
		for i, h := range hosts {
			c, err := NewCoordinates(h, CoordConfig{Logger: quietLog})
			if err != nil {
				t.Fatal(err)
			}
			coords[i] = c
		}
		ids := make([]peer.ID, n)
		for i, h := range hosts {
			ids[i] = h.ID()
		}
		start := time.Now()
		runCtx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		for _, c := range coords {
			wg.Go(func() { c.Run(runCtx, func() []peer.ID { return ids }, every) })
		}
		errs := func() []float64 {
			var rel []float64
			for i := range n {
				for j := i + 1; j < n; j++ {
					est := EstimateRTT(coords[i].Self(), coords[j].Self())
					tr := truth(i, j)
					rel = append(rel, math.Abs(float64(est-tr))/float64(tr))
				}
			}
			slices.Sort(rel)
			return rel
		}
		for elapsed := time.Duration(0); elapsed < runFor; elapsed += runFor / 6 {
			time.Sleep(runFor / 6)
			rel := errs()
			t.Logf("after %3.0fs: median relative error %.1f%%, p90 %.1f%%", time.Since(start).Seconds(),
				100*sortedQuantile(rel, 0.5), 100*sortedQuantile(rel, 0.9))
		}
		// Close stops a Run loop by itself; the context stops the rest.
		if err := coords[0].Close(); err != nil {
			t.Fatal(err)
		}
		stop()
		wg.Wait()

		// The measured RTTs are the injected ones: stream opening and
		// negotiation stay out of the timed exchanges.
		for i := 1; i < n; i++ {
			pc, ok := coords[i].Observed(ids[0])
			if !ok {
				t.Fatalf("node %d has no observation of node 0", i)
			}
			if tr := truth(i, 0); pc.RTT < tr || pc.RTT > tr+2*time.Millisecond+tr/50 {
				t.Errorf("node %d measured %v to node 0, injected %v", i, pc.RTT, tr)
			}
		}

		rel := errs()
		med, p90 := sortedQuantile(rel, 0.5), sortedQuantile(rel, 0.9)
		t.Logf("%d pairs: median relative error %.1f%%, p90 %.1f%%, max %.1f%%", len(rel), 100*med, 100*p90, 100*rel[len(rel)-1])
		if med > 0.25 {
			t.Errorf("median relative error %.1f%% over 25%%", 100*med)
		}
		for _, c := range coords {
			if err := c.Close(); err != nil {
				t.Error(err)
			}
		}
	})
}

func sortedQuantile(sorted []float64, q float64) float64 {
	return sorted[int(math.Round(q*float64(len(sorted)-1)))]
}

// loopbackHost starts a real libp2p host listening on QUIC on loopback only.
func loopbackHost(t testing.TB) host.Host {
	t.Helper()
	h, err := libp2p.New(
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/udp/0/quic-v1"),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

func connectPair(t testing.TB, a, b host.Host) {
	t.Helper()
	if err := a.Connect(t.Context(), peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()}); err != nil {
		t.Fatal(err)
	}
}

func newCoords(t testing.TB, h host.Host, cfg CoordConfig) *Coordinates {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLog
	}
	c, err := NewCoordinates(h, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestObserveLoopback observes a peer over real QUIC on loopback.
func TestObserveLoopback(t *testing.T) {
	a, b := loopbackHost(t), loopbackHost(t)
	connectPair(t, a, b)
	ca, cb := newCoords(t, a, CoordConfig{}), newCoords(t, b, CoordConfig{})
	before := ca.Self()
	for range 3 {
		rtt, err := ca.Observe(t.Context(), b.ID())
		if err != nil {
			t.Fatal(err)
		}
		if rtt <= 0 || rtt > 50*time.Millisecond {
			t.Fatalf("loopback RTT %v", rtt)
		}
		t.Logf("loopback RTT %v", rtt)
	}
	if slices.Equal(before.Vec, ca.Self().Vec) {
		t.Error("coordinate did not move")
	}
	pc, ok := ca.Observed(b.ID())
	if !ok || !slices.Equal(pc.Coord.Vec, cb.Self().Vec) {
		t.Errorf("observed %v %v, peer is at %v", pc, ok, cb.Self())
	}
	if got := a.Peerstore().LatencyEWMA(b.ID()); got <= 0 {
		t.Errorf("peerstore latency %v", got)
	}
	if _, err := ca.Observe(t.Context(), a.ID()); err == nil {
		t.Error("observed self")
	}
}

// TestObserveBadPeer has a peer answer the coord protocol wrongly in every
// way; each Observe fails quickly, and our coordinate stays as it was.
func TestObserveBadPeer(t *testing.T) {
	a, b := loopbackHost(t), loopbackHost(t)
	connectPair(t, a, b)
	ca := newCoords(t, a, CoordConfig{Timeout: 300 * time.Millisecond})
	good, err := EncodeCoordinate(protocol.Coordinate{Vec: make([]float64, 8), Error: 1.5, Height: 1e-5})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		answer func(s network.Stream) // after reading each request
	}{
		{"nan", func(s network.Stream) { s.Write(rawCoord(8, math.NaN())) }},
		{"inf", func(s network.Stream) { s.Write(rawCoord(8, math.Inf(1))) }},
		{"huge", func(s network.Stream) { s.Write(rawCoord(8, 1e300)) }},
		{"negative height", func(s network.Stream) {
			b := rawCoord(8, 0)
			binary.LittleEndian.PutUint64(b[len(b)-8:], math.Float64bits(-1))
			s.Write(b)
		}},
		{"wrong dimensionality", func(s network.Stream) { s.Write(rawCoord(3, 0.01)) }},
		{"oversized", func(s network.Stream) { s.Write(append([]byte{coordVersion, 255}, make([]byte, 1<<16)...)) }},
		{"wrong version", func(s network.Stream) { s.Write(append([]byte{2}, good[1:]...)) }},
		{"truncated", func(s network.Stream) { s.Write(good[:20]); s.CloseWrite() }},
		{"garbage", func(s network.Stream) { s.Write(bytes.Repeat([]byte{0xff}, 300)) }},
		{"reset", func(s network.Stream) { s.Reset() }},
		{"silent", func(s network.Stream) { time.Sleep(time.Second) }},
		{"good then nan", func(s network.Stream) {
			s.Write(good)
			io.ReadFull(s, make([]byte, 1))
			s.Write(rawCoord(8, math.NaN()))
		}},
		{"slow trickle", func(s network.Stream) {
			for _, c := range good {
				s.Write([]byte{c})
				time.Sleep(10 * time.Millisecond)
			}
		}},
	}
	before := ca.Self()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b.SetStreamHandler(CoordProtocol, func(s network.Stream) {
				defer s.Close()
				for {
					if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
						return
					}
					tt.answer(s)
				}
			})
			start := time.Now()
			rtt, err := ca.Observe(t.Context(), b.ID())
			if err == nil {
				t.Fatalf("observe succeeded with RTT %v", rtt)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("observe took %v", d)
			}
			t.Logf("%v", err)
			if got := ca.Self(); !slices.Equal(got.Vec, before.Vec) || got.Height != before.Height || got.Error != before.Error {
				t.Fatalf("coordinate moved from %v to %v", before, got)
			}
		})
	}
}

// rawCoord encodes a response of d dimensions with every float set to f,
// bypassing the encoder's checks.
func rawCoord(d int, f float64) []byte {
	b := []byte{coordVersion, byte(d)}
	for range d + 3 {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(f))
	}
	return b
}

// TestCoordHandlerBounds talks to the responder by hand: it answers one
// coordinate per request up to MaxCoordExchanges, then closes, and resets
// a stream whose request has an unknown version.
func TestCoordHandlerBounds(t *testing.T) {
	a, b := loopbackHost(t), loopbackHost(t)
	connectPair(t, a, b)
	cb := newCoords(t, b, CoordConfig{})

	s, err := a.NewStream(t.Context(), b.ID(), CoordProtocol)
	if err != nil {
		t.Fatal(err)
	}
	s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.Write(bytes.Repeat([]byte{coordVersion}, 3*MaxCoordExchanges)); err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	one := 2 + 8*(8+3)
	if len(all) != MaxCoordExchanges*one {
		t.Fatalf("read %d bytes, want %d answers of %d", len(all), MaxCoordExchanges, one)
	}
	for i := range MaxCoordExchanges {
		c, err := DecodeCoordinate(all[i*one : (i+1)*one])
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(c.Vec, cb.Self().Vec) {
			t.Fatalf("answer %d: %v, want %v", i, c, cb.Self())
		}
	}
	s.Close()

	s, err = a.NewStream(t.Context(), b.ID(), CoordProtocol)
	if err != nil {
		t.Fatal(err)
	}
	s.SetDeadline(time.Now().Add(5 * time.Second))
	s.Write([]byte{7})
	if n, err := io.ReadAll(s); err == nil {
		t.Fatalf("bad request answered %d bytes and a clean close", len(n))
	}

	// Once closed, the protocol is gone and Observe refuses.
	if err := cb.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := cb.Observe(t.Context(), a.ID()); !errors.Is(err, ErrCoordinatesClosed) {
		t.Errorf("observe after close: %v", err)
	}
	ca := newCoords(t, a, CoordConfig{Timeout: time.Second})
	if _, err := ca.Observe(t.Context(), b.ID()); err == nil {
		t.Error("observed a closed Coordinates")
	}
}

func TestCoordinateCodec(t *testing.T) {
	c := protocol.Coordinate{Vec: []float64{1, -0.5}, Error: 0.25, Adjustment: 0, Height: 0.5}
	golden := "01" + "02" +
		"000000000000f03f" + // vec[0] 1
		"000000000000e0bf" + // vec[1] -0.5
		"000000000000d03f" + // error 0.25
		"0000000000000000" + // adjustment 0
		"000000000000e03f" // height 0.5
	b, err := EncodeCoordinate(c)
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(b); got != golden {
		t.Fatalf("encoded %s, want %s", got, golden)
	}
	back, err := DecodeCoordinate(b)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(back.Vec, c.Vec) || back.Error != c.Error || back.Adjustment != c.Adjustment || back.Height != c.Height {
		t.Fatalf("decoded %v, want %v", back, c)
	}
	if max := rawCoord(MaxCoordDimensions, 0.001); len(max) != MaxCoordBytes {
		t.Fatalf("largest response %d bytes, MaxCoordBytes %d", len(max), MaxCoordBytes)
	} else if _, err := DecodeCoordinate(max); err != nil {
		t.Fatalf("largest response: %v", err)
	}

	withHeight := func(h float64) []byte {
		b := rawCoord(2, 0.01)
		binary.LittleEndian.PutUint64(b[len(b)-8:], math.Float64bits(h))
		return b
	}
	withError := func(e float64) []byte {
		b := rawCoord(2, 0.01)
		binary.LittleEndian.PutUint64(b[2+8*2:], math.Float64bits(e))
		return b
	}
	bad := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"header only", []byte{1, 2}},
		{"short", b[:len(b)-1]},
		{"trailing", append(append([]byte(nil), b...), 0)},
		{"version 0", append([]byte{0}, b[1:]...)},
		{"version 2", append([]byte{2}, b[1:]...)},
		{"zero dimensions", []byte{1, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
		{"too many dimensions", rawCoord(MaxCoordDimensions+1, 0)},
		{"255 dimensions", rawCoord(255, 0)},
		{"nan", rawCoord(2, math.NaN())},
		{"+inf", rawCoord(2, math.Inf(1))},
		{"-inf", rawCoord(2, math.Inf(-1))},
		{"huge", rawCoord(2, MaxCoordComponent*1.01)},
		{"negative height", withHeight(-1e-9)},
		{"nan height", withHeight(math.NaN())},
		{"negative error", withError(-0.1)},
		{"garbage", bytes.Repeat([]byte{0xa5}, 42)},
	}
	for _, tt := range bad {
		if c, err := DecodeCoordinate(tt.b); !errors.Is(err, ErrBadCoordinate) {
			t.Errorf("%s: decoded %v, %v", tt.name, c, err)
		}
	}
	for _, c := range []protocol.Coordinate{
		{},
		{Vec: []float64{math.NaN()}},
		{Vec: make([]float64, MaxCoordDimensions+1)},
		{Vec: []float64{0}, Height: math.Inf(1)},
	} {
		if _, err := EncodeCoordinate(c); !errors.Is(err, ErrBadCoordinate) {
			t.Errorf("encoded %v: %v", c, err)
		}
	}
}

func TestEstimateRTT(t *testing.T) {
	a := protocol.Coordinate{Vec: []float64{0, 0}, Height: 0.001}
	b := protocol.Coordinate{Vec: []float64{0.003, 0.004}, Height: 0.002}
	near := func(got, want time.Duration) bool { return (got - want).Abs() <= time.Microsecond }
	if got, want := EstimateRTT(a, b), 8*time.Millisecond; !near(got, want) || EstimateRTT(b, a) != got {
		t.Errorf("EstimateRTT = %v (back %v), want %v", got, EstimateRTT(b, a), want)
	}
	b.Adjustment = 0.001
	if got, want := EstimateRTT(a, b), 9*time.Millisecond; !near(got, want) {
		t.Errorf("with adjustment: %v, want %v", got, want)
	}
	for _, c := range []protocol.Coordinate{
		{},
		{Vec: []float64{0, 0, 0}},
		{Vec: []float64{math.NaN(), 0}},
		{Vec: []float64{0, 0}, Height: math.Inf(1)},
	} {
		if got := EstimateRTT(a, c); got != UnknownRTT {
			t.Errorf("EstimateRTT(%v, %v) = %v, want UnknownRTT", a, c, got)
		}
		if got := EstimateRTT(c, a); got != UnknownRTT {
			t.Errorf("EstimateRTT(%v, %v) = %v, want UnknownRTT", c, a, got)
		}
	}
}

func TestNewCoordinatesConfig(t *testing.T) {
	h := loopbackHost(t)
	c := newCoords(t, h, CoordConfig{Dimensionality: 3})
	if got := c.Self(); len(got.Vec) != 3 || ValidateCoordinate(got) != nil {
		t.Errorf("3-dimensional coordinate: %v", got)
	}
	if c := newCoords(t, h, CoordConfig{}); len(c.Self().Vec) != 8 {
		t.Errorf("default dimensionality %d, want serf's 8", len(c.Self().Vec))
	}
	for _, cfg := range []CoordConfig{
		{Dimensionality: MaxCoordDimensions + 1},
		{Pings: MaxCoordExchanges},
		{Pings: -1},
		{Timeout: -time.Second},
	} {
		if _, err := NewCoordinates(h, cfg); err == nil {
			t.Errorf("config %+v accepted", cfg)
		}
	}
}

func FuzzDecodeCoordinate(f *testing.F) {
	for _, c := range []protocol.Coordinate{
		{Vec: []float64{1, -0.5}, Error: 0.25, Height: 0.5},
		{Vec: make([]float64, 8), Error: 1.5, Height: 1e-5},
	} {
		b, err := EncodeCoordinate(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add(rawCoord(2, math.NaN()))
	f.Add([]byte{1, 255})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := DecodeCoordinate(b)
		if err != nil {
			if !errors.Is(err, ErrBadCoordinate) {
				t.Fatalf("error %v is not ErrBadCoordinate", err)
			}
			return
		}
		if err := ValidateCoordinate(c); err != nil {
			t.Fatalf("decoded an invalid coordinate: %v", err)
		}
		again, err := EncodeCoordinate(c)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoded %x, read %x", again, b)
		}
		// The stream reader agrees with the decoder.
		var buf [MaxCoordBytes]byte
		if r, err := readCoord(bytes.NewReader(b), buf[:]); err != nil || !slices.Equal(r.Vec, c.Vec) {
			t.Fatalf("readCoord: %v, %v", r, err)
		}
		if d := EstimateRTT(c, c); d < 0 {
			t.Fatalf("distance to itself %v", d)
		}
	})
}
