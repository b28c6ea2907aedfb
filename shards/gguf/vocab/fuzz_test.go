package vocab_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards/gguf/vocab"
	"github.com/infermesh/infermesh/shards/text"
)

// FuzzConvert checks that any metadata either converts into files that
// shards/text loads and runs, or is refused with one of the package's
// errors; it never panics.
func FuzzConvert(f *testing.F) {
	f.Add("gpt2", "llama-bpe", "h e l o he ll hell hello <s>", "h e|l l|he ll|hell o", int64(9), true, "hello")
	f.Add("llama", "", "<unk> <s> </s> ▁h hi ▁hi ▁ h i", "", int64(1), true, "hi hi")
	f.Add("gpt2", "qwen2", "a b ab", "a b|b a", int64(-1), false, "abba")
	f.Fuzz(func(t *testing.T, model, pre, tokens, merges string, bos int64, addBOS bool, s string) {
		v := &vocab.Vocab{
			Model: model, Pre: pre,
			Tokens: strings.Fields(tokens),
			BOS:    bos, EOS: vocab.None, UNK: vocab.None, PAD: vocab.None,
			AddBOS: &addBOS,
		}
		if merges != "" {
			v.Merges = strings.Split(merges, "|")
		}
		if model == vocab.ModelLlama && merges == "" {
			for i := range v.Tokens {
				v.Scores = append(v.Scores, -float32(i))
			}
		}
		tj, cj, err := vocab.Convert(v)
		if err != nil {
			if !errors.Is(err, vocab.ErrUnsupported) && !errors.Is(err, vocab.ErrMalformed) {
				t.Fatalf("error outside the package's kinds: %v", err)
			}
			return
		}
		tok, err := text.Load(tj, cj)
		if err != nil {
			t.Fatalf("converted files do not load: %v\n%s", err, tj)
		}
		ids, err := tok.Encode(s, true)
		if err != nil {
			return // a regex time-out, say: not this package's concern
		}
		if _, err := tok.Decode(ids, false); err != nil {
			t.Fatalf("Decode(%v): %v", ids, err)
		}
	})
}
