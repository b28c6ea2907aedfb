package safetensors

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// f32Bytes encodes float32s little-endian.
func f32Bytes(v ...float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// tensorData pairs an Info with its bytes.
type tensorData struct {
	info Info
	data []byte
}

// writeFile writes a safetensors file with the Writer and returns its path.
func writeFile(tb testing.TB, dir, name string, meta map[string]string, ts ...tensorData) string {
	tb.Helper()
	path := filepath.Join(dir, name)
	infos := make([]Info, len(ts))
	for i, t := range ts {
		infos[i] = t.info
	}
	w, err := Create(path, infos, meta)
	if err != nil {
		tb.Fatal(err)
	}
	for _, t := range ts {
		if err := w.Write(t.info.Name, t.data); err != nil {
			tb.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		tb.Fatal(err)
	}
	return path
}

// rawFile writes a file from a header string and data, with the length
// prefix computed, and returns its path.
func rawFile(tb testing.TB, header string, data []byte) string {
	tb.Helper()
	b := make([]byte, 8, 8+len(header)+len(data))
	binary.LittleEndian.PutUint64(b, uint64(len(header)))
	b = append(append(b, header...), data...)
	path := filepath.Join(tb.TempDir(), "x.safetensors")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		tb.Fatal(err)
	}
	return path
}

func openT(tb testing.TB, path string) *Checkpoint {
	tb.Helper()
	c, err := OpenFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}
