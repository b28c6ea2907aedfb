package mesh

// Network coordinates: each node keeps a Vivaldi coordinate
// (hashicorp/serf's coordinate package) and updates it from RTTs it measures
// to the peers it talks to, so that anyone holding two peers' coordinates
// can estimate the RTT between them without having measured it.
//
// # The coord protocol, /infermesh/coord/1.0.0
//
// The dialer opens a stream and runs up to MaxCoordExchanges sequential
// exchanges on it; the first is a warm-up (it carries the stream opening and
// protocol negotiation) and the following ones are timed. The dialer keeps the
// smallest timed RTT and the coordinate of the last answer.
//
//	request  (1 byte):   0x01                      version; anything else: the responder resets the stream
//	response (2+8(d+3)): 0x01                      version
//	                     d                         uint8, dimensionality, 1..MaxCoordDimensions
//	                     vec[0..d-1]               float64 each, IEEE 754 little-endian, seconds
//	                     error                     float64 LE, dimensionless, >= 0
//	                     adjustment                float64 LE, seconds
//	                     height                    float64 LE, seconds, >= 0
//
// A response is at most 2+8*(32+3) = 282 bytes. Every float must be finite
// and at most MaxCoordComponent in magnitude; a response that breaks any rule
// is refused and the stream reset, and the measurement is dropped. The
// dialer closes its side when done; the responder closes after the dialer's
// EOF or after MaxCoordExchanges answers. Both sides put a deadline on the
// stream (CoordTimeout).

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/hashicorp/serf/coordinate"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// Constants of the coord protocol.
const (
	// CoordProtocol is the stream protocol that answers a peer's coordinate.
	CoordProtocol = "/infermesh/coord/1.0.0"
	// CoordServiceName is the resource manager service of coord streams.
	CoordServiceName = "infermesh.coord"
	// coordVersion is the first byte of every request and response.
	coordVersion = 0x01
	// MaxCoordDimensions bounds the dimensionality of a coordinate on the
	// wire (serf's default is 8).
	MaxCoordDimensions = 32
	// MaxCoordBytes bounds a response: header plus MaxCoordDimensions+3
	// float64s.
	MaxCoordBytes = 2 + 8*(MaxCoordDimensions+3)
	// MaxCoordComponent bounds the magnitude of every float of a coordinate
	// (seconds for positions, height and adjustment). Real coordinates stay
	// well under a second; anything near this is a broken or hostile peer,
	// and refusing it keeps distances finite.
	MaxCoordComponent = 100.0
	// MaxCoordExchanges bounds the exchanges on one stream (warm-up
	// included).
	MaxCoordExchanges = 8
	// CoordTimeout is the default deadline of one observation (dialer) and
	// of one stream (responder).
	CoordTimeout = 10 * time.Second
	// DefaultCoordPings is the default number of timed exchanges per
	// observation, after the warm-up.
	DefaultCoordPings = 2
	// DefaultCoordConcurrency is the default number of peers Run observes
	// at once.
	DefaultCoordConcurrency = 8
	// DefaultCoordInterval is Run's default time between rounds.
	DefaultCoordInterval = 30 * time.Second
	// DefaultCoordMaxPeers is the default number of peers whose last
	// observation is remembered.
	DefaultCoordMaxPeers = 1024
	// UnknownRTT is what EstimateRTT returns for coordinates that cannot be
	// compared (missing, invalid, different dimensionality).
	UnknownRTT time.Duration = -1
)

// ErrBadCoordinate is returned for a coordinate that is malformed, out of
// bounds, or of the wrong dimensionality, whether it came from the wire or
// from a record.
var ErrBadCoordinate = errors.New("bad network coordinate")

// ErrCoordinatesClosed is returned by Observe after Close.
var ErrCoordinatesClosed = errors.New("coordinates closed")

