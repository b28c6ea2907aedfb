package mesh

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// RecordProtocol pushes a node's new capacity record straight to the peers
// it is connected to, beside the DHT put: a view then learns of a change
// (a node leaving, a new span) in one round trip instead of at its next
// refresh, and does not depend on a DHT copy that may lag. The stream
// carries one message, dialer to listener, then closes:
//
//	uvarint length | signed envelope (the same bytes as the DHT value)
//
// The listener accepts it if it passes the capacity validator for the key
// of the peer that signed it. A record that changes what its peer serves
// (a new peer, a new span, a goodbye) is news: the listener passes it on,
// once, to its own connected peers, so joins and leaves flood the connected
// mesh in a few round trips instead of waiting for each view's refresh.
const RecordProtocol = "/infermesh/record/1.0.0"

// Bounds of a record push.
const (
	pushTimeout     = 2 * time.Second
	pushConcurrency = 32
	maxPushBytes    = protocol.MaxCapacityRecordBytes + 1024
)

func (m *Mesh) handleRecord(s network.Stream) {
	defer s.Close()
	s.SetDeadline(time.Now().Add(pushTimeout))
	data, err := readFrame(s, maxPushBytes)
	if err != nil {
		s.Reset()
		m.log.Debug("bad record push", "peer", s.Conn().RemotePeer(), "err", err)
		return
	}
	from := s.Conn().RemotePeer()
	signer, _, err := OpenCapacity(data)
	if err != nil {
		m.log.Debug("refused pushed record", "from", from, "err", err)
		return
	}
	rec, err := CapacityValidator{}.check(CapacityKey(signer), data)
	if err != nil {
		m.log.Debug("refused pushed record", "from", from, "signer", signer, "err", err)
		return
	}
	if signer == m.host.ID() {
		return
	}
	if m.view.learn(signer, rec) {
		m.spawn(func() {
			ctx, cancel := context.WithTimeout(m.ctx, pushTimeout)
			defer cancel()
			m.push(ctx, data, from, signer)
		})
	}
}

// push sends the sealed record to every connected peer but those in skip,
// at most pushConcurrency at a time, and waits for them or the context.
func (m *Mesh) push(ctx context.Context, data []byte, skip ...peer.ID) {
	peers := slices.DeleteFunc(m.host.Network().Peers(), func(p peer.ID) bool { return slices.Contains(skip, p) })
	sem := make(chan struct{}, pushConcurrency)
	var wg sync.WaitGroup
	for _, p := range peers {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			if err := m.pushTo(ctx, p, data); err != nil {
				m.log.Debug("record push failed", "peer", p, "err", err)
			}
		})
	}
	wg.Wait()
}

func (m *Mesh) pushTo(ctx context.Context, p peer.ID, data []byte) error {
	ctx, cancel := context.WithTimeout(ctx, pushTimeout)
	defer cancel()
	s, err := m.host.NewStream(network.WithNoDial(ctx, "push to connected peers only"), p, RecordProtocol)
	if err != nil {
		return err
	}
	s.SetDeadline(time.Now().Add(pushTimeout))
	if err := writeFrame(s, data); err != nil {
		s.Reset()
		return err
	}
	return s.Close()
}

func writeFrame(w io.Writer, b []byte) error {
	var hdr [binary.MaxVarintLen64]byte
	n := binary.PutUvarint(hdr[:], uint64(len(b)))
	if _, err := w.Write(hdr[:n]); err != nil {
		return err
	}
	_, err := w.Write(b)
	return err
}

// readFrame reads one uvarint-length-prefixed message of at most limit
// bytes.
func readFrame(r io.Reader, limit int) ([]byte, error) {
	br := byteReader{r: r}
	n, err := binary.ReadUvarint(&br)
	if err != nil {
		return nil, err
	}
	if n > uint64(limit) {
		return nil, fmt.Errorf("frame of %d bytes over the %d limit", n, limit)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}

// byteReader reads single bytes without buffering past the varint.
type byteReader struct {
	r   io.Reader
	buf [1]byte
}

func (b *byteReader) ReadByte() (byte, error) {
	_, err := io.ReadFull(b.r, b.buf[:])
	return b.buf[0], err
}
