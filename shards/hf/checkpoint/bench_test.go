package checkpoint

import (
	"os"
	"testing"
)

// TestWriteLlama32_1B writes the full 2.5 GB checkpoint when
// INFERMESH_WRITE_1B names a folder (a manual check of speed and memory).
func TestWriteLlama32_1B(t *testing.T) {
	dir := os.Getenv("INFERMESH_WRITE_1B")
	if dir == "" {
		t.Skip("set INFERMESH_WRITE_1B=folder to write Llama 3.2 1B's shapes")
	}
	if err := Write(dir, Llama32_1B(), nil, nil); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkWriteTiny(b *testing.B) {
	b.ReportAllocs()
	dir := b.TempDir()
	for b.Loop() {
		if err := Write(dir, Tiny(Qwen3), nil, nil); err != nil {
			b.Fatal(err)
		}
	}
}
