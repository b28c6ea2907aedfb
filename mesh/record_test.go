package mesh

import (
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

func newKey(t testing.TB) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, id
}

func sealed(t testing.TB, key crypto.PrivKey, seq uint64, expires time.Time) []byte {
	t.Helper()
	rec := &protocol.CapacityRecord{Seq: seq, Expires: expires.UnixMilli(), Version: "test",
		Addrs:  []string{"/ip4/127.0.0.1/udp/4001/quic-v1"},
		Models: []protocol.ServedSpan{{Model: "bagaaiera", Blocks: 10, Start: 2, End: 4, BlockMicros: []float64{100, 120}}}}
	b, err := SealCapacity(rec, key)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCapacityValidator(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	v := CapacityValidator{Now: func() time.Time { return now }}
	key, id := newKey(t)
	other, _ := newKey(t)
	k := CapacityKey(id)
	good := sealed(t, key, 5, now.Add(3*time.Minute))

	if err := v.Validate(k, good); err != nil {
		t.Fatalf("correct record refused: %v", err)
	}
	bad := map[string]struct {
		key   string
		value []byte
		want  error
	}{
		"signed by another key": {k, sealed(t, other, 5, now.Add(time.Minute)), ErrWrongSigner},
		"expired":               {k, sealed(t, key, 6, now.Add(-time.Second)), protocol.ErrRecordExpired},
		"expires too far ahead": {k, sealed(t, key, 6, now.Add(protocol.MaxRecordTTL+time.Minute)), protocol.ErrBadRecord},
		"truncated":             {k, good[:len(good)-7], protocol.ErrBadRecord},
		"garbage":               {k, []byte("not a signed envelope at all"), protocol.ErrBadRecord},
		"empty":                 {k, nil, protocol.ErrBadRecord},
		"wrong namespace":       {"/other/" + string(id), good, protocol.ErrBadRecord},
		"key without peer ID":   {"/" + protocol.CapacityNamespace + "/nope", good, protocol.ErrBadRecord},
	}
	for name, c := range bad {
		err := v.Validate(c.key, c.value)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", name, err, c.want)
		}
	}
	// A flipped byte anywhere in the signed payload breaks the signature.
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)/2] ^= 1
	if err := v.Validate(k, flipped); err == nil {
		t.Error("flipped byte accepted")
	}

	// Select: the highest valid sequence wins; invalid ones are skipped
	// even when their sequence is higher.
	older := sealed(t, key, 4, now.Add(4*time.Minute))
	newer := sealed(t, key, 9, now.Add(2*time.Minute))
	forged := sealed(t, other, 99, now.Add(time.Minute))
	expired := sealed(t, key, 50, now.Add(-time.Minute))
	i, err := v.Select(k, [][]byte{older, forged, newer, good, expired})
	if err != nil || i != 2 {
		t.Fatalf("Select = %d, %v; want 2 (seq 9)", i, err)
	}
	if _, err := v.Select(k, [][]byte{forged, expired}); err == nil {
		t.Fatal("Select of only invalid records succeeded")
	}
}

func FuzzOpenCapacity(f *testing.F) {
	key, _, _ := crypto.GenerateEd25519Key(rand.Reader)
	rec := &protocol.CapacityRecord{Seq: 1, Expires: 1, Models: []protocol.ServedSpan{{Model: "m", Blocks: 1, End: 1, BlockMicros: []float64{1}}}}
	b, _ := SealCapacity(rec, key)
	f.Add(b)
	f.Add([]byte{0x0a, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		id, r, err := OpenCapacity(data)
		if err != nil {
			return
		}
		if id == "" || r == nil {
			t.Fatal("success without a signer or record")
		}
	})
}
