package shards_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/shards"
)

// SetAdmit sees every write's CID and size before the content is in
// place, and a refusal leaves nothing behind (no block, no temporary file).
func TestFileStoreAdmit(t *testing.T) {
	s, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	full := errors.New("full")
	var seen []int64
	s.SetAdmit(func(c cid.Cid, size int64) error {
		seen = append(seen, size)
		if size > 10 {
			return full
		}
		return nil
	})
	small, err := s.Put(shards.CodecBlock, []byte("0123456789"))
	if err != nil {
		t.Fatal(err)
	}
	big := []byte("0123456789ab")
	bigCID := shards.BlockCID(big)
	if err := s.Add(bigCID, bytes.NewReader(big)); !errors.Is(err, full) {
		t.Fatalf("Add over the limit: %v, want the admit error", err)
	}
	if _, err := s.Put(shards.CodecBlock, big); !errors.Is(err, full) {
		t.Fatalf("Put over the limit: %v, want the admit error", err)
	}
	if len(seen) != 3 || seen[0] != 10 || seen[1] != 12 || seen[2] != 12 {
		t.Fatalf("admit saw sizes %v, want [10 12 12]", seen)
	}
	if ok, _ := s.Has(bigCID); ok {
		t.Fatal("a refused block is in the store")
	}
	if ok, _ := s.Has(small); !ok {
		t.Fatal("an admitted block is not in the store")
	}
	entries, _ := os.ReadDir(s.Dir())
	if len(entries) != 1 || entries[0].Name() != filepath.Base(s.Path(small)) {
		t.Fatalf("store holds %v, want the admitted block alone", entries)
	}
}
