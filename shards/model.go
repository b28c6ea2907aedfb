package shards

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/ipfs/go-cid"
)

// Layout of a model directory, as written by `infermesh shard build` and
// `shard split` and read by every command that takes DIR.
const (
	ManifestFile = "manifest.json" // the canonical manifest
	BlocksDir    = "blocks"        // a FileStore holding the blocks
	WholeFile    = "full.onnx"     // the unsplit model, when the tool that wrote DIR had it
)

// Model is a model directory opened for reading: its manifest, ID and block
// store.
type Model struct {
	Dir      string
	Manifest *Manifest
	ID       cid.Cid
	Store    *FileStore
}

// OpenModel reads and validates DIR/manifest.json and opens DIR/blocks. It
// does not check that the blocks are present: Block and Verify do.
func OpenModel(dir string) (*Model, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s is not a model directory: no %s", dir, ManifestFile)
	}
	if err != nil {
		return nil, err
	}
	m, err := DecodeManifest(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, ManifestFile), err)
	}
	id, err := m.ID()
	if err != nil {
		return nil, err
	}
	st, err := OpenFileStore(filepath.Join(dir, BlocksDir))
	if err != nil {
		return nil, err
	}
	return &Model{Dir: dir, Manifest: m, ID: id, Store: st}, nil
}

// Block returns the verified bytes of block i.
func (m *Model) Block(i int) ([]byte, error) {
	if i < 0 || i >= len(m.Manifest.Blocks) {
		return nil, fmt.Errorf("block %d out of range [0,%d)", i, len(m.Manifest.Blocks))
	}
	c, err := ParseCID(m.Manifest.Blocks[i].CID)
	if err != nil {
		return nil, err
	}
	data, err := m.Store.Get(c)
	if err != nil {
		return nil, fmt.Errorf("model %s block %d: %w", m.ID, i, err)
	}
	return data, nil
}

// File returns the verified bytes of the model's file called name (see
// Manifest.Files).
func (m *Model) File(name string) ([]byte, error) {
	f, ok := m.Manifest.File(name)
	if !ok {
		return nil, fmt.Errorf("model %s has no file %q", m.ID, name)
	}
	c, err := ParseCID(f.CID)
	if err != nil {
		return nil, err
	}
	data, err := m.Store.Get(c)
	if err != nil {
		return nil, fmt.Errorf("model %s file %s: %w", m.ID, name, err)
	}
	if int64(len(data)) != f.Size {
		return nil, fmt.Errorf("model %s file %s: %d bytes, manifest says %d", m.ID, name, len(data), f.Size)
	}
	return data, nil
}

// Verify checks that every block and file is present and matches its CID
// and size.
func (m *Model) Verify() error {
	var errs []error
	for _, f := range m.Manifest.Files {
		if _, err := m.File(f.Name); err != nil {
			errs = append(errs, err)
		}
	}
	for i, b := range m.Manifest.Blocks {
		data, err := m.Block(i)
		if err == nil && int64(len(data)) != b.Size {
			err = fmt.Errorf("model %s block %d (%s): %d bytes, manifest says %d", m.ID, i, b.CID, len(data), b.Size)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// WriteModel writes a model directory: each block into DIR/blocks, its CID
// and size filled into the manifest's BlockSpec, and DIR/manifest.json in
// canonical form. blocks[i] is the ONNX bytes of m.Blocks[i]. It returns the
// opened model.
func WriteModel(dir string, m *Manifest, blocks [][]byte) (*Model, error) {
	if len(blocks) != len(m.Blocks) {
		return nil, fmt.Errorf("write model: %d block specs but %d blocks", len(m.Blocks), len(blocks))
	}
	if m.Format == "" {
		m.Format = ManifestFormat
	}
	st, err := OpenFileStore(filepath.Join(dir, BlocksDir))
	if err != nil {
		return nil, err
	}
	for i, data := range blocks {
		c, err := st.Put(CodecBlock, data)
		if err != nil {
			return nil, err
		}
		m.Blocks[i].CID = c.String()
		m.Blocks[i].Size = int64(len(data))
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	enc, err := m.Encode()
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(dir, ManifestFile), enc); err != nil {
		return nil, err
	}
	return OpenModel(dir)
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
