package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// CapacityRecord is what a peer tells the mesh about itself: what it can
// run, what it serves, how loaded it is and where it is. Each peer publishes
// its own in the DHT under CapacityKey(peer), signed with its key (the
// signature and the DHT validator live in mesh); SPEC.md documents every
// field.
type CapacityRecord struct {
	// Seq increases with every new record from the same peer: the highest
	// valid one wins.
	Seq uint64 `json:"seq"`
	// Expires is when the record stops being valid (Unix milliseconds). A
	// peer refreshes it well before; a peer that vanished ages out.
	Expires int64 `json:"expires"`
	// Version is the peer's software version.
	Version string `json:"version"`
	// Addrs are the peer's listen multiaddrs.
	Addrs []string `json:"addrs"`
	// Accelerators are its GPUs, or its CPU when it has none.
	Accelerators []Accelerator `json:"accelerators"`
	// Models lists the spans of blocks it serves.
	Models []ServedSpan `json:"models"`
	// Load is its current load.
	Load Load `json:"load"`
	// Coord is its network coordinate (Vivaldi), so that any peer can
	// estimate the RTT between two peers it never measured.
	Coord *Coordinate `json:"coord,omitempty"`
}

// Accelerator is one device a peer computes on.
type Accelerator struct {
	Kind        string `json:"kind"` // "gpu" or "cpu"
	Name        string `json:"name"` // e.g. "NVIDIA H100 80GB HBM3", "Intel(R) Xeon(R) Processor"
	MemoryBytes int64  `json:"memory_bytes"`
	Cores       int    `json:"cores,omitempty"` // CPU cores (cpu only)
}

// ServedSpan is a contiguous range of a model's blocks that a peer serves.
type ServedSpan struct {
	Model  string `json:"model"`  // model ID (CID of the manifest)
	Blocks int    `json:"blocks"` // how many blocks the model has, so a reader can see what nobody serves
	Start  int    `json:"start"`  // first block
	End    int    `json:"end"`    // one past the last block
	// BlockMicros is the measured time of one pass through each served
	// block (End-Start entries), batch 1 (one token for decoders), in
	// microseconds. Throughput follows: 1e6 / sum over a span.
	BlockMicros []float64 `json:"block_micros"`
	// ResidentBytes is about how much memory the span's blocks take loaded
	// (shards.Manifest.ResidentBytes: quantized blocks take far less than
	// float ones); 0 when not said.
	ResidentBytes int64 `json:"resident_bytes,omitempty"`
}

// Load is a peer's load when it published its record.
type Load struct {
	InFlight    int   `json:"in_flight"`     // requests running
	Queued      int   `json:"queued"`        // requests waiting
	FreeKVBytes int64 `json:"free_kv_bytes"` // memory left for session state (KV caches)
}

// Coordinate is a Vivaldi network coordinate, as hashicorp/serf's
// coordinate package defines it: a position in Euclidean space plus a
// height (the access link), with the error estimate and adjustment term.
// Distances between coordinates estimate RTTs in seconds.
type Coordinate struct {
	Vec        []float64 `json:"vec"`
	Error      float64   `json:"error"`
	Adjustment float64   `json:"adjustment"`
	Height     float64   `json:"height"`
}

// Limits of capacity records.
const (
	// MaxCapacityRecordBytes bounds an encoded record.
	MaxCapacityRecordBytes = 16 << 10
	// MaxRecordTTL bounds how far in the future a record may expire, so
	// that a peer cannot pin a stale record for long.
	MaxRecordTTL = 30 * time.Minute
	// CapacityNamespace is the DHT namespace of capacity records: keys are
	// "/" + CapacityNamespace + "/" + the peer ID's bytes.
	CapacityNamespace = "infermesh-cap"
)

// Errors of capacity records.
var (
	ErrRecordExpired = errors.New("capacity record expired")
	ErrBadRecord     = errors.New("bad capacity record")
)

// Encode returns the record's canonical JSON (fields in schema order, no
// whitespace).
func (r *CapacityRecord) Encode() ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(r); err != nil {
		return nil, err
	}
	b := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	if len(b) > MaxCapacityRecordBytes {
		return nil, fmt.Errorf("%w: %d bytes over the %d limit", ErrBadRecord, len(b), MaxCapacityRecordBytes)
	}
	return b, nil
}

// DecodeCapacityRecord parses a record and checks it is well formed. It
// does not check expiry: see Check.
func DecodeCapacityRecord(b []byte) (*CapacityRecord, error) {
	if len(b) > MaxCapacityRecordBytes {
		return nil, fmt.Errorf("%w: %d bytes over the %d limit", ErrBadRecord, len(b), MaxCapacityRecordBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r CapacityRecord
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadRecord, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data", ErrBadRecord)
	}
	for _, s := range r.Models {
		if s.Model == "" || s.Start < 0 || s.End <= s.Start || s.End > s.Blocks || len(s.BlockMicros) != s.End-s.Start {
			return nil, fmt.Errorf("%w: span %q [%d,%d) of %d blocks with %d timings", ErrBadRecord, s.Model, s.Start, s.End, s.Blocks, len(s.BlockMicros))
		}
		if s.ResidentBytes < 0 {
			return nil, fmt.Errorf("%w: span %q takes %d bytes", ErrBadRecord, s.Model, s.ResidentBytes)
		}
	}
	if r.Expires <= 0 {
		return nil, fmt.Errorf("%w: no expiry", ErrBadRecord)
	}
	return &r, nil
}

// Check reports whether the record is valid at now: not expired, and not
// expiring further ahead than MaxRecordTTL.
func (r *CapacityRecord) Check(now time.Time) error {
	exp := time.UnixMilli(r.Expires)
	if !now.Before(exp) {
		return fmt.Errorf("%w at %s", ErrRecordExpired, exp.UTC().Format(time.RFC3339))
	}
	if exp.Sub(now) > MaxRecordTTL {
		return fmt.Errorf("%w: expires %s, over %s ahead", ErrBadRecord, exp.UTC().Format(time.RFC3339), MaxRecordTTL)
	}
	return nil
}

// Span returns the span of model id this record serves, if any.
func (r *CapacityRecord) Span(id string) (ServedSpan, bool) {
	for _, s := range r.Models {
		if s.Model == id {
			return s, true
		}
	}
	return ServedSpan{}, false
}
