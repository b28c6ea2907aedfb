package protocol_test

import (
	"errors"
	"testing"
	"time"

	"github.com/infermesh/infermesh/protocol"
)

// The canonical payload of SPEC.md's example, byte for byte.
func TestCapacityRecordGolden(t *testing.T) {
	rec := protocol.CapacityRecord{Seq: 1795779600123, Expires: 1795779900123, Version: "v0.1.0",
		Addrs:        []string{"/ip4/127.0.0.1/udp/4001/quic-v1"},
		Accelerators: []protocol.Accelerator{{Kind: "cpu", Name: "Intel(R) Xeon(R) Processor", MemoryBytes: 25165824000, Cores: 2}},
		Models: []protocol.ServedSpan{{Model: "bagaaierarzu5a4zqyjoxw3ya63bxa6lj2zoxwxaysqmsydcae6lkcckh32wa", Blocks: 10, Start: 0, End: 4,
			BlockMicros: []float64{6, 192, 182, 180}}},
		Coord: &protocol.Coordinate{Vec: []float64{0.001, 0, 0, 0, 0, 0, 0, 0}, Error: 0.5, Height: 0.00001}}
	const golden = `{"seq":1795779600123,"expires":1795779900123,"version":"v0.1.0","addrs":["/ip4/127.0.0.1/udp/4001/quic-v1"],"accelerators":[{"kind":"cpu","name":"Intel(R) Xeon(R) Processor","memory_bytes":25165824000,"cores":2}],"models":[{"model":"bagaaierarzu5a4zqyjoxw3ya63bxa6lj2zoxwxaysqmsydcae6lkcckh32wa","blocks":10,"start":0,"end":4,"block_micros":[6,192,182,180]}],"load":{"in_flight":0,"queued":0,"free_kv_bytes":0},"coord":{"vec":[0.001,0,0,0,0,0,0,0],"error":0.5,"adjustment":0,"height":0.00001}}`
	b, err := rec.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != golden {
		t.Fatalf("encoding changed:\n got %s\nwant %s", b, golden)
	}
	back, err := protocol.DecodeCapacityRecord([]byte(golden))
	if err != nil {
		t.Fatal(err)
	}
	again, _ := back.Encode()
	if string(again) != golden {
		t.Fatalf("round trip changed the bytes: %s", again)
	}
	if err := back.Check(time.UnixMilli(rec.Expires - 1000)); err != nil {
		t.Fatal(err)
	}
	if err := back.Check(time.UnixMilli(rec.Expires)); !errors.Is(err, protocol.ErrRecordExpired) {
		t.Fatalf("at expiry: %v", err)
	}
}

func TestDecodeCapacityRecordRefuses(t *testing.T) {
	for _, s := range []string{
		``, `{}`, `{"seq":1}`, `{"seq":1,"expires":5,"extra":1}`,
		`{"seq":1,"expires":5,"models":[{"model":"m","blocks":4,"start":2,"end":2,"block_micros":[]}]}`,
		`{"seq":1,"expires":5,"models":[{"model":"m","blocks":4,"start":2,"end":5,"block_micros":[1,2,3]}]}`,
		`{"seq":1,"expires":5,"models":[{"model":"m","blocks":4,"start":0,"end":2,"block_micros":[1]}]}`,
		`{"seq":1,"expires":5,"models":[{"model":"m","blocks":4,"start":0,"end":1,"block_micros":[1],"resident_bytes":-1}]}`,
		`{"seq":1,"expires":5} {}`,
	} {
		if _, err := protocol.DecodeCapacityRecord([]byte(s)); !errors.Is(err, protocol.ErrBadRecord) {
			t.Errorf("%q: err = %v", s, err)
		}
	}
}

func FuzzDecodeCapacityRecord(f *testing.F) {
	f.Add([]byte(`{"seq":1,"expires":5,"models":[{"model":"m","blocks":4,"start":0,"end":1,"block_micros":[1]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := protocol.DecodeCapacityRecord(b)
		if err != nil {
			return
		}
		if _, err := r.Encode(); err != nil {
			t.Fatalf("decoded record does not encode: %v", err)
		}
	})
}
