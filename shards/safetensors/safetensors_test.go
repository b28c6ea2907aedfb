package safetensors

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestGolden checks the exact bytes of a tiny file, as the reference
// implementation lays it out: metadata first, the header padded with spaces
// to 8 bytes, then the data.
func TestGolden(t *testing.T) {
	hdr := `{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   `
	want := append([]byte{88, 0, 0, 0, 0, 0, 0, 0}, hdr...)
	want = append(want, 0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0) // 1.0, -2.0
	dir := t.TempDir()
	path := writeFile(t, dir, "g.safetensors", map[string]string{"format": "pt"},
		tensorData{Info{Name: "a", DType: "F32", Shape: []int64{2}}, f32Bytes(1, -2)})
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("file bytes\n got %q\nwant %q", got, want)
	}
	c := openT(t, path)
	v, err := c.Float32("a")
	if err != nil || !reflect.DeepEqual(v, []float32{1, -2}) {
		t.Fatalf("Float32(a) = %v, %v", v, err)
	}
	if m := c.Metadata(); !reflect.DeepEqual(m, map[string]string{"format": "pt"}) {
		t.Fatalf("Metadata = %v", m)
	}
}

func TestRoundTrip(t *testing.T) {
	bf := []byte{0x80, 0x3f, 0x00, 0xc0, 0x49, 0x40}  // 1, -2, 3.140625
	f16 := []byte{0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00} // 1, -2, 2^-24
	ts := []tensorData{
		{Info{Name: "z.f32", DType: "F32", Shape: []int64{2, 2}}, f32Bytes(1, 2, 3, 4)},
		{Info{Name: "b.bf16", DType: "BF16", Shape: []int64{3}}, bf},
		{Info{Name: "a.f16", DType: "F16", Shape: []int64{1, 3}}, f16},
		{Info{Name: "empty", DType: "F32", Shape: []int64{0, 5}}, nil},
		{Info{Name: "scalar", DType: "I64", Shape: []int64{}}, []byte{7, 0, 0, 0, 0, 0, 0, 0}},
		{Info{Name: "mask", DType: "BOOL", Shape: []int64{3}}, []byte{1, 0, 1}},
	}
	path := writeFile(t, t.TempDir(), "rt.safetensors", nil, ts...)
	c := openT(t, path)
	if got, want := c.Names(), []string{"a.f16", "b.bf16", "empty", "mask", "scalar", "z.f32"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Names = %v, want %v", got, want)
	}
	if c.Metadata() != nil {
		t.Fatalf("Metadata = %v, want nil", c.Metadata())
	}
	for _, td := range ts {
		in, ok := c.Info(td.info.Name)
		want := td.info
		want.Size = int64(len(td.data))
		if !ok || in.Name != want.Name || in.DType != want.DType || in.Size != want.Size || len(in.Shape) != len(want.Shape) {
			t.Fatalf("Info(%s) = %+v, %v; want %+v", td.info.Name, in, ok, want)
		}
		raw, err := c.Raw(td.info.Name)
		if err != nil || !bytes.Equal(raw, td.data) {
			t.Fatalf("Raw(%s) = %v, %v", td.info.Name, raw, err)
		}
		r, rin, err := c.Reader(td.info.Name)
		if err != nil || rin.Size != want.Size {
			t.Fatalf("Reader(%s): %+v %v", td.info.Name, rin, err)
		}
		streamed, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(streamed, td.data) {
			t.Fatalf("Reader(%s) gave %v, %v", td.info.Name, streamed, err)
		}
	}
	for name, want := range map[string][]float32{
		"z.f32": {1, 2, 3, 4}, "b.bf16": {1, -2, 3.140625}, "a.f16": {1, -2, 1.0 / (1 << 24)}, "empty": {},
	} {
		got, err := c.Float32(name)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("Float32(%s) = %v, %v; want %v", name, got, err, want)
		}
	}
	if _, err := c.Float32("scalar"); err == nil {
		t.Error("Float32 of an I64 tensor succeeded")
	}
	if _, err := c.Raw("nope"); !errors.Is(err, ErrNoTensor) {
		t.Errorf("Raw(nope) = %v, want ErrNoTensor", err)
	}
	if _, ok := c.Info("nope"); ok {
		t.Error("Info(nope) found")
	}
	// The returned shape is a copy.
	in, _ := c.Info("z.f32")
	in.Shape[0] = 99
	if in2, _ := c.Info("z.f32"); in2.Shape[0] != 2 {
		t.Error("Info's shape aliases the checkpoint's")
	}
}