// CoordConfig configures Coordinates. The zero value is serf's defaults
// (8 dimensions plus a height) with the defaults named below.
type CoordConfig struct {
	// Dimensionality of the coordinates, 1..MaxCoordDimensions. Zero means
	// Vivaldi's value, or serf's default (8). All peers of a mesh must agree.
	Dimensionality uint
	// Vivaldi tunes the algorithm; nil means coordinate.DefaultConfig().
	// It is copied.
	Vivaldi *coordinate.Config
	// Pings is the number of timed exchanges per observation after the
	// warm-up; the smallest RTT is kept. Zero means DefaultCoordPings; at
	// most MaxCoordExchanges-1.
	Pings int
	// Timeout bounds one observation and one answered stream. Zero means
	// CoordTimeout.
	Timeout time.Duration
	// Concurrency bounds the observations Run makes at once. Zero means
	// DefaultCoordConcurrency.
	Concurrency int
	// MaxPeers bounds how many peers' last observations are remembered
	// (Observed); the oldest is forgotten first. Zero means
	// DefaultCoordMaxPeers.
	MaxPeers int
	// Logger receives the subsystem's logs. Nil means slog.Default().
	Logger *slog.Logger
}

// PeerCoord is the last observation of one peer.
type PeerCoord struct {
	Coord protocol.Coordinate // the coordinate it answered
	RTT   time.Duration       // the RTT measured
	At    time.Time           // when
}

// Coordinates keeps this node's network coordinate, answers the coord
// protocol, and measures peers. It is safe for concurrent use.
type Coordinates struct {
	h       host.Host
	client  *coordinate.Client
	dims    int
	pings   int
	timeout time.Duration
	conc    int
	maxPeer int
	log     *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // Run loops
	peers  map[peer.ID]PeerCoord
}

