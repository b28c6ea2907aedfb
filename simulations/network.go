package simulations

// The network: where endpoints (peers and entry nodes) are, what a message
// between two of them takes, and the network coordinates routing sees.
//
// Geography mode: one-way latency(a, b) = great-circle distance / (2/3 c)
// * RouteFactor + lastMile(a) + lastMile(b) + an exponential jitter of
// mean jitter(a) + jitter(b). Fibre carries light at about 2/3 c
// (200 km/ms); real paths are longer than the great circle and cross
// routers and queues, which RouteFactor (default 1.8; measured
// inter-city RTTs are 1.5-2x the fibre minimum) stands for. A message of
// a request also pays the per-hop overhead (Network.HopOverheadUS) and its
// bytes over the slower access link; an explicit topology's latency is its
// matrix's, with the same jitter, overhead and bytes on top.
//
// Coordinates: each endpoint's Vivaldi coordinate is its point on the
// sphere in 3-D Euclidean space, scaled to seconds of RTT at the same speed
// and factor, with a height of its two last miles (2 * lastMile: a height
// adds to the RTT). This is what Vivaldi converges to when the latencies
// fit such a space; the chord under-estimates the great circle by up to 10%
// at 10,000 km (2R sin(θ/2) against Rθ), the kind of error Vivaldi leaves,
// and the jitter is not in it. Explicit mode: the coordinates are fitted to
// the latency matrix by Vivaldi's spring model (the update rule serf's
// coordinate package runs), run centrally to convergence from a seeded
// start, so that they are deterministic.

import (
	"math"
	"math/rand/v2"

	"github.com/infermesh/infermesh/protocol"
)

const (
	earthKM  = 6371.0
	fibreKMS = 200000.0 // km per second in fibre, 2/3 c
)

// endpoint is a place on the network.
type endpoint struct {
	lat, lon float64
	xyz      [3]float64 // unit sphere
	lastMile int64      // one-way, ns
	jitter   float64    // mean extra delay per message, ns
	bw       float64    // bytes per ns
	node     int        // explicit mode: index in the matrix; -1 otherwise
	coord    *protocol.Coordinate
}

type network struct {
	factor   float64
	explicit [][]int64 // one-way ns, explicit mode
	rng      *rand.Rand
	// coordErr is the scale of the error added to coordinates, seconds
	// of RTT; coordRng draws it.
	coordErr float64
	coordRng *rand.Rand
	// overhead is the fixed per-message cost between two endpoints
	// (Network.HopOverheadUS), ns.
	overhead int64
}

// perturb moves a coordinate by a random vector, uniformly directed, of a
// length |N(0, coordErr)|: the estimates of the RTTs from and to it err by
// about that much, as a Vivaldi that has not converged (or a path that
// changed) leaves them. Without an error it returns c as it is.
func (n *network) perturb(c *protocol.Coordinate) *protocol.Coordinate {
	if n.coordErr == 0 {
		return c
	}
	dir := make([]float64, len(c.Vec))
	norm := 0.0
	for i := range dir {
		dir[i] = n.coordRng.NormFloat64()
		norm += dir[i] * dir[i]
	}
	length := math.Abs(n.coordRng.NormFloat64()) * n.coordErr / math.Sqrt(max(norm, 1e-300))
	out := *c
	out.Vec = make([]float64, len(c.Vec))
	for i, x := range c.Vec {
		out.Vec[i] = x + dir[i]*length
	}
	return &out
}

func newEndpoint(lat, lon float64, lastMileMS, jitterMS, mbps float64) endpoint {
	la, lo := lat*math.Pi/180, lon*math.Pi/180
	return endpoint{lat: lat, lon: lon, xyz: [3]float64{math.Cos(la) * math.Cos(lo), math.Cos(la) * math.Sin(lo), math.Sin(la)},
		lastMile: int64(lastMileMS * 1e6), jitter: jitterMS * 1e6, bw: mbps * 1e6 / 8 / 1e9, node: -1}
}

