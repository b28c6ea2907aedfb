package gguf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

func TestMetadataRoundTrip(t *testing.T) {
	kvs := allValueKVs()
	f, _ := writeTestFile(t, kvs, []tensorSpec{
		{name: "token_embd.weight", typ: TypeF32, dims: []int64{8, 3}, rows: make([]float32, 24)},
		{name: "blk.0.attn_q.weight", typ: TypeQ8_0, dims: []int64{32, 2, 3}, rows: make([]float32, 192)},
	})
	if f.Version != 3 || f.Alignment != DefaultAlignment || f.DataOffset%32 != 0 {
		t.Fatalf("version %d alignment %d data offset %d", f.Version, f.Alignment, f.DataOffset)
	}
	got := f.Metadata().KVs()
	if len(got) != len(kvs) {
		t.Fatalf("%d pairs, want %d", len(got), len(kvs))
	}
	for i, kv := range kvs {
		vt, et, _ := valueTypeOf(kv.Value)
		if got[i].Key != kv.Key || got[i].Type != vt || got[i].ElemType != et || !reflect.DeepEqual(got[i].Value, kv.Value) {
			t.Errorf("pair %d: got %+v, want %+v", i, got[i], kv)
		}
	}
	m := f.Metadata()
	if s, err := m.String("general.architecture"); err != nil || s != "llama" {
		t.Errorf("String: %q, %v", s, err)
	}
	if n, err := m.Uint("test.u32"); err != nil || n != math.MaxUint32 {
		t.Errorf("Uint: %d, %v", n, err)
	}
	if n, err := m.Uint("test.u64"); err != nil || n != math.MaxUint64 {
		t.Errorf("Uint u64: %d, %v", n, err)
	}
	if _, err := m.Uint("test.i8"); err == nil {
		t.Error("Uint of a negative int8: no error")
	}
	if n, err := m.Int("test.i16"); err != nil || n != -32768 {
		t.Errorf("Int: %d, %v", n, err)
	}
	if _, err := m.Int("test.u64"); err == nil {
		t.Error("Int of MaxUint64: no error")
	}
	if v, err := m.Float("test.f32"); err != nil || v != float64(float32(1e-5)) {
		t.Errorf("Float: %v, %v", v, err)
	}
	if b, err := m.Bool("test.bool_true"); err != nil || !b {
		t.Errorf("Bool: %v, %v", b, err)
	}
	if s, err := m.Strings("tokenizer.ggml.tokens"); err != nil || len(s) != 6 || s[5] != "日本語" {
		t.Errorf("Strings: %q, %v", s, err)
	}
	if n, err := m.Ints("test.arr_i8"); err != nil || !reflect.DeepEqual(n, []int64{-128, 0, 127}) {
		t.Errorf("Ints: %v, %v", n, err)
	}
	if _, err := m.Ints("test.arr_u64"); err == nil {
		t.Error("Ints of MaxUint64: no error")
	}
	if v, err := m.Floats("test.arr_f32"); err != nil || len(v) != 3 || v[0] != 0.5 {
		t.Errorf("Floats: %v, %v", v, err)
	}
	if _, err := m.String("missing"); !errors.Is(err, ErrNoKey) {
		t.Errorf("missing key: %v", err)
	}
	if _, err := m.String("test.u8"); err == nil || !strings.Contains(err.Error(), "is uint8, want string") {
		t.Errorf("wrong type: %v", err)
	}
	if _, err := m.Floats("tokenizer.ggml.tokens"); err == nil || !strings.Contains(err.Error(), "is array of string") {
		t.Errorf("wrong array type: %v", err)
	}

	ts := f.Tensors()
	if len(ts) != 2 || ts[0].Name != "token_embd.weight" || ts[1].Name != "blk.0.attn_q.weight" {
		t.Fatalf("tensors %v", ts)
	}
	q, ok := f.Tensor("blk.0.attn_q.weight")
	if !ok || q.Type != TypeQ8_0 || !reflect.DeepEqual(q.Dims, []int64{32, 2, 3}) || !reflect.DeepEqual(q.Shape(), []int64{3, 2, 32}) {
		t.Fatalf("tensor %+v", q)
	}
	if q.Elements() != 192 || q.RowLen() != 32 || q.Rows() != 6 || q.RowBytes() != 34 || q.Size != 6*34 {
		t.Errorf("elements %d row %d rows %d row bytes %d size %d", q.Elements(), q.RowLen(), q.Rows(), q.RowBytes(), q.Size)
	}
	if q.Offset != 96 { // 24 floats = 96 bytes, already aligned
		t.Errorf("offset %d", q.Offset)
	}
	if _, ok := f.Tensor("nope"); ok {
		t.Error("found a tensor that is not there")
	}
}

