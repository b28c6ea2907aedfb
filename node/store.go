package node

import (
	"errors"
	"fmt"
	"io"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/shards"
)

// stores is what a node serves blocks from: its own store (DATA/blocks,
// where fetched blocks go) and the block folders of local models given with
// --serve. Writes go to the first.
type stores []shards.Store

var _ shards.Store = stores(nil)

func (s stores) Put(codec uint64, data []byte) (cid.Cid, error) { return s[0].Put(codec, data) }
func (s stores) Add(c cid.Cid, r io.Reader) error               { return s[0].Add(c, r) }
func (s stores) Remove(c cid.Cid) error                         { return s[0].Remove(c) }

func (s stores) Get(c cid.Cid) ([]byte, error) {
	var errs []error
	for _, st := range s {
		data, err := st.Get(c)
		if err == nil {
			return data, nil
		}
		if !errors.Is(err, shards.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return nil, fmt.Errorf("%s: %w", c, shards.ErrNotFound)
}

func (s stores) Has(c cid.Cid) (bool, error) {
	for _, st := range s {
		if ok, _ := st.Has(c); ok {
			return true, nil
		}
	}
	return false, nil
}

func (s stores) List() ([]cid.Cid, error) {
	var out []cid.Cid
	for _, st := range s {
		l, err := st.List()
		if err != nil {
			return nil, err
		}
		out = append(out, l...)
	}
	return out, nil
}
