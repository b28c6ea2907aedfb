package shards_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/infermesh/infermesh/shards"
)

// Issue 12, finding 11.4: RemoveTemp deletes what killed writes left, and
// nothing else.
func TestFileStoreRemoveTemp(t *testing.T) {
	s, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.Put(shards.CodecBlock, []byte("a block"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{".tmp-1", ".tmp-2345"} {
		if err := os.WriteFile(filepath.Join(s.Dir(), name), []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	other := filepath.Join(s.Dir(), "notes.txt")
	os.WriteFile(other, nil, 0o644)
	n, err := s.RemoveTemp()
	if err != nil || n != 2 {
		t.Fatalf("RemoveTemp = %d, %v; want 2, nil", n, err)
	}
	left, _ := filepath.Glob(filepath.Join(s.Dir(), ".tmp-*"))
	if len(left) != 0 {
		t.Errorf("left: %v", left)
	}
	if _, err := s.Get(c); err != nil {
		t.Errorf("the stored block: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("a file that is not a temporary one: %v", err)
	}
}
