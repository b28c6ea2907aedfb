package mesh

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	dhtrecord "github.com/libp2p/go-libp2p-record"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/record"

	"github.com/infermesh/infermesh/protocol"
)

// Capacity records travel as libp2p signed envelopes: the envelope carries
// the signer's public key and a signature over the payload in the domain
// below, so a record proves who wrote it wherever it is found.
const (
	capacityDomain = "infermesh-capacity"
)

// capacityCodec is the envelope's payload type.
var capacityCodec = []byte("/infermesh/capacity/1")

// signedCapacity adapts protocol.CapacityRecord to libp2p's record.Record.
type signedCapacity struct{ protocol.CapacityRecord }

func (*signedCapacity) Domain() string { return capacityDomain }
func (*signedCapacity) Codec() []byte  { return capacityCodec }

func (r *signedCapacity) MarshalRecord() ([]byte, error) { return r.Encode() }

func (r *signedCapacity) UnmarshalRecord(b []byte) error {
	rec, err := protocol.DecodeCapacityRecord(b)
	if err != nil {
		return err
	}
	r.CapacityRecord = *rec
	return nil
}

// CapacityKey is the DHT key of a peer's capacity record.
func CapacityKey(p peer.ID) string {
	return "/" + protocol.CapacityNamespace + "/" + string(p)
}

// SealCapacity signs a record with the peer's key and returns the envelope
// bytes that go into the DHT.
func SealCapacity(rec *protocol.CapacityRecord, key crypto.PrivKey) ([]byte, error) {
	env, err := record.Seal(&signedCapacity{*rec}, key)
	if err != nil {
		return nil, err
	}
	return env.Marshal()
}

// OpenCapacity verifies a sealed record and returns its signer and content.
// It checks the signature and the record's form, not its expiry.
func OpenCapacity(data []byte) (peer.ID, *protocol.CapacityRecord, error) {
	if len(data) > protocol.MaxCapacityRecordBytes+1024 { // payload plus key and signature
		return "", nil, fmt.Errorf("%w: %d bytes", protocol.ErrBadRecord, len(data))
	}
	var rec signedCapacity
	env, err := record.ConsumeTypedEnvelope(data, &rec)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %v", protocol.ErrBadRecord, err)
	}
	id, err := peer.IDFromPublicKey(env.PublicKey)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %v", protocol.ErrBadRecord, err)
	}
	return id, &rec.CapacityRecord, nil
}

// ErrWrongSigner is returned when a record under one peer's key is signed
// by another.
var ErrWrongSigner = errors.New("capacity record signed by another peer")

// CapacityValidator is the DHT validator of the capacity namespace: a
// record is valid when it is signed by the peer whose ID is in its key and
// has not expired; of several, the highest sequence wins (the later expiry
// on a tie).
type CapacityValidator struct {
	// Now is the clock; nil means time.Now. Tests set it.
	Now func() time.Time
}

var _ dhtrecord.Validator = CapacityValidator{}

func (v CapacityValidator) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

// Validate implements record.Validator.
func (v CapacityValidator) Validate(key string, value []byte) error {
	_, err := v.check(key, value)
	return err
}

func (v CapacityValidator) check(key string, value []byte) (*protocol.CapacityRecord, error) {
	ns, id, err := dhtrecord.SplitKey(key)
	if err != nil {
		return nil, err
	}
	if ns != protocol.CapacityNamespace {
		return nil, fmt.Errorf("%w: namespace %q", protocol.ErrBadRecord, ns)
	}
	owner, err := peer.IDFromBytes([]byte(id))
	if err != nil {
		return nil, fmt.Errorf("%w: key holds no peer ID: %v", protocol.ErrBadRecord, err)
	}
	signer, rec, err := OpenCapacity(value)
	if err != nil {
		return nil, err
	}
	if signer != owner {
		return nil, fmt.Errorf("%w: key of %s, signed by %s", ErrWrongSigner, owner, signer)
	}
	if err := rec.Check(v.now()); err != nil {
		return nil, err
	}
	return rec, nil
}

// Select implements record.Validator: the index of the best valid value.
func (v CapacityValidator) Select(key string, values [][]byte) (int, error) {
	best, bestRec := -1, (*protocol.CapacityRecord)(nil)
	for i, val := range values {
		rec, err := v.check(key, val)
		if err != nil {
			continue
		}
		if bestRec == nil || rec.Seq > bestRec.Seq || (rec.Seq == bestRec.Seq && rec.Expires > bestRec.Expires) ||
			(rec.Seq == bestRec.Seq && rec.Expires == bestRec.Expires && bytes.Compare(val, values[best]) > 0) {
			best, bestRec = i, rec
		}
	}
	if best < 0 {
		return 0, fmt.Errorf("%w: no valid record among %d", protocol.ErrBadRecord, len(values))
	}
	return best, nil
}
