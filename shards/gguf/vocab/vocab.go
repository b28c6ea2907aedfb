package vocab

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"
)

// Token types, as tokenizer.ggml.token_type stores them (llama.cpp's
// llama_token_type). Zero (undefined) is read as normal.
const (
	TypeUndefined   = 0
	TypeNormal      = 1
	TypeUnknown     = 2 // the unknown token (<unk>)
	TypeControl     = 3 // special tokens (<s>, <|im_start|>): added tokens marked special
	TypeUserDefined = 4 // added tokens that are not special (<think> in Qwen3)
	TypeUnused      = 5 // padding entries ([PAD151669])
	TypeByte        = 6 // SentencePiece byte tokens <0x00> .. <0xFF>
)

// None is the value of a special-token id field that the file does not set.
const None int64 = -1

// Tokenizer models (tokenizer.ggml.model) that Convert supports.
const (
	ModelGPT2  = "gpt2"  // byte-level BPE (Llama 3, Qwen2, Qwen3, GPT-2, SmolLM)
	ModelLlama = "llama" // SentencePiece BPE with byte fallback (Llama 2, Mistral v0.1, TinyLlama)
)

// ErrUnsupported is returned (wrapped, naming the model or pre-tokenizer
// and listing the supported ones) by Convert for a tokenizer model or a
// pre-tokenizer it cannot express as tokenizer.json.
var ErrUnsupported = errors.New("unsupported GGUF tokenizer")

// ErrMalformed is returned (wrapped, saying what is wrong) by Convert for
// metadata that does not describe a usable vocabulary: arrays of different
// lengths, duplicate or empty tokens, merges naming unknown tokens, special
// token ids out of range.
var ErrMalformed = errors.New("malformed GGUF vocabulary")

// Vocab is a GGUF file's tokenizer metadata: the tokenizer.ggml.* keys and
// tokenizer.chat_template. Slices are read, never modified.
type Vocab struct {
	// Model is tokenizer.ggml.model: "gpt2" or "llama" (see ModelGPT2,
	// ModelLlama); anything else is refused.
	Model string
	// Pre is tokenizer.ggml.pre, the name of the pre-tokenizer (the split
	// regexes) of a "gpt2" model: see Supported. Empty means absent, which
	// llama.cpp reads as "default". A "llama" model ignores it, as llama.cpp
	// does.
	Pre string

	// Tokens is tokenizer.ggml.tokens: the token strings by id, byte-level
	// encoded for "gpt2" (Ġ for a space), ▁ for a space for "llama".
	Tokens []string
	// Types is tokenizer.ggml.token_type, one per token (Type* constants);
	// nil means all normal.
	Types []int32
	// Scores is tokenizer.ggml.scores, one per token; a "llama" model's
	// merges are derived from them. nil means absent.
	Scores []float32
	// Merges is tokenizer.ggml.merges, "left right" by rank; required for
	// "gpt2". A "llama" model uses them only when Scores is nil.
	Merges []string

	// Special token ids: tokenizer.ggml.bos_token_id, eos_token_id,
	// unknown_token_id and padding_token_id; None (-1) when absent. An
	// absent one of a "llama" model takes llama.cpp's default (BOS 1, EOS 2,
	// UNK 0) when the vocabulary is that large.
	BOS, EOS, UNK, PAD int64

	// AddBOS, AddEOS and AddSpacePrefix are tokenizer.ggml.add_bos_token,
	// add_eos_token and add_space_prefix; nil when absent, which takes
	// llama.cpp's default: AddBOS true for "llama" and the Llama 3
	// pre-tokenizers, false otherwise; AddEOS false; AddSpacePrefix true for
	// "llama". A "gpt2" model ignores AddSpacePrefix, as llama.cpp does.
	AddBOS, AddEOS, AddSpacePrefix *bool

	// ChatTemplate is tokenizer.chat_template ("" when absent).
	ChatTemplate string
	// ChatTemplates are the named templates, tokenizer.chat_template.NAME
	// by NAME (nil when none). With any, tokenizer_config.json's
	// chat_template becomes a list of {"name", "template"}, ChatTemplate
	// named "default".
	ChatTemplates map[string]string
}

// Supported returns the tokenizer models and, for "gpt2", the
// pre-tokenizer names Convert accepts, sorted.
func Supported() (models, pres []string) {
	for _, p := range preTokenizers {
		pres = append(pres, p.names...)
	}
	slices.Sort(pres)
	return []string{ModelGPT2, ModelLlama}, pres
}

// Convert turns v into the Hugging Face tokenizer.json and
// tokenizer_config.json that shards/text loads: the tokenizer llama.cpp
// builds from the same metadata, laid out as the model's own Hugging Face
// files (the tests check id for id against the real Llama 3, Qwen3 and
// Llama 2 ones). It returns an error wrapping ErrUnsupported or
// ErrMalformed when it cannot.
func Convert(v *Vocab) (tokenizerJSON, tokenizerConfigJSON []byte, err error) {
	if v == nil {
		return nil, nil, fmt.Errorf("%w: no vocabulary", ErrMalformed)
	}
	switch v.Model {
	case ModelGPT2:
		pre, ok := findPre(v.Pre)
		if !ok {
			_, pres := Supported()
			return nil, nil, fmt.Errorf("%w: pre-tokenizer %q (tokenizer.ggml.pre) of a %q model; supported: %s",
				ErrUnsupported, v.Pre, v.Model, strings.Join(pres, ", "))
		}
		c, err := check(v, false)
		if err != nil {
			return nil, nil, err
		}
		return convertGPT2(c, pre)
	case ModelLlama:
		c, err := check(v, true)
		if err != nil {
			return nil, nil, err
		}
		return convertLlama(c)
	}
	return nil, nil, fmt.Errorf("%w: tokenizer model %q (tokenizer.ggml.model); supported: %q (byte-level BPE), %q (SentencePiece BPE)",
		ErrUnsupported, v.Model, ModelGPT2, ModelLlama)
}