// place draws a point uniformly on the disc of radius km around a centre.
func place(rng *rand.Rand, lat, lon, km float64) (float64, float64) {
	r := km * math.Sqrt(rng.Float64()) / earthKM
	th := 2 * math.Pi * rng.Float64()
	la := lat*math.Pi/180 + r*math.Cos(th)
	lo := lon*math.Pi/180 + r*math.Sin(th)/max(math.Cos(la), 0.05)
	la = max(min(la, math.Pi/2), -math.Pi/2)
	lo = math.Mod(lo+3*math.Pi, 2*math.Pi) - math.Pi
	return la * 180 / math.Pi, lo * 180 / math.Pi
}

// propagation is the one-way wire time between two endpoints' places, ns.
func (n *network) propagation(a, b *endpoint) int64 {
	if n.explicit != nil {
		if a.node == b.node {
			return 0
		}
		return n.explicit[a.node][b.node]
	}
	dot := a.xyz[0]*b.xyz[0] + a.xyz[1]*b.xyz[1] + a.xyz[2]*b.xyz[2]
	km := math.Acos(max(-1, min(1, dot))) * earthKM
	return int64(km / fibreKMS * n.factor * 1e9)
}

// oneWay is what a message of size bytes takes from a to b, ns: the
// latency (with jitter), the per-hop overhead (framing, tensor codec,
// stream work; not in the coordinates) plus the bytes over the slower
// access link. The same endpoint (a node to itself) costs nothing.
func (n *network) oneWay(a, b *endpoint, bytes float64) int64 {
	if a == b {
		return 0
	}
	d := n.propagation(a, b) + a.lastMile + b.lastMile + n.overhead
	if j := a.jitter + b.jitter; j > 0 {
		d += int64(n.rng.ExpFloat64() * j)
	}
	return d + int64(bytes/min(a.bw, b.bw))
}

// geoCoord is an endpoint's coordinate in the geography mode (see the file
// comment).
func (n *network) geoCoord(e *endpoint) *protocol.Coordinate {
	scale := 2 * earthKM / fibreKMS * n.factor // RTT seconds per unit of chord
	return &protocol.Coordinate{
		Vec:    []float64{e.xyz[0] * scale, e.xyz[1] * scale, e.xyz[2] * scale},
		Error:  0.1,
		Height: 2 * float64(e.lastMile) / 1e9,
	}
}

// fitCoords fits coordinates to a matrix of one-way latencies (ns) with
// Vivaldi's spring model: each node moves along the unit vector from its
// peer by a step proportional to the error of the estimated RTT, and its
// height takes a share of it. Rounds go over every ordered pair in order,
// with a shrinking step, from positions drawn from rng.
func fitCoords(oneway [][]int64, rng *rand.Rand) []*protocol.Coordinate {
	const dims = 3
	n := len(oneway)
	pos := make([][dims]float64, n)
	h := make([]float64, n)
	for i := range pos {
		for d := range dims {
			pos[i][d] = (rng.Float64() - 0.5) * 1e-3
		}
		h[i] = 1e-5
	}
	rtt := func(i, j int) float64 { return float64(oneway[i][j]+oneway[j][i]) / 1e9 }
	for round := range 2000 {
		step := 0.25 * (1 - float64(round)/2000)
		for i := range n {
			for j := range n {
				if i == j {
					continue
				}
				var diff [dims]float64
				dist := 0.0
				for d := range dims {
					diff[d] = pos[i][d] - pos[j][d]
					dist += diff[d] * diff[d]
				}
				dist = math.Sqrt(dist)
				est := dist + h[i] + h[j]
				e := rtt(i, j) - est // > 0: too close, push apart
				if dist > 0 {
					for d := range dims {
						pos[i][d] += step * e * diff[d] / dist
					}
				}
				h[i] = max(h[i]+step*e*0.1, 1e-6)
			}
		}
	}
	out := make([]*protocol.Coordinate, n)
	for i := range out {
		out[i] = &protocol.Coordinate{Vec: []float64{pos[i][0], pos[i][1], pos[i][2]}, Error: 0.1, Height: h[i]}
	}
	return out
}