func TestMalformed(t *testing.T) {
	const ok8 = `"data_offsets":[0,8]`
	data8 := make([]byte, 8)
	for _, c := range []struct {
		name, header string
		data         []byte
		want         string
	}{
		{"not json", `{"a":`, nil, "header JSON"},
		{"not an object", `[1,2]`, nil, "not a JSON object"},
		{"trailing", `{} {}`, nil, "trailing bytes"},
		{"not utf8", "{\"\xff\":1}", nil, "UTF-8"},
		{"duplicate key", `{"a":{"dtype":"F32","shape":[2],` + ok8 + `},"a":{"dtype":"F32","shape":[2],` + ok8 + `}}`, data8, `"a" appears twice`},
		{"unknown dtype", `{"a":{"dtype":"F31","shape":[2],` + ok8 + `}}`, data8, `tensor "a": unknown dtype "F31"`},
		{"missing shape", `{"a":{"dtype":"F32",` + ok8 + `}}`, data8, `tensor "a": needs dtype`},
		{"tensor not an object", `{"a":7}`, nil, `tensor "a"`},
		{"negative dim", `{"a":{"dtype":"F32","shape":[-2],` + ok8 + `}}`, data8, "negative dimension"},
		{"shape overflow", `{"a":{"dtype":"F32","shape":[4294967296,4294967296],` + ok8 + `}}`, data8, "overflows"},
		{"fractional dim", `{"a":{"dtype":"F32","shape":[2.5],` + ok8 + `}}`, data8, `tensor "a"`},
		{"three offsets", `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}`, data8, "data_offsets"},
		{"begin after end", `{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}`, data8, "data_offsets"},
		{"span mismatch", `{"a":{"dtype":"F32","shape":[3],` + ok8 + `}}`, data8, "span 8"},
		{"past data", `{"a":{"dtype":"F32","shape":[2],` + ok8 + `}}`, data8[:4], "runs past the data section"},
		{"overlap", `{"a":{"dtype":"F32","shape":[2],` + ok8 + `},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, data8, "overlaps"},
		{"hole", `{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, data8, "hole"},
		{"trailing data", `{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, data8, "tensors cover 4"},
		{"metadata not strings", `{"__metadata__":{"n":1}}`, nil, "__metadata__"},
		{"empty name", `{"":{"dtype":"F32","shape":[2],` + ok8 + `}}`, data8, "empty name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := rawFile(t, c.header, c.data)
			_, err := OpenFile(path)
			if err == nil {
				t.Fatal("opened")
			}
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q: want ErrMalformed mentioning %q and the file", err, c.want)
			}
		})
	}
}

func TestMalformedLength(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		file []byte
		want string
	}{
		{"short", []byte{1, 2, 3}, "too short"},
		{"beyond limit", binary.LittleEndian.AppendUint64(nil, MaxHeaderSize+1), "exceeds the limit"},
		{"past eof", append(binary.LittleEndian.AppendUint64(nil, 100), "{}"...), "past the end"},
		{"huge", binary.LittleEndian.AppendUint64(nil, 1<<63), "exceeds the limit"},
	} {
		path := filepath.Join(dir, c.name)
		if err := os.WriteFile(path, c.file, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := OpenFile(path)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want ErrMalformed mentioning %q", c.name, err, c.want)
		}
	}
	if _, err := OpenFile(filepath.Join(dir, "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("absent file: %v", err)
	}
}

// TestEmptyFile checks a file with no tensors (header "{}") is valid.
func TestEmptyFile(t *testing.T) {
	c := openT(t, rawFile(t, `{}      `, nil))
	if len(c.Names()) != 0 {
		t.Fatal(c.Names())
	}
}

// TestUnorderedOffsets checks a file whose header lists tensors out of data
// order (the reference writer orders by dtype) reads right.
func TestUnorderedOffsets(t *testing.T) {
	path := rawFile(t, `{"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, []byte{1, 2, 3})
	c := openT(t, path)
	a, _ := c.Raw("a")
	b, _ := c.Raw("b")
	if !bytes.Equal(a, []byte{1, 2}) || !bytes.Equal(b, []byte{3}) {
		t.Fatalf("a=%v b=%v", a, b)
	}
}

func TestWriterErrors(t *testing.T) {
	dir := t.TempDir()
	infos := []Info{{Name: "a", DType: "U8", Shape: []int64{2}}, {Name: "b", DType: "F32", Shape: []int64{1}}}
	path := filepath.Join(dir, "w.safetensors")

	w, err := Create(path, infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write("b", f32Bytes(1)); err == nil || !strings.Contains(err.Error(), `"a" comes next`) {
		t.Errorf("out of order: %v", err)
	}
	if err := w.Write("a", []byte{1}); err == nil || !strings.Contains(err.Error(), "is 2 bytes, got 1") {
		t.Errorf("wrong size: %v", err)
	}
	if err := w.Write("a", []byte{1, 2}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err == nil || !strings.Contains(err.Error(), `next "b"`) {
		t.Errorf("Close with a tensor missing: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("incomplete file left behind: %v", err)
	}

	w, err = Create(path, infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteFrom("a", bytes.NewReader([]byte{1})); err == nil {
		t.Error("WriteFrom with a short reader succeeded")
	}
	w.Close()

	w, err = Create(path, infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteFrom("a", bytes.NewReader([]byte{1, 2, 3})); err == nil {
		t.Error("WriteFrom with a long reader succeeded")
	}
	w.Close()

	w, err = Create(path, infos, map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteFrom("a", bytes.NewReader([]byte{1, 2})); err != nil {
		t.Fatal(err)
	}
	if err := w.Write("b", f32Bytes(5)); err != nil {
		t.Fatal(err)
	}
	if err := w.Write("c", nil); err == nil {
		t.Error("write past the last tensor succeeded")
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	c := openT(t, path)
	if v, _ := c.Float32("b"); len(v) != 1 || v[0] != 5 {
		t.Errorf("b = %v", v)
	}

	for _, bad := range [][]Info{
		{{Name: "a", DType: "Q4", Shape: []int64{1}}},
		{{Name: "a", DType: "U8", Shape: []int64{-1}}},
		{{Name: "a", DType: "U8", Shape: []int64{2}, Size: 3}},
		{{Name: "a", DType: "U8"}, {Name: "a", DType: "U8"}},
		{{Name: "", DType: "U8"}},
		{{Name: "__metadata__", DType: "U8"}},
	} {
		if _, err := Create(filepath.Join(dir, "bad"), bad, nil); err == nil {
			t.Errorf("Create(%+v) succeeded", bad)
		}
	}
}

// writeSharded writes a two-shard checkpoint with its index into dir.
func writeSharded(t *testing.T, dir string, index string) {
	t.Helper()
	writeFile(t, dir, "model-00001-of-00002.safetensors", map[string]string{"format": "pt"},
		tensorData{Info{Name: "x", DType: "F32", Shape: []int64{1}}, f32Bytes(1)},
		tensorData{Info{Name: "y", DType: "F32", Shape: []int64{1}}, f32Bytes(2)})
	writeFile(t, dir, "model-00002-of-00002.safetensors", map[string]string{"format": "pt", "other": "o"},
		tensorData{Info{Name: "z", DType: "F32", Shape: []int64{1}}, f32Bytes(3)})
	if err := os.WriteFile(filepath.Join(dir, IndexFile), []byte(index), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestSharded(t *testing.T) {
	dir := t.TempDir()
	writeSharded(t, dir, `{"metadata":{"total_size":12},"weight_map":{
		"x":"model-00001-of-00002.safetensors","y":"model-00001-of-00002.safetensors",
		"z":"model-00002-of-00002.safetensors"}}`)
	c, err := OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.Names(); !reflect.DeepEqual(got, []string{"x", "y", "z"}) {
		t.Fatalf("Names = %v", got)
	}
	for name, want := range map[string]float32{"x": 1, "y": 2, "z": 3} {
		if v, err := c.Float32(name); err != nil || v[0] != want {
			t.Errorf("%s = %v, %v", name, v, err)
		}
	}
	if m := c.Metadata(); !reflect.DeepEqual(m, map[string]string{"format": "pt", "other": "o"}) {
		t.Errorf("Metadata = %v", m)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// A single-file folder.
	single := t.TempDir()
	writeFile(t, single, SingleFile, nil, tensorData{Info{Name: "w", DType: "U8", Shape: []int64{1}}, []byte{9}})
	c2, err := OpenCheckpoint(single)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got := c2.Names(); !reflect.DeepEqual(got, []string{"w"}) {
		t.Fatalf("Names = %v", got)
	}
	if _, err := OpenCheckpoint(t.TempDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("empty folder: %v", err)
	}
}

func TestShardedMalformed(t *testing.T) {
	for _, c := range []struct{ name, index, want string }{
		{"not json", `{"weight_map":`, "safetensors.index.json"},
		{"no weight_map", `{"metadata":{}}`, "weight_map is missing"},
		{"missing file", `{"weight_map":{"x":"model-00003-of-00002.safetensors"}}`, "no such file"},
		{"wrong file", `{"weight_map":{"x":"model-00002-of-00002.safetensors"}}`, `tensor "x" is mapped to model-00002-of-00002.safetensors, which does not hold it`},
		{"path traversal", `{"weight_map":{"x":"../model-00001-of-00002.safetensors"}}`, "not a file name"},
		{"absolute", `{"weight_map":{"x":"/etc/passwd"}}`, "not a file name"},
		{"dot", `{"weight_map":{"x":"."}}`, "not a file name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			writeSharded(t, dir, c.index)
			_, err := OpenCheckpoint(dir)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one mentioning %q", err, c.want)
			}
		})
	}
	// A malformed shard names the shard.
	dir := t.TempDir()
	writeSharded(t, dir, `{"weight_map":{"x":"model-00001-of-00002.safetensors","z":"model-00002-of-00002.safetensors"}}`)
	if err := os.Truncate(filepath.Join(dir, "model-00002-of-00002.safetensors"), 20); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenCheckpoint(dir); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "model-00002-of-00002.safetensors") {
		t.Fatalf("truncated shard: %v", err)
	}
}