// checked is a Vocab whose arrays agree, with the defaults applied.
type checked struct {
	*Vocab
	ids                map[string]int32 // token string to id
	bos, eos, unk, pad int64
	merges             [][2]string // nil when they are derived from scores
}

// typ is the type of token id, normal where the file has none.
func (c *checked) typ(id int) int32 {
	if c.Types == nil || c.Types[id] == TypeUndefined {
		return TypeNormal
	}
	return c.Types[id]
}

// maxTokens bounds the vocabulary (shards/text refuses ids past 1<<24).
const maxTokens = 1 << 24

// check validates v; llama applies a "llama" model's defaults.
func check(v *Vocab, llama bool) (*checked, error) {
	n := len(v.Tokens)
	if n == 0 {
		return nil, fmt.Errorf("%w: no tokens (tokenizer.ggml.tokens)", ErrMalformed)
	}
	if n > maxTokens {
		return nil, fmt.Errorf("%w: %d tokens, more than %d", ErrMalformed, n, maxTokens)
	}
	if v.Types != nil && len(v.Types) != n {
		return nil, fmt.Errorf("%w: %d token types for %d tokens", ErrMalformed, len(v.Types), n)
	}
	if v.Scores != nil && len(v.Scores) != n {
		return nil, fmt.Errorf("%w: %d scores for %d tokens", ErrMalformed, len(v.Scores), n)
	}
	c := &checked{Vocab: v, ids: make(map[string]int32, n), bos: v.BOS, eos: v.EOS, unk: v.UNK, pad: v.PAD}
	for id, tok := range v.Tokens {
		if tok == "" {
			return nil, fmt.Errorf("%w: token %d is empty", ErrMalformed, id)
		}
		if !utf8.ValidString(tok) {
			return nil, fmt.Errorf("%w: token %d (%q) is not valid UTF-8", ErrMalformed, id, tok)
		}
		if prev, dup := c.ids[tok]; dup {
			return nil, fmt.Errorf("%w: tokens %d and %d are both %q", ErrMalformed, prev, id, tok)
		}
		c.ids[tok] = int32(id)
		if v.Types != nil && (v.Types[id] < TypeUndefined || v.Types[id] > TypeByte) {
			return nil, fmt.Errorf("%w: token %d (%q) has type %d (want 0 to 6)", ErrMalformed, id, tok, v.Types[id])
		}
	}
	if llama {
		// llama.cpp's defaults for a SentencePiece vocabulary.
		for _, d := range []struct {
			id  *int64
			def int64
		}{{&c.bos, 1}, {&c.eos, 2}, {&c.unk, 0}} {
			if *d.id == None && d.def < int64(n) {
				*d.id = d.def
			}
		}
	}
	for _, s := range []struct {
		name string
		id   int64
	}{{"bos_token_id", c.bos}, {"eos_token_id", c.eos}, {"unknown_token_id", c.unk}, {"padding_token_id", c.pad}} {
		if s.id != None && (s.id < 0 || s.id >= int64(n)) {
			return nil, fmt.Errorf("%w: tokenizer.ggml.%s is %d, outside the %d tokens", ErrMalformed, s.name, s.id, n)
		}
	}
	if llama && v.Scores == nil && v.Merges == nil {
		return nil, fmt.Errorf("%w: a %q model needs scores (tokenizer.ggml.scores) or merges", ErrMalformed, v.Model)
	}
	if !llama && v.Merges == nil {
		return nil, fmt.Errorf("%w: a %q model needs merges (tokenizer.ggml.merges)", ErrMalformed, v.Model)
	}
	if v.Merges != nil && (!llama || v.Scores == nil) {
		var err error
		if c.merges, err = parseMerges(v.Merges, c.ids); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// parseMerges splits "left right" merges as llama.cpp does (at the first
// space after the first byte) and checks that both parts and their
// concatenation are tokens.
func parseMerges(merges []string, ids map[string]int32) ([][2]string, error) {
	out := make([][2]string, len(merges))
	for i, m := range merges {
		sp := -1
		if len(m) > 1 {
			if j := strings.IndexByte(m[1:], ' '); j >= 0 {
				sp = j + 1
			}
		}
		if sp < 0 || sp == len(m)-1 {
			return nil, fmt.Errorf("%w: merge %d (%q) is not \"left right\"", ErrMalformed, i, m)
		}
		l, r := m[:sp], m[sp+1:]
		for _, t := range []string{l, r, l + r} {
			if _, ok := ids[t]; !ok {
				return nil, fmt.Errorf("%w: merge %d (%q) names %q, which is not a token", ErrMalformed, i, m, t)
			}
		}
		out[i] = [2]string{l, r}
	}
	return out, nil
}

// addFlags resolves AddBOS (defBOS when absent) and AddEOS (false when
// absent) and checks that the token each adds exists.
func (c *checked) addFlags(defBOS bool) (addBOS, addEOS bool, err error) {
	addBOS, addEOS = defBOS, false
	if c.AddBOS != nil {
		addBOS = *c.AddBOS
	}
	if c.AddEOS != nil {
		addEOS = *c.AddEOS
	}
	if addBOS && c.bos == None {
		return false, false, fmt.Errorf("%w: add_bos_token is set but there is no bos_token_id", ErrMalformed)
	}
	if addEOS && c.eos == None {
		return false, false, fmt.Errorf("%w: add_eos_token is set but there is no eos_token_id", ErrMalformed)
	}
	return addBOS, addEOS, nil
}
