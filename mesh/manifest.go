package mesh

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/shards"
)

// ManifestProtocol fetches a model's manifest from a peer that serves the
// model, so that a requester that holds none of its blocks can still drive
// it (a generation needs the decoder spec). One exchange per stream:
//
//	request:  uvarint length | model CID (string form)
//	response: uvarint length | canonical manifest bytes (length 0: not here)
//
// The requester checks the bytes against the CID before using them.
const ManifestProtocol = "/infermesh/manifest/1.0.0"

const (
	maxManifestBytes = 4 << 20
	manifestTimeout  = 10 * time.Second
)

// ErrUnknownModel is returned, wrapped, when no peer has a model's manifest.
var ErrUnknownModel = errors.New("unknown model")

var errNotHeld = errors.New("does not have it")

// ManifestSource gives the canonical manifest of a model this node serves.
type ManifestSource interface {
	ManifestBytes(model string) ([]byte, bool)
}

func (m *Mesh) handleManifest(s network.Stream) {
	defer s.Close()
	s.SetDeadline(time.Now().Add(manifestTimeout))
	req, err := readFrame(s, 256)
	if err != nil {
		s.Reset()
		return
	}
	var body []byte
	m.stage.mu.Lock()
	src, _ := m.stage.provider.(ManifestSource)
	m.stage.mu.Unlock()
	if src != nil {
		body, _ = src.ManifestBytes(string(req))
	}
	writeFrame(s, body)
}

// FetchManifest asks the model's providers for its manifest, verifies it
// against the model ID and returns it.
func (m *Mesh) FetchManifest(ctx context.Context, model cid.Cid) (*shards.Manifest, error) {
	ctx, cancel := context.WithTimeout(ctx, manifestTimeout)
	defer cancel()
	var errs []error
	notHeld := 0
	tried := map[peer.ID]bool{m.host.ID(): true}
	try := func(ai peer.AddrInfo) *shards.Manifest {
		if tried[ai.ID] {
			return nil
		}
		tried[ai.ID] = true
		man, err := m.fetchManifestFrom(ctx, ai, model)
		if err != nil {
			if errors.Is(err, errNotHeld) {
				notHeld++
			}
			errs = append(errs, fmt.Errorf("%s: %w", ai.ID, err))
			return nil
		}
		return man
	}
	for ai := range m.dht.FindProvidersAsync(ctx, model, 8) {
		if man := try(ai); man != nil {
			return man, nil
		}
	}
	// A node that just joined may not have the providers in its routing
	// table yet: ask the peers it is connected to.
	for _, p := range m.host.Network().Peers() {
		if man := try(peer.AddrInfo{ID: p}); man != nil {
			return man, nil
		}
	}
	if len(errs) == 0 || notHeld == len(errs) {
		return nil, fmt.Errorf("%w: no peer has model %s", ErrUnknownModel, model)
	}
	return nil, fmt.Errorf("manifest of %s: %w", model, errors.Join(errs...))
}

func (m *Mesh) fetchManifestFrom(ctx context.Context, ai peer.AddrInfo, model cid.Cid) (*shards.Manifest, error) {
	if len(ai.Addrs) > 0 {
		m.host.Peerstore().AddAddrs(ai.ID, ai.Addrs, time.Minute)
	}
	s, err := m.host.NewStream(ctx, ai.ID, ManifestProtocol)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(manifestTimeout))
	if err := writeFrame(s, []byte(model.String())); err != nil {
		return nil, err
	}
	s.CloseWrite()
	body, err := readFrame(s, maxManifestBytes)
	if err != nil {
		return nil, err
	}
	if len(body) == 0 {
		return nil, errNotHeld
	}
	if got := shards.ManifestCID(body); !got.Equals(model) {
		return nil, fmt.Errorf("sent a manifest whose CID is %s", got)
	}
	return shards.DecodeManifest(body)
}
