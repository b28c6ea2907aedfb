package hf

import (
	"math"
	"path/filepath"
	"testing"

	"github.com/infermesh/infermesh/shards/gguf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
)

// TestGGUFQuantizedRowsExact: the Q4_0 and Q8_0 rows a GGUF source hands
// the importer, re-paired into MatMulNBits' layout, stand for exactly the
// values llama.cpp's dequantization gives (gguf.ReadRows), bit for bit,
// the converter's permuted query and key rows included.
func TestGGUFQuantizedRowsExact(t *testing.T) {
	cfg := checkpoint.Tiny(checkpoint.Llama)
	cfg.ExtraEOS = nil
	cfg.BOS, cfg.EOS = 256, 257
	tj := []byte(`{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}, "added_tokens": [{"id": 256, "content": "<s>", "special": true}, {"id": 257, "content": "</s>", "special": true}]}`)
	tc := []byte(`{"bos_token": "<s>", "eos_token": "</s>"}`)
	for _, typ := range []gguf.Type{gguf.TypeQ4_0, gguf.TypeQ8_0} {
		t.Run(typ.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "m.gguf")
			if err := checkpoint.WriteGGUF(path, cfg, checkpoint.GGUFTypes{Matrix: typ, Embedding: typ}, tj, tc); err != nil {
				t.Fatal(err)
			}
			f, err := gguf.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			c, _, err := ggufConfig(f)
			if err != nil {
				t.Fatal(err)
			}
			src, err := newGGUFSource(f, c)
			if err != nil {
				t.Fatal(err)
			}
			checked := 0
			for _, name := range src.Names() {
				q, ok := src.Quantized(name)
				if !ok {
					continue
				}
				shape, _ := src.Shape(name)
				rows, k := int(shape[0]), int(shape[1])
				packed := make([]byte, rows*q.rowBytes(k))
				scales := make([]float32, rows*k/q.Block)
				if err := src.ReadQuantizedRows(name, 0, rows, packed, scales); err != nil {
					t.Fatal(err)
				}
				want := make([]float32, rows*k)
				if err := src.ReadFloat32(name, 0, want); err != nil {
					t.Fatal(err)
				}
				got := make([]float32, k)
				for r := range rows {
					q.dequantizeRow(got, packed[r*q.rowBytes(k):(r+1)*q.rowBytes(k)], scales[r*k/q.Block:(r+1)*k/q.Block])
					for i, v := range got {
						if math.Float32bits(v) != math.Float32bits(want[r*k+i]) {
							t.Fatalf("%s row %d element %d: %g from the packed rows, %g dequantized", name, r, i, v, want[r*k+i])
						}
					}
				}
				checked++
			}
			if checked < 2*7 {
				t.Errorf("checked %d quantized tensors", checked)
			}
		})
	}
}
