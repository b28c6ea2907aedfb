package node

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// createIdentity writes a new Ed25519 key to path (mode 0600) and returns
// its peer ID. An existing key is never replaced: it is the node's
// identity in every peer's records.
func createIdentity(path string) (string, error) {
	if _, err := os.Stat(path); err == nil {
		k, err := loadIdentity(path)
		if err != nil {
			return "", err
		}
		id, _ := peer.IDFromPrivateKey(k)
		return id.String(), fmt.Errorf("%s already holds the identity of %s; remove it to make a new one", path, id)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return "", err
	}
	b, err := crypto.MarshalPrivateKey(k)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", err
	}
	id, err := peer.IDFromPrivateKey(k)
	return id.String(), err
}

// loadIdentity reads the node's key.
func loadIdentity(path string) (crypto.PrivKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no identity at %s: run `infermesh node init`", path)
	}
	if err != nil {
		return nil, err
	}
	k, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}