func TestAlignment(t *testing.T) {
	kvs := []KV{{Key: AlignmentKey, Value: uint32(64)}}
	f, _ := writeTestFile(t, kvs, []tensorSpec{
		{name: "a", typ: TypeF32, dims: []int64{3}, rows: []float32{1, 2, 3}},
		{name: "b", typ: TypeF16, dims: []int64{5}, rows: []float32{1, 2, 3, 4, 5}},
	})
	b, _ := f.Tensor("b")
	if f.Alignment != 64 || f.DataOffset%64 != 0 || b.Offset != 64 {
		t.Fatalf("alignment %d data offset %d b at %d", f.Alignment, f.DataOffset, b.Offset)
	}
	got, err := f.ReadTensor(b)
	if err != nil || !reflect.DeepEqual(got, []float32{1, 2, 3, 4, 5}) {
		t.Fatalf("%v %v", got, err)
	}
}

func TestWriterErrors(t *testing.T) {
	for name, fn := range map[string]func(w *Writer) error{
		"int value":      func(w *Writer) error { return w.AddKV("k", 1) },
		"duplicate key":  func(w *Writer) error { w.AddKV("k", uint8(1)); return w.AddKV("k", uint8(1)) },
		"bad alignment":  func(w *Writer) error { return w.AddKV(AlignmentKey, uint32(48)) },
		"alignment type": func(w *Writer) error { return w.AddKV(AlignmentKey, uint64(64)) },
		"zero dim":       func(w *Writer) error { return w.AddTensor("t", TypeF32, 4, 0) },
		"rank 5":         func(w *Writer) error { return w.AddTensor("t", TypeF32, 1, 1, 1, 1, 1) },
		"partial block":  func(w *Writer) error { return w.AddTensor("t", TypeQ4_K, 128) },
		"unknown type":   func(w *Writer) error { return w.AddTensor("t", Type(99), 4) },
		"duplicate name": func(w *Writer) error { w.AddTensor("t", TypeF32, 4); return w.AddTensor("t", TypeF32, 4) },
		"too many rows":  func(w *Writer) error { w.AddTensor("t", TypeF32, 4); return w.WriteRows(make([]float32, 8)) },
		"partial row":    func(w *Writer) error { w.AddTensor("t", TypeF32, 4); return w.WriteRows(make([]float32, 3)) },
		"too many bytes": func(w *Writer) error { w.AddTensor("t", TypeF32, 4); return w.WriteRaw(make([]byte, 17)) },
		"past last":      func(w *Writer) error { return w.WriteRaw([]byte{1}) },
		"unsupported":    func(w *Writer) error { w.AddTensor("t", TypeQ2_K, 256); return w.WriteRows(make([]float32, 256)) },
		"incomplete":     func(w *Writer) error { w.AddTensor("t", TypeF32, 4); w.WriteRaw(make([]byte, 8)); return w.Close() },
		"kv after data": func(w *Writer) error {
			w.AddTensor("t", TypeF32, 1)
			w.WriteRaw(make([]byte, 4))
			return w.AddKV("k", true)
		},
		"tensor after kv": func(w *Writer) error { w.AddTensor("t", TypeF32, 1); return w.AddKV(AlignmentKey, uint32(64)) },
	} {
		if err := fn(NewWriter(&bytes.Buffer{})); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// raw builds GGUF bytes by hand for the hostile-file tests.
type raw struct{ b []byte }

func (r *raw) u32(v uint32) *raw { r.b = binary.LittleEndian.AppendUint32(r.b, v); return r }
func (r *raw) u64(v uint64) *raw { r.b = binary.LittleEndian.AppendUint64(r.b, v); return r }
func (r *raw) str(s string) *raw { r.u64(uint64(len(s))); r.b = append(r.b, s...); return r }
func (r *raw) bytes(n int) *raw  { r.b = append(r.b, make([]byte, n)...); return r }

// header starts a file: magic, version, counts.
func header(version uint32, tensors, kvs uint64) *raw {
	r := &raw{b: []byte(Magic)}
	return r.u32(version).u64(tensors).u64(kvs)
}

// tensorInfo appends one tensor info.
func (r *raw) tensorInfo(name string, typ uint32, off uint64, dims ...uint64) *raw {
	r.str(name).u32(uint32(len(dims)))
	for _, d := range dims {
		r.u64(d)
	}
	return r.u32(typ).u64(off)
}

// pad appends zeros up to a multiple of 32 and then n bytes of data.
func (r *raw) pad(n int) *raw {
	return r.bytes(int(alignUp(int64(len(r.b)), 32)) - len(r.b) + n)
}

func TestHostileFiles(t *testing.T) {
	valid := writeBytes(t, allValueKVs(), []tensorSpec{
		{name: "w", typ: TypeQ4_0, dims: []int64{64, 2}, rows: make([]float32, 128)},
	})
	cases := []struct {
		name string
		data []byte
		want string // a part of the error
	}{
		{"empty", nil, "truncated"},
		{"bad magic", append([]byte("GGUG"), valid[4:]...), "not a GGUF file"},
		{"version 1", header(1, 0, 0).b, "version 1"},
		{"version 4", header(4, 0, 0).b, "version 4 is not supported"},
		{"big endian", append([]byte(Magic), 0, 0, 0, 3), "big-endian"},
		{"huge tensor count", header(3, 1<<62, 0).b, "tensor count"},
		{"huge kv count", header(3, 0, math.MaxUint64).b, "metadata count"},
		{"huge key length", header(3, 0, 1).u64(1 << 60).bytes(16).b, "string length"},
		{"huge string value", header(3, 0, 1).str("k").u32(uint32(ValueString)).u64(1 << 40).bytes(16).b, `metadata "k"`},
		{"huge array", header(3, 0, 1).str("k").u32(uint32(ValueArray)).u32(uint32(ValueUint32)).u64(1 << 40).bytes(16).b, "array length"},
		{"huge string array", header(3, 0, 1).str("k").u32(uint32(ValueArray)).u32(uint32(ValueString)).u64(1 << 40).bytes(16).b, "array length"},
		{"nested array", header(3, 0, 1).str("k").u32(uint32(ValueArray)).u32(uint32(ValueArray)).u64(0).b, "arrays of arrays"},
		{"bad value type", header(3, 0, 1).str("k").u32(13).bytes(8).b, "unknown value type 13"},
		{"bad bool", header(3, 0, 1).str("k").u32(uint32(ValueBool)).bytes(0).b[:0:0], "truncated"},
		{"bool 2", append(header(3, 0, 1).str("k").u32(uint32(ValueBool)).b, 2), "neither 0 nor 1"},
		{"duplicate key", header(3, 0, 2).str("k").u32(uint32(ValueUint8)).bytes(1).str("k").u32(uint32(ValueUint8)).bytes(1).b, "twice"},
		{"alignment 3", header(3, 0, 1).str(AlignmentKey).u32(uint32(ValueUint32)).u32(3).b, "power of two"},
		{"alignment 0", header(3, 0, 1).str(AlignmentKey).u32(uint32(ValueUint32)).u32(0).b, "power of two"},
		{"alignment uint64", header(3, 0, 1).str(AlignmentKey).u32(uint32(ValueUint64)).u64(32).b, "want uint32"},
		{"rank 5", header(3, 1, 0).tensorInfo("t", 0, 0, 1, 1, 1, 1, 1).pad(4).b, "tensor t: gguf: malformed file: 5 dimensions"},
		{"rank 0", header(3, 1, 0).tensorInfo("t", 0, 0).pad(64).b, "0 dimensions"},
		{"zero dim", header(3, 1, 0).tensorInfo("t", 0, 0, 4, 0).pad(16).b, "tensor t: gguf: malformed file: dimension 1 is 0"},
		{"dims overflow", header(3, 1, 0).tensorInfo("t", 0, 0, 1<<32, 1<<32).pad(16).b, "overflows"},
		{"dims huge", header(3, 1, 0).tensorInfo("t", 0, 0, 1<<40).pad(16).b, "do not fit"},
		{"unknown type", header(3, 1, 0).tensorInfo("blk.0.w", 99, 0, 4).pad(16).b, "tensor blk.0.w: gguf: malformed file: unknown tensor type 99"},
		{"partial block", header(3, 1, 0).tensorInfo("t", uint32(TypeQ8_0), 0, 16).pad(34).b, "not a multiple of Q8_0's block size 32"},
		{"unaligned offset", header(3, 2, 0).tensorInfo("a", 0, 0, 1).tensorInfo("b", 0, 4, 1).pad(64).b, "not a multiple of the alignment"},
		{"offset past end", header(3, 1, 0).tensorInfo("t", 0, 1<<62, 4).pad(16).b, "past the end"},
		{"data past end", header(3, 1, 0).tensorInfo("t", 0, 32, 4).pad(40).b, "tensor t: data"},
		{"data truncated", valid[:len(valid)-(96-72)-1], "tensor w: data"}, // 72 bytes of data, padded to 96
		{"duplicate tensor", header(3, 2, 0).tensorInfo("t", 0, 0, 1).tensorInfo("t", 0, 32, 1).pad(64).b, "appears twice"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := NewFile(bytes.NewReader(tc.data), int64(len(tc.data)))
			runtime.ReadMemStats(&after)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnsupported) {
				t.Errorf("error %q wraps neither ErrMalformed nor ErrUnsupported", err)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
				t.Errorf("allocated %d bytes", n)
			}
		})
	}
	// Every truncation of a valid file fails cleanly.
	f, err := NewFile(bytes.NewReader(valid), int64(len(valid)))
	if err != nil {
		t.Fatal(err)
	}
	w, _ := f.Tensor("w")
	for n := range f.DataOffset + w.Offset + w.Size {
		if _, err := NewFile(bytes.NewReader(valid[:n]), n); err == nil {
			t.Fatalf("truncated to %d of %d bytes (data at %d): no error", n, len(valid), f.DataOffset)
		}
	}
}

