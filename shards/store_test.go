package shards_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
)

func TestFileStorePutGetVerify(t *testing.T) {
	st, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("weights of a block")
	c, err := st.Put(shards.CodecBlock, data)
	if err != nil {
		t.Fatal(err)
	}
	if want := shards.BlockCID(data); !c.Equals(want) {
		t.Fatalf("Put returned %s, want %s", c, want)
	}
	got, err := st.Get(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Get = %q, %v", got, err)
	}
	if ok, _ := st.Has(c); !ok {
		t.Fatal("Has = false after Put")
	}
	list, _ := st.List()
	if len(list) != 1 || !list[0].Equals(c) {
		t.Fatalf("List = %v", list)
	}

	// Flip one byte on disk: Get refuses it, naming the CID.
	path := st.Path(c)
	corrupt := bytes.Clone(data)
	corrupt[3] ^= 1
	if err := os.WriteFile(path, corrupt, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(c); !errors.Is(err, shards.ErrCorrupt) || !strings.Contains(err.Error(), c.String()) {
		t.Fatalf("flipped byte: err = %v, want ErrCorrupt naming %s", err, c)
	}
	// Truncated.
	if err := os.WriteFile(path, data[:5], 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(c); !errors.Is(err, shards.ErrCorrupt) {
		t.Fatalf("truncated: err = %v", err)
	}
	// The store stays usable: Put repairs nothing by itself (the name
	// exists), but Remove then Put does.
	if err := st.Remove(c); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(c); !errors.Is(err, shards.ErrNotFound) {
		t.Fatalf("after Remove: err = %v, want ErrNotFound", err)
	}
	if _, err := st.Put(shards.CodecBlock, data); err != nil {
		t.Fatal(err)
	}
	if got, err := st.Get(c); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after re-Put: %q, %v", got, err)
	}
}

func TestFileStoreAddRefusesWrongBytes(t *testing.T) {
	st, err := shards.OpenFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("the real block")
	c := shards.BlockCID(data)
	if err := st.Add(c, strings.NewReader("a lying provider")); !errors.Is(err, shards.ErrCorrupt) {
		t.Fatalf("Add of wrong bytes: err = %v, want ErrCorrupt", err)
	}
	if ok, _ := st.Has(c); ok {
		t.Fatal("wrong bytes were stored")
	}
	entries, _ := os.ReadDir(st.Dir())
	if len(entries) != 0 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
	if err := st.Add(c, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got, err := st.Get(c); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Get after Add = %q, %v", got, err)
	}
}

// The four refusals of the acceptance item 3, through the path a
// node takes: open the model, load its span.
func TestModelRefusesBadBlocks(t *testing.T) {
	rt := openRuntime(t)
	cases := []struct {
		name    string
		mangle  func(t *testing.T, m *shards.Model)
		wantErr error
		// the error must name block wantBlock and its CID
		wantBlock int
	}{
		{"flipped byte", func(t *testing.T, m *shards.Model) {
			path := blockPath(t, m, 0)
			b, _ := os.ReadFile(path)
			b[len(b)/2] ^= 0x40
			os.WriteFile(path, b, 0o644)
		}, shards.ErrCorrupt, 0},
		{"truncated block", func(t *testing.T, m *shards.Model) {
			path := blockPath(t, m, 1)
			b, _ := os.ReadFile(path)
			os.WriteFile(path, b[:len(b)-9], 0o644)
		}, shards.ErrCorrupt, 1},
		{"missing CID", func(t *testing.T, m *shards.Model) {
			os.Remove(blockPath(t, m, 1))
		}, shards.ErrNotFound, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := tinyModel(t, t.TempDir())
			tc.mangle(t, m)
			_, err := rt.LoadSpan(m, 0, 2)
			want := fmt.Sprintf("block %d", tc.wantBlock)
			if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), want) ||
				!strings.Contains(err.Error(), m.Manifest.Blocks[tc.wantBlock].CID) {
				t.Fatalf("err = %v, want %v naming %s and its CID", err, tc.wantErr, want)
			}
			if verr := m.Verify(); verr == nil {
				t.Fatal("Verify passed a damaged model")
			}
			t.Log(err)
		})
	}
}

func blockPath(t *testing.T, m *shards.Model, i int) string {
	t.Helper()
	c, err := shards.ParseCID(m.Manifest.Blocks[i].CID)
	if err != nil {
		t.Fatal(err)
	}
	return m.Store.Path(c)
}

// A block whose bytes match its CID but are not ONNX: the CID check passes,
// the parse does not, and the error says so.
func TestLoadRefusesNotONNX(t *testing.T) {
	rt := openRuntime(t)
	dir := t.TempDir()
	m := tinyModel(t, dir)
	junk := []byte("this is a text file, not an ONNX protobuf \x00\xff")
	man := *m.Manifest
	man.Blocks = append([]shards.BlockSpec(nil), m.Manifest.Blocks...)
	_, err := rt.LoadBlocks(&man, 0, 1, [][]byte{junk})
	if !errors.Is(err, shards.ErrCorrupt) {
		t.Fatalf("junk under another block's CID: err = %v, want ErrCorrupt", err)
	}
	man.Blocks[0].CID = shards.BlockCID(junk).String()
	man.Blocks[0].Size = int64(len(junk))
	_, err = rt.LoadBlocks(&man, 0, 1, [][]byte{junk})
	if !errors.Is(err, shards.ErrNotONNX) || !strings.Contains(err.Error(), man.Blocks[0].CID) {
		t.Fatalf("junk under its own CID: err = %v, want ErrNotONNX naming the CID", err)
	}
	// The model directory's own copy is untouched and still loads.
	span, err := rt.LoadSpan(m, 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	span.Close()
	if _, err := shards.OpenModel(filepath.Join(dir, "nope")); err == nil {
		t.Fatal("OpenModel of a folder without a manifest succeeded")
	}
}
