package shards_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
)

func TestManifestCanonicalRoundTrip(t *testing.T) {
	m := tinyModel(t, t.TempDir()).Manifest
	enc, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	back, err := shards.DecodeManifest(enc)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := back.Encode()
	if !bytes.Equal(enc, again) {
		t.Fatalf("re-encoding changed the bytes:\n%s\n%s", enc, again)
	}
	// Whitespace does not change the ID: it is the CID of the canonical form.
	var pretty bytes.Buffer
	pretty.WriteString("  \n")
	pretty.Write(enc)
	pretty.WriteString("\n")
	p, err := shards.DecodeManifest(pretty.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	id1, _ := m.ID()
	id2, _ := p.ID()
	if !id1.Equals(id2) || id1.Prefix().Codec != shards.CodecManifest {
		t.Fatalf("IDs %s and %s", id1, id2)
	}
	if !strings.Contains(string(enc), `"shape":["batch",2]`) {
		t.Fatalf("symbolic and fixed dims not encoded as string and number: %s", enc)
	}
}

func TestManifestCrossing(t *testing.T) {
	m := tinyModel(t, t.TempDir()).Manifest
	cross := m.Crossing(0)
	if len(cross) != 1 || cross[0].Name != "y" {
		t.Fatalf("Crossing(0) = %v, want [y]", cross)
	}
	if in := m.SpanInputs(1); len(in) != 1 || in[0].Name != "y" {
		t.Fatalf("SpanInputs(1) = %v", in)
	}
	if out := m.SpanOutputs(2); len(out) != 2 || out[0].Name != "z" {
		t.Fatalf("SpanOutputs(2) = %v", out)
	}
}

func TestDecodeManifestRefuses(t *testing.T) {
	good, err := tinyModel(t, t.TempDir()).Manifest.Encode()
	if err != nil {
		t.Fatal(err)
	}
	s := string(good)
	cases := map[string]string{
		"not json":        "model",
		"unknown field":   strings.Replace(s, `"name":`, `"extra":1,"name":`, 1),
		"wrong format":    strings.Replace(s, shards.ManifestFormat, "other/1", 1),
		"bad cid":         strings.Replace(s, `"cid":"bafk`, `"cid":"xafk`, 1),
		"unproduced":      strings.Replace(s, `"inputs":[{"name":"y"`, `"inputs":[{"name":"w"`, 1),
		"uppercase cid":   strings.Replace(s, `"cid":"bafk`, `"cid":"BAFK`, 1),
		"untyped output":  strings.Replace(s, `{"name":"z","dtype":"float32","shape":["batch",2]},{"name":"rows"`, `{"name":"z"},{"name":"rows"`, 1),
		"bad dtype":       strings.Replace(s, `"dtype":"float32"`, `"dtype":"complex64"`, 1),
		"trailing data":   s + `{}`,
		"no blocks":       strings.Replace(s, s[strings.Index(s, `"blocks":`):], `"blocks":[]}`, 1),
		"manifest as cid": strings.Replace(s, `"cid":"bafk`, `"cid":"bagaai`, 1),
	}
	for name, in := range cases {
		if in == s {
			t.Fatalf("%s: case did not change the manifest", name)
		}
		if _, err := shards.DecodeManifest([]byte(in)); !errors.Is(err, shards.ErrBadManifest) {
			t.Errorf("%s: err = %v, want ErrBadManifest", name, err)
		}
	}
}

func FuzzDecodeManifest(f *testing.F) {
	m := &shards.Manifest{Format: shards.ManifestFormat, Name: "f",
		Inputs:  []shards.TensorSpec{{Name: "x", DType: 1, Shape: []shards.Dim{{Param: "b"}, {Size: 2}}}},
		Outputs: []shards.TensorSpec{{Name: "x", DType: 1}},
		Blocks:  []shards.BlockSpec{{CID: shards.BlockCID([]byte("b")).String(), Size: 1}}}
	enc, _ := m.Encode()
	f.Add(enc)
	f.Add([]byte(`{"format":"infermesh/model/1","blocks":[{}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := shards.DecodeManifest(b)
		if err != nil {
			return
		}
		// Whatever decodes must re-encode to something that decodes the same.
		enc, err := m.Encode()
		if err != nil {
			t.Fatal(err)
		}
		m2, err := shards.DecodeManifest(enc)
		if err != nil {
			t.Fatalf("re-decoding %s: %v", enc, err)
		}
		enc2, _ := m2.Encode()
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("not canonical: %s vs %s", enc, enc2)
		}
		for i := range m.Blocks {
			m.Crossing(i)
		}
	})
}

// ResidentBytes scales the blocks' file sizes by how their weights are
// stored, and clamps the range to the model's blocks.
func TestResidentBytes(t *testing.T) {
	m := &shards.Manifest{Blocks: []shards.BlockSpec{{Size: 100}, {Size: 200}, {Size: 300}}}
	cases := []struct {
		info *shards.ModelInfo
		want int64 // for blocks 1-2 (500 bytes of file)
	}{
		{nil, 950},
		{&shards.ModelInfo{DType: "float32"}, 950},
		{&shards.ModelInfo{DType: "float16"}, 1450},
		{&shards.ModelInfo{DType: "float16", Quantization: "q8/32"}, 1100},
		{&shards.ModelInfo{DType: "float32", Quantization: "q4/128"}, 1200},
	}
	for _, c := range cases {
		m.Info = c.info
		if got := m.ResidentBytes(1, 3); got != c.want {
			t.Errorf("%+v: %d, want %d", c.info, got, c.want)
		}
	}
	m.Info = nil
	if got := m.ResidentBytes(-1, 10); got != 1140 {
		t.Errorf("all blocks, range clamped: %d, want 1140", got)
	}
	if got := m.ResidentBytes(2, 1); got != 0 {
		t.Errorf("empty range: %d", got)
	}
}
