package gguf

import (
	"bytes"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// tensorSpec is a tensor for writeTestFile: raw bytes, or float32 rows to
// quantize.
type tensorSpec struct {
	name string
	typ  Type
	dims []int64
	raw  []byte
	rows []float32
}

// writeTestFile writes kvs (key, value pairs in order) and tensors to a
// file in t's temporary folder and opens it; the file is closed at cleanup.
func writeTestFile(t testing.TB, kvs []KV, tensors []tensorSpec) (*File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "test.gguf")
	w, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range kvs {
		if err := w.AddKV(kv.Key, kv.Value); err != nil {
			t.Fatal(err)
		}
	}
	for _, ts := range tensors {
		if err := w.AddTensor(ts.name, ts.typ, ts.dims...); err != nil {
			t.Fatal(err)
		}
	}
	for _, ts := range tensors {
		if ts.raw != nil {
			err = w.WriteRaw(ts.raw)
		} else {
			err = w.WriteRows(ts.rows)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, path
}

// writeBytes is writeTestFile into memory, for the fuzz seeds and the
// hostile-file tests.
func writeBytes(t testing.TB, kvs []KV, tensors []tensorSpec) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, kv := range kvs {
		if err := w.AddKV(kv.Key, kv.Value); err != nil {
			t.Fatal(err)
		}
	}
	for _, ts := range tensors {
		if err := w.AddTensor(ts.name, ts.typ, ts.dims...); err != nil {
			t.Fatal(err)
		}
	}
	for _, ts := range tensors {
		var err error
		if ts.raw != nil {
			err = w.WriteRaw(ts.raw)
		} else {
			err = w.WriteRows(ts.rows)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// allValueKVs is one pair of every metadata value type, scalars and
// arrays, with awkward values (extremes, unicode, empty arrays).
func allValueKVs() []KV {
	return []KV{
		{Key: "general.architecture", Value: "llama"},
		{Key: "test.u8", Value: uint8(255)},
		{Key: "test.i8", Value: int8(-128)},
		{Key: "test.u16", Value: uint16(65535)},
		{Key: "test.i16", Value: int16(-32768)},
		{Key: "test.u32", Value: uint32(4294967295)},
		{Key: "test.i32", Value: int32(-2147483648)},
		{Key: "test.f32", Value: float32(1e-5)},
		{Key: "test.bool_true", Value: true},
		{Key: "test.bool_false", Value: false},
		{Key: "test.string", Value: "héllo ▁wörld\n\x00tab\t"},
		{Key: "test.empty_string", Value: ""},
		{Key: "test.u64", Value: uint64(math.MaxUint64)},
		{Key: "test.i64", Value: int64(math.MinInt64)},
		{Key: "test.f64", Value: 3.141592653589793},
		{Key: "test.arr_u8", Value: []uint8{0, 1, 255}},
		{Key: "test.arr_i8", Value: []int8{-128, 0, 127}},
		{Key: "test.arr_u16", Value: []uint16{0, 65535}},
		{Key: "test.arr_i16", Value: []int16{-32768, 32767}},
		{Key: "test.arr_u32", Value: []uint32{0, 4294967295}},
		{Key: "test.arr_i32", Value: []int32{-2147483648, 2147483647}},
		{Key: "test.arr_f32", Value: []float32{0.5, -1.25e-3, 3.4e38}},
		{Key: "test.arr_bool", Value: []bool{true, false, true}},
		{Key: "tokenizer.ggml.tokens", Value: []string{"<unk>", "<s>", "</s>", "▁the", "", "日本語"}},
		{Key: "test.arr_u64", Value: []uint64{0, math.MaxUint64}},
		{Key: "test.arr_i64", Value: []int64{math.MinInt64, math.MaxInt64}},
		{Key: "test.arr_f64", Value: []float64{1e-300, -2.5}},
		{Key: "test.arr_empty", Value: []int32{}},
	}
}

// randF16 returns a random finite half-precision value (normal, subnormal
// or zero, either sign).
func randF16(rng *rand.Rand) uint16 {
	for {
		h := uint16(rng.Uint32())
		if h&0x7c00 != 0x7c00 {
			return h
		}
	}
}

// randomBlocks returns n blocks of t filled with random bytes, each f16
// scale field replaced with a random finite half.
func randomBlocks(rng *rand.Rand, t Type, n int) []byte {
	bb := t.BlockBytes()
	out := make([]byte, n*bb)
	for i := range out {
		out[i] = byte(rng.Uint32())
	}
	var scales []int // offsets of f16 fields within a block
	switch t {
	case TypeQ8_0, TypeQ4_0:
		scales = []int{0}
	case TypeQ4_K, TypeQ5_K:
		scales = []int{0, 2}
	case TypeQ6_K:
		scales = []int{208}
	}
	for b := range n {
		for _, off := range scales {
			binary.LittleEndian.PutUint16(out[b*bb+off:], randF16(rng))
		}
	}
	return out
}