// NewCoordinates starts a coordinate at the origin and registers the
// CoordProtocol handler on h.
func NewCoordinates(h host.Host, cfg CoordConfig) (*Coordinates, error) {
	vc := coordinate.DefaultConfig()
	if cfg.Vivaldi != nil {
		c := *cfg.Vivaldi
		vc = &c
	}
	if cfg.Dimensionality != 0 {
		vc.Dimensionality = cfg.Dimensionality
	}
	if vc.Dimensionality < 1 || vc.Dimensionality > MaxCoordDimensions {
		return nil, fmt.Errorf("coordinates: dimensionality %d not in 1..%d", vc.Dimensionality, MaxCoordDimensions)
	}
	if cfg.Pings == 0 {
		cfg.Pings = DefaultCoordPings
	}
	if cfg.Pings < 1 || cfg.Pings > MaxCoordExchanges-1 {
		return nil, fmt.Errorf("coordinates: %d pings not in 1..%d", cfg.Pings, MaxCoordExchanges-1)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = CoordTimeout
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = DefaultCoordConcurrency
	}
	if cfg.MaxPeers == 0 {
		cfg.MaxPeers = DefaultCoordMaxPeers
	}
	if cfg.Timeout < 0 || cfg.Concurrency < 0 || cfg.MaxPeers < 0 {
		return nil, errors.New("coordinates: negative timeout, concurrency or max peers")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	client, err := coordinate.NewClient(vc)
	if err != nil {
		return nil, fmt.Errorf("coordinates: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Coordinates{
		h:       h,
		client:  client,
		dims:    int(vc.Dimensionality),
		pings:   cfg.Pings,
		timeout: cfg.Timeout,
		conc:    cfg.Concurrency,
		maxPeer: cfg.MaxPeers,
		log:     cfg.Logger,
		ctx:     ctx,
		cancel:  cancel,
		peers:   make(map[peer.ID]PeerCoord),
	}
	h.SetStreamHandler(CoordProtocol, c.handle)
	return c, nil
}

// Self returns this node's current coordinate (a copy).
func (c *Coordinates) Self() protocol.Coordinate {
	return fromSerf(c.client.GetCoordinate())
}

// Observed returns the last observation of p, if it is remembered.
func (c *Coordinates) Observed(p peer.ID) (PeerCoord, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pc, ok := c.peers[p]
	if ok {
		pc.Coord = cloneCoord(pc.Coord)
	}
	return pc, ok
}

// Observe measures the RTT to p over the coord protocol, updates this node's
// coordinate with it and p's answered coordinate, and returns the RTT. It
// blocks for a few RTTs, at most the configured timeout. A peer that answers
// a bad coordinate leaves ours untouched.
func (c *Coordinates) Observe(ctx context.Context, p peer.ID) (time.Duration, error) {
	if p == c.h.ID() {
		return 0, errors.New("coordinates: cannot observe self")
	}
	if c.ctx.Err() != nil {
		return 0, ErrCoordinatesClosed
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	stop := context.AfterFunc(c.ctx, cancel)
	defer stop()

	rtt, other, err := c.measure(ctx, p)
	if err != nil {
		return 0, fmt.Errorf("coordinates: observe %s: %w", p, err)
	}
	if err := checkCoord(other, c.dims); err != nil {
		return 0, fmt.Errorf("coordinates: observe %s: %w", p, err)
	}
	if _, err := c.client.Update(p.String(), toSerf(other), rtt); err != nil {
		return 0, fmt.Errorf("coordinates: observe %s: %w", p, err)
	}
	c.h.Peerstore().RecordLatency(p, rtt)
	c.remember(p, PeerCoord{Coord: other, RTT: rtt, At: time.Now()})
	return rtt, nil
}

// measure runs one warm-up and c.pings timed exchanges on a new stream.
func (c *Coordinates) measure(ctx context.Context, p peer.ID) (time.Duration, protocol.Coordinate, error) {
	s, err := c.h.NewStream(ctx, p, CoordProtocol)
	if err != nil {
		return 0, protocol.Coordinate{}, err
	}
	if err := s.Scope().SetService(CoordServiceName); err != nil {
		s.Reset()
		return 0, protocol.Coordinate{}, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	// Unblock reads and writes at once when ctx is cancelled early.
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	defer stop()

	req := []byte{coordVersion}
	var buf [MaxCoordBytes]byte
	var other protocol.Coordinate
	best := time.Duration(math.MaxInt64)
	for i := 0; i <= c.pings; i++ {
		start := time.Now()
		if _, err := s.Write(req); err != nil {
			s.Reset()
			return 0, other, err
		}
		other, err = readCoord(s, buf[:])
		if err != nil {
			s.Reset()
			return 0, other, err
		}
		if rtt := time.Since(start); i > 0 && rtt < best {
			best = rtt
		}
	}
	_ = s.Close() // the measurement is done; a failed close costs nothing here
	return best, other, nil
}

// remember records p's last observation, forgetting the oldest beyond
// maxPeer (in both this map and serf's latency filter).
func (c *Coordinates) remember(p peer.ID, pc PeerCoord) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.peers[p] = pc
	for len(c.peers) > c.maxPeer {
		var oldest peer.ID
		var at time.Time
		for id, e := range c.peers {
			if oldest == "" || e.At.Before(at) {
				oldest, at = id, e.At
			}
		}
		delete(c.peers, oldest)
		c.client.ForgetNode(oldest.String())
	}
}

// Forget drops what is remembered of p (call it when a peer leaves).
func (c *Coordinates) Forget(p peer.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.peers, p)
	c.client.ForgetNode(p.String())
}

// handle answers one coord stream: one coordinate per request byte, up to
// MaxCoordExchanges, within the timeout.
func (c *Coordinates) handle(s network.Stream) {
	if err := s.Scope().SetService(CoordServiceName); err != nil {
		s.Reset()
		return
	}
	_ = s.SetDeadline(time.Now().Add(c.timeout))
	var req [1]byte
	for range MaxCoordExchanges {
		if _, err := io.ReadFull(s, req[:]); err != nil {
			if errors.Is(err, io.EOF) {
				_ = s.Close()
			} else {
				s.Reset()
			}
			return
		}
		if req[0] != coordVersion {
			c.log.Debug("coord: bad request", "peer", s.Conn().RemotePeer(), "version", req[0])
			s.Reset()
			return
		}
		b, err := EncodeCoordinate(c.Self())
		if err != nil { // cannot happen: serf resets invalid coordinates
			c.log.Error("coord: encode own coordinate", "err", err)
			s.Reset()
			return
		}
		if _, err := s.Write(b); err != nil {
			s.Reset()
			return
		}
	}
	_ = s.Close()
}

// Run observes every peer that peers returns, once per round, with at most
// the configured concurrency and a random delay before each observation;
// rounds start every interval, jittered by ±50% (every <= 0 means
// DefaultCoordInterval). The first round starts at once. It blocks until
// ctx is done or Close is called. Failed observations are logged at debug
// level and retried the next round.
func (c *Coordinates) Run(ctx context.Context, peers func() []peer.ID, every time.Duration) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.wg.Add(1)
	c.mu.Unlock()
	defer c.wg.Done()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(c.ctx, cancel)
	defer stop()
	if every <= 0 {
		every = DefaultCoordInterval
	}
	for {
		c.round(ctx, peers(), every)
		t := time.NewTimer(every/2 + rand.N(every))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// round observes each of ps once, in random order.
func (c *Coordinates) round(ctx context.Context, ps []peer.ID, every time.Duration) {
	ps = append([]peer.ID(nil), ps...)
	rand.Shuffle(len(ps), func(i, j int) { ps[i], ps[j] = ps[j], ps[i] })
	jitter := min(every/10, time.Second)
	sem := make(chan struct{}, c.conc)
	var wg sync.WaitGroup
	seen := make(map[peer.ID]bool, len(ps))
	var ok, failed int
	var mu sync.Mutex
	for _, p := range ps {
		if p == c.h.ID() || seen[p] {
			continue
		}
		seen[p] = true
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			if jitter > 0 {
				t := time.NewTimer(rand.N(jitter))
				select {
				case <-ctx.Done():
					t.Stop()
					return
				case <-t.C:
				}
			}
			rtt, err := c.Observe(ctx, p)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				if ctx.Err() == nil {
					c.log.Debug("coord: observe failed", "peer", p, "err", err)
				}
				return
			}
			ok++
			c.log.Debug("coord: observed", "peer", p, "rtt", rtt)
		})
	}
	wg.Wait()
	if ctx.Err() == nil {
		c.log.Debug("coord: round done", "observed", ok, "failed", failed, "coord", c.Self())
	}
}