func TestOpenMissing(t *testing.T) {
	if _, err := Open(t.TempDir() + "/none.gguf"); err == nil {
		t.Fatal("no error")
	}
}

// FuzzOpen parses arbitrary bytes; anything that parses is read back.
func FuzzOpen(f *testing.F) {
	f.Add(writeBytes(f, allValueKVs(), []tensorSpec{
		{name: "a", typ: TypeQ4_K, dims: []int64{256, 2}, rows: make([]float32, 512)},
		{name: "b", typ: TypeBF16, dims: []int64{3, 1, 2}, rows: make([]float32, 6)},
	}))
	f.Add(writeBytes(f, []KV{{Key: AlignmentKey, Value: uint32(8)}}, []tensorSpec{
		{name: "q", typ: TypeQ6_K, dims: []int64{256}, rows: make([]float32, 256)},
		{name: "r", typ: TypeQ5_K, dims: []int64{256}, rows: make([]float32, 256)},
		{name: "s", typ: TypeQ8_0, dims: []int64{32}, rows: make([]float32, 32)},
	}))
	f.Add(header(3, 1, 1).str("k").u32(uint32(ValueArray)).u32(uint32(ValueString)).u64(2).str("x").str("yz").tensorInfo("t", 1, 0, 2, 2).pad(8).b)
	f.Add(header(2, 1, 0).tensorInfo("t", uint32(TypeQ4_0), 0, 32).pad(18).b)
	f.Add(header(1, 0, 0).b)
	f.Fuzz(func(t *testing.T, data []byte) {
		gf, err := NewFile(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		m := gf.Metadata()
		for _, kv := range m.KVs() {
			m.String(kv.Key)
			m.Ints(kv.Key)
			m.Floats(kv.Key)
		}
		for _, ti := range gf.Tensors() {
			if ti.Size > 1<<20 {
				continue
			}
			if gf.DataOffset+ti.Offset+ti.Size > int64(len(data)) {
				t.Fatalf("tensor %s lies past the end", ti.Name)
			}
			if err := gf.ReadRawRows(ti, 0, 1, make([]byte, ti.RowBytes())); err != nil {
				t.Fatal(err)
			}
			if ti.Type.Supported() {
				if err := gf.ReadRows(ti, 0, 1, make([]float32, ti.RowLen())); err != nil {
					t.Fatal(err)
				}
			}
		}
	})
}
