package shards

import (
	"crypto/sha256"
	"fmt"

	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"
)

// Codecs of the two kinds of content infermesh addresses. Blocks are opaque
// bytes (raw); manifests are JSON, so their CIDs say so and a peer can tell
// one from the other before fetching.
const (
	CodecBlock    = cid.Raw // 0x55
	CodecManifest = 0x0200  // multicodec "json"
)

// BlockCID is the CID of a block's bytes: CIDv1, raw codec, sha2-256.
func BlockCID(data []byte) cid.Cid { return sum(CodecBlock, data) }

// ManifestCID is the CID of a canonical manifest encoding: CIDv1, json codec,
// sha2-256. It is the model's ID.
func ManifestCID(canonical []byte) cid.Cid { return sum(CodecManifest, canonical) }

func sum(codec uint64, data []byte) cid.Cid {
	// crypto/sha256 directly: it uses the CPU's SHA extensions, and blocks
	// are hashed every time they are loaded.
	d := sha256.Sum256(data)
	h, err := mh.Encode(d[:], mh.SHA2_256)
	if err != nil {
		panic(err) // sha2-256 is always registered; an error here is a build bug
	}
	return cid.NewCidV1(codec, h)
}

// ParseCID parses a CID and checks that it is one infermesh produces: v1,
// sha2-256, and a raw or json codec.
func ParseCID(s string) (cid.Cid, error) {
	c, err := cid.Decode(s)
	if err != nil {
		return cid.Undef, fmt.Errorf("bad CID %q: %w", s, err)
	}
	if err := checkCID(c); err != nil {
		return cid.Undef, err
	}
	return c, nil
}

func checkCID(c cid.Cid) error {
	p := c.Prefix()
	if p.Version != 1 || p.MhType != mh.SHA2_256 || (p.Codec != CodecBlock && p.Codec != CodecManifest) {
		return fmt.Errorf("CID %s: want CIDv1 sha2-256 with raw or json codec", c)
	}
	return nil
}

// verify reports whether data hashes to c.
func verify(c cid.Cid, data []byte) bool {
	return sum(c.Prefix().Codec, data).Equals(c)
}
