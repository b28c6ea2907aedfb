package shards

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"
)

// Store is a content-addressed store of blocks and manifests. Every read is
// verified against the CID it was asked for. Implementations are safe for
// concurrent use.
type Store interface {
	// Put stores data under the CID of the given codec (CodecBlock or
	// CodecManifest) and returns that CID.
	Put(codec uint64, data []byte) (cid.Cid, error)
	// Add streams content expected to hash to c into the store. Nothing is
	// stored unless the bytes match c: a mismatch returns ErrCorrupt.
	Add(c cid.Cid, r io.Reader) error
	// Get returns the verified bytes of c, ErrNotFound, or ErrCorrupt.
	Get(c cid.Cid) ([]byte, error)
	// Has reports whether c is stored (without verifying it).
	Has(c cid.Cid) (bool, error)
	// Remove deletes c; removing an absent CID is not an error.
	Remove(c cid.Cid) error
	// List returns every stored CID.
	List() ([]cid.Cid, error)
}

// Errors of a Store. They are wrapped with the CID concerned.
var (
	ErrNotFound = errors.New("not in store")
	ErrCorrupt  = errors.New("content does not match its CID")
)

// FileStore is a Store in a folder: one file per CID, named by the CID's
// string form. Writes go to a temporary file that is renamed into place only
// once complete and verified. Files are not fsynced: every read is verified
// against its CID, so a block torn by a power cut is found corrupt and
// fetched again; syncing each block slowed a 100 MB transfer by 10-25%.
type FileStore struct {
	dir   string
	admit func(c cid.Cid, size int64) error // see SetAdmit; nil admits all
}

var _ Store = (*FileStore)(nil)

// OpenFileStore opens (creating if needed) a store in dir.
func OpenFileStore(dir string) (*FileStore, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("block store: %w", err)
	}
	return &FileStore{dir: dir}, nil
}

// Dir is the store's folder.
func (s *FileStore) Dir() string { return s.dir }

// SetAdmit installs admit, which every write calls once the new content
// is complete (and, for Add, verified), before it is put in place, with its
// CID and size in bytes: an error refuses the write (the content is
// dropped, and Put or Add returns the error wrapped). A store with a size
// cap makes room there. Call it before the store is used; nil admits every
// write. admit must be safe for concurrent use.
func (s *FileStore) SetAdmit(admit func(c cid.Cid, size int64) error) { s.admit = admit }

// Path is where c is (or would be) stored. Callers that load from a path
// must still verify, or use Get.
func (s *FileStore) Path(c cid.Cid) string { return filepath.Join(s.dir, c.String()) }

// Put implements Store.
func (s *FileStore) Put(codec uint64, data []byte) (cid.Cid, error) {
	c := sum(codec, data)
	if ok, _ := s.Has(c); ok {
		return c, nil
	}
	return c, s.write(c, func(w io.Writer) error { _, err := w.Write(data); return err })
}

// Add implements Store.
func (s *FileStore) Add(c cid.Cid, r io.Reader) error {
	if err := checkCID(c); err != nil {
		return err
	}
	return s.write(c, func(w io.Writer) error {
		h := sha256.New()
		if _, err := io.Copy(io.MultiWriter(w, h), r); err != nil {
			return err
		}
		got, _ := mh.Encode(h.Sum(nil), mh.SHA2_256)
		if !cid.NewCidV1(c.Prefix().Codec, got).Equals(c) {
			return fmt.Errorf("%s: %w", c, ErrCorrupt)
		}
		return nil
	})
}

// tempPattern names the files a write fills before renaming them into
// place.
const tempPattern = ".tmp-*"

// RemoveTemp deletes the temporary files writes left behind when their
// process was killed mid-transfer, and returns how many it removed. Only
// the store's sole user may call it, before it writes (a node holding its
// data directory's lock, on its own store): another process's write in
// progress would lose its file.
func (s *FileStore) RemoveTemp() (int, error) {
	tmps, err := filepath.Glob(filepath.Join(s.dir, tempPattern))
	if err != nil {
		return 0, err
	}
	removed := 0
	var errs []error
	for _, p := range tmps {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		removed++
	}
	return removed, errors.Join(errs...)
}

func (s *FileStore) write(c cid.Cid, fill func(io.Writer) error) error {
	f, err := os.CreateTemp(s.dir, tempPattern)
	if err != nil {
		return fmt.Errorf("block store: %w", err)
	}
	tmp := f.Name()
	cw := &countWriter{w: f}
	err = fill(cw)
	if err == nil {
		err = f.Chmod(0o644) // CreateTemp makes 0600; blocks are not secret
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && s.admit != nil {
		err = s.admit(c, cw.n)
	}
	if err == nil {
		err = os.Rename(tmp, s.Path(c))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("block store: put %s: %w", c, err)
	}
	return nil
}

// countWriter counts the bytes written through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Get implements Store.
func (s *FileStore) Get(c cid.Cid) ([]byte, error) {
	data, err := os.ReadFile(s.Path(c))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", c, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("block store: %w", err)
	}
	if !verify(c, data) {
		return nil, fmt.Errorf("%s (%d bytes in %s): %w", c, len(data), s.dir, ErrCorrupt)
	}
	return data, nil
}

// Has implements Store.
func (s *FileStore) Has(c cid.Cid) (bool, error) {
	_, err := os.Stat(s.Path(c))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// Remove implements Store.
func (s *FileStore) Remove(c cid.Cid) error {
	err := os.Remove(s.Path(c))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// List implements Store. Files that are not named by a CID are ignored.
func (s *FileStore) List() ([]cid.Cid, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []cid.Cid
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if c, err := cid.Decode(e.Name()); err == nil {
			out = append(out, c)
		}
	}
	return out, nil
}

// Quarantine moves the file of c out of the store into dir (created if
// needed), named by the CID and the time, so that a copy that failed
// verification is kept for a look but never read again. It returns where
// the file went; a store without c returns "" and no error.
func (s *FileStore) Quarantine(c cid.Cid, dir string) (string, error) {
	if ok, _ := s.Has(c); !ok {
		return "", nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("quarantine: %w", err)
	}
	to := filepath.Join(dir, fmt.Sprintf("%s.%d", c, time.Now().UnixNano()))
	if err := os.Rename(s.Path(c), to); err != nil {
		return "", fmt.Errorf("quarantine: %w", err)
	}
	return to, nil
}
