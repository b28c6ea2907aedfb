package mesh

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/infermesh/infermesh/protocol"
)

const benchLegProto = "/infermesh/bench-leg/1.0.0"

// BenchmarkLegLatency: the floor under one leg of a decode ring on this
// machine. Two mesh hosts on loopback QUIC bounce a message back and
// forth; each side either answers at once ("hot") or first keeps its core
// busy for 600 µs, as a hop's compute does ("after-compute"), which lets
// the runtime's other threads go idle so that every hand-off has to wake
// one. The message is either raw bytes of a dim-256 decode step's size or
// a stage frame as a ring step carries it (a route of three hops, the
// ring header, a 1x1x256 float32 activation), written and parsed with the
// protocol package. Reports the one-way time per leg, the busy time left
// out.
//
// go test -run '^$' -bench LegLatency -benchtime 2000x ./mesh/
func BenchmarkLegLatency(b *testing.B) {
	for _, work := range []time.Duration{0, 600 * time.Microsecond} {
		for _, framed := range []bool{false, true} {
			name := fmt.Sprintf("hot/%s", map[bool]string{false: "raw", true: "stage-frame"}[framed])
			if work > 0 {
				name = "after-compute/" + name[len("hot/"):]
			}
			b.Run(name, func(b *testing.B) { legLatency(b, work, framed) })
		}
	}
}

func legLatency(b *testing.B, work time.Duration, framed bool) {
	a, z := benchPair(b)
	msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{
		ID: 1 << 62, Requester: a.ID().String(), Model: "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
		Session: "0123456789abcdef0123456789abcdef", Step: 10, Hop: 1, Deadline: time.Now().UnixMilli(),
		Route: []protocol.Hop{{Peer: a.ID().String(), Start: 0, End: 3}, {Peer: z.ID().String(), Start: 3, End: 6}, {Peer: a.ID().String(), Start: 6, End: 10}},
		Ring:  &protocol.Ring{Index: 5, MaxTokens: 32, Positions: 12, StepMillis: 30000, HopMicros: []int64{512}},
	}, Tensors: []protocol.NamedTensor{{Name: "hidden", Tensor: &protocol.Tensor{DType: protocol.Float32, Shape: []int64{1, 1, 256}, Data: make([]byte, 1024)}}}}
	raw := make([]byte, 1024+700) // about a ring step frame's size
	// bounce reads one message and writes it back after the work.
	bounce := func(s network.Stream) error {
		if framed {
			m, err := protocol.ReadMessage(s, 0)
			if err != nil {
				return err
			}
			busy(work)
			return protocol.WriteMessage(s, m)
		}
		buf := make([]byte, len(raw))
		if _, err := io.ReadFull(s, buf); err != nil {
			return err
		}
		busy(work)
		_, err := s.Write(buf)
		return err
	}
	z.host.SetStreamHandler(benchLegProto, func(s network.Stream) {
		defer s.Close()
		for bounce(s) == nil {
		}
	})
	s, err := a.host.NewStream(context.Background(), z.ID(), benchLegProto)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	t0 := time.Now()
	for b.Loop() {
		busy(work)
		if framed {
			err = protocol.WriteMessage(s, msg)
			if err == nil {
				_, err = protocol.ReadMessage(s, 0)
			}
		} else {
			_, err = s.Write(raw)
			if err == nil {
				_, err = io.ReadFull(s, raw)
			}
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	legs := time.Since(t0) - 2*time.Duration(b.N)*work
	b.ReportMetric(float64(legs.Microseconds())/float64(2*b.N), "us/leg")
}

// busy keeps this goroutine's core busy for d, as a hop's compute would.
func busy(d time.Duration) {
	for t := time.Now(); time.Since(t) < d; {
	}
}
