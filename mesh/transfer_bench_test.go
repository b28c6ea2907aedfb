package mesh

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/quic-go/quic-go"

	"github.com/infermesh/infermesh/protocol"
)

const benchTransferProto = "/infermesh/bench-transfer/1.0.0"

// BenchmarkTransfer16MiB moves one 16 MiB float32 activation over one hop:
// a stage frame (header + raw tensor bytes) on a libp2p QUIC stream between
// two mesh hosts on loopback, read back into a tensor at the far end; and
// the same bytes over a raw quic-go stream on loopback, in the same run,
// as the baseline. Compare the MB/s of the two sub-benchmarks.
//
// go test -run '^$' -bench Transfer16MiB -benchtime 20x ./mesh/
func BenchmarkTransfer16MiB(b *testing.B) {
	const size = 16 << 20
	tensor := &protocol.Tensor{DType: protocol.Float32, Shape: []int64{1, size / 4}, Data: make([]byte, size)}
	for i := range tensor.Data {
		tensor.Data[i] = byte(i)
	}

	b.Run("mesh-stage-frame", func(b *testing.B) {
		a, z := benchPair(b)
		got := make(chan error, 1)
		z.host.SetStreamHandler(benchTransferProto, func(s network.Stream) {
			defer s.Close()
			for {
				m, err := protocol.ReadMessage(s, 0)
				if err != nil {
					return
				}
				if len(m.Tensors) != 1 || len(m.Tensors[0].Data) != size {
					got <- io.ErrShortBuffer
					return
				}
				if _, err := s.Write([]byte{1}); err != nil {
					got <- err
					return
				}
			}
		})
		s, err := a.host.NewStream(context.Background(), z.ID(), benchTransferProto)
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 1},
			Tensors: []protocol.NamedTensor{{Name: "h", Tensor: tensor}}}
		ack := make([]byte, 1)
		b.SetBytes(size)
		for b.Loop() {
			if err := protocol.WriteMessage(s, msg); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(s, ack); err != nil {
				b.Fatal(err)
			}
		}
		select {
		case err := <-got:
			b.Fatal(err)
		default:
		}
	})

	b.Run("raw-quic-go", func(b *testing.B) {
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
			s, err := c.AcceptStream(context.Background())
			if err != nil {
				return
			}
			buf := make([]byte, size)
			for {
				if _, err := io.ReadFull(s, buf); err != nil {
					return
				}
				s.Write([]byte{1})
			}
		}()
		conn, err := quic.DialAddr(context.Background(), ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"bench"}}, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.CloseWithError(0, "")
		s, err := conn.OpenStreamSync(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		ack := make([]byte, 1)
		b.SetBytes(size)
		for b.Loop() {
			if _, err := s.Write(tensor.Data); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(s, ack); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchPair starts two mesh nodes on loopback, connected.
func benchPair(b *testing.B) (*Mesh, *Mesh) {
	b.Helper()
	start := func(boot ...*Mesh) *Mesh {
		key, _ := newKey(b)
		cfg := Config{Key: key, ListenAddrs: []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, DHTMode: "server", Version: "bench",
			Logger: slog.New(slog.DiscardHandler)}
		for _, m := range boot {
			cfg.Bootstrap = append(cfg.Bootstrap, addrInfo(m))
		}
		m, err := New(context.Background(), cfg, func() Advert { return Advert{} })
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { m.Close() })
		return m
	}
	a := start()
	return start(a), a
}

// benchTLS makes a throwaway self-signed certificate for the raw quic-go
// baseline.
func benchTLS() *tls.Config {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"bench"}}
}