// Close removes the stream handler, stops Run loops and in-flight
// observations, and waits for the Run loops to return.
func (c *Coordinates) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.h.RemoveStreamHandler(CoordProtocol)
	c.cancel()
	c.wg.Wait()
	return nil
}

// EstimateRTT estimates the RTT between the holders of two coordinates
// (serf's DistanceTo, adjustments included). It returns UnknownRTT when
// either coordinate is invalid or their dimensionalities differ.
func EstimateRTT(a, b protocol.Coordinate) time.Duration {
	if checkCoord(a, len(a.Vec)) != nil || checkCoord(b, len(a.Vec)) != nil {
		return UnknownRTT
	}
	return toSerf(a).DistanceTo(toSerf(b))
}

// ValidateCoordinate reports whether c is a well-formed coordinate:
// 1..MaxCoordDimensions dimensions, all floats finite and within
// MaxCoordComponent, error and height not negative.
func ValidateCoordinate(c protocol.Coordinate) error {
	return checkCoord(c, len(c.Vec))
}

func checkCoord(c protocol.Coordinate, dims int) error {
	if len(c.Vec) != dims {
		return fmt.Errorf("%w: %d dimensions, want %d", ErrBadCoordinate, len(c.Vec), dims)
	}
	if dims < 1 || dims > MaxCoordDimensions {
		return fmt.Errorf("%w: %d dimensions not in 1..%d", ErrBadCoordinate, dims, MaxCoordDimensions)
	}
	bad := func(f float64) bool { return math.IsNaN(f) || math.Abs(f) > MaxCoordComponent }
	for _, f := range c.Vec {
		if bad(f) {
			return fmt.Errorf("%w: position component %v", ErrBadCoordinate, f)
		}
	}
	if bad(c.Error) || c.Error < 0 {
		return fmt.Errorf("%w: error %v", ErrBadCoordinate, c.Error)
	}
	if bad(c.Adjustment) {
		return fmt.Errorf("%w: adjustment %v", ErrBadCoordinate, c.Adjustment)
	}
	if bad(c.Height) || c.Height < 0 {
		return fmt.Errorf("%w: height %v", ErrBadCoordinate, c.Height)
	}
	return nil
}

// EncodeCoordinate encodes a coord protocol response (see the file
// comment for the layout).
func EncodeCoordinate(c protocol.Coordinate) ([]byte, error) {
	if err := ValidateCoordinate(c); err != nil {
		return nil, err
	}
	b := make([]byte, 2, 2+8*(len(c.Vec)+3))
	b[0], b[1] = coordVersion, byte(len(c.Vec))
	for _, f := range c.Vec {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(f))
	}
	for _, f := range [...]float64{c.Error, c.Adjustment, c.Height} {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(f))
	}
	return b, nil
}

// DecodeCoordinate decodes a coord protocol response, which must be
// complete with nothing after it, and validates it.
func DecodeCoordinate(b []byte) (protocol.Coordinate, error) {
	n, err := coordLen(b)
	if err != nil {
		return protocol.Coordinate{}, err
	}
	if len(b) != n {
		return protocol.Coordinate{}, fmt.Errorf("%w: %d bytes, want %d", ErrBadCoordinate, len(b), n)
	}
	return parseCoord(b)
}

// readCoord reads one response from r into buf (MaxCoordBytes long): the
// header first, then exactly the floats it announces.
func readCoord(r io.Reader, buf []byte) (protocol.Coordinate, error) {
	if _, err := io.ReadFull(r, buf[:2]); err != nil {
		return protocol.Coordinate{}, err
	}
	n, err := coordLen(buf[:2])
	if err != nil {
		return protocol.Coordinate{}, err
	}
	if _, err := io.ReadFull(r, buf[2:n]); err != nil {
		return protocol.Coordinate{}, err
	}
	return parseCoord(buf[:n])
}

// coordLen checks a response header and returns the response's length.
func coordLen(b []byte) (int, error) {
	if len(b) < 2 {
		return 0, fmt.Errorf("%w: %d bytes, short header", ErrBadCoordinate, len(b))
	}
	if b[0] != coordVersion {
		return 0, fmt.Errorf("%w: version %d", ErrBadCoordinate, b[0])
	}
	d := int(b[1])
	if d < 1 || d > MaxCoordDimensions {
		return 0, fmt.Errorf("%w: %d dimensions not in 1..%d", ErrBadCoordinate, d, MaxCoordDimensions)
	}
	return 2 + 8*(d+3), nil
}

// parseCoord decodes a response whose length coordLen checked.
func parseCoord(b []byte) (protocol.Coordinate, error) {
	d := int(b[1])
	f := func(i int) float64 { return math.Float64frombits(binary.LittleEndian.Uint64(b[2+8*i:])) }
	c := protocol.Coordinate{Vec: make([]float64, d)}
	for i := range d {
		c.Vec[i] = f(i)
	}
	c.Error, c.Adjustment, c.Height = f(d), f(d+1), f(d+2)
	if err := ValidateCoordinate(c); err != nil {
		return protocol.Coordinate{}, err
	}
	return c, nil
}

func toSerf(c protocol.Coordinate) *coordinate.Coordinate {
	return &coordinate.Coordinate{
		Vec:        append([]float64(nil), c.Vec...),
		Error:      c.Error,
		Adjustment: c.Adjustment,
		Height:     c.Height,
	}
}

func fromSerf(c *coordinate.Coordinate) protocol.Coordinate {
	return protocol.Coordinate{
		Vec:        append([]float64(nil), c.Vec...),
		Error:      c.Error,
		Adjustment: c.Adjustment,
		Height:     c.Height,
	}
}

func cloneCoord(c protocol.Coordinate) protocol.Coordinate {
	c.Vec = append([]float64(nil), c.Vec...)
	return c
}
