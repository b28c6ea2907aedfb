package text

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// ErrUnknownComponent is returned (wrapped, with the component kind and its
// type) by Load for a normalizer, pre-tokenizer, model, post-processor or
// decoder type this package does not implement.
var ErrUnknownComponent = errors.New("unsupported tokenizer component")

// ErrUnknownID is returned (wrapped, with the id) by Decode for an id that
// is neither in the vocabulary nor an added token.
var ErrUnknownID = errors.New("token id out of range")

// Tokenizer encodes text to token ids and decodes them back as a Hugging
// Face tokenizer.json describes. It is safe for concurrent use.
type Tokenizer struct {
	normalizer normalizer    // nil: none
	preTok     preTokenizer  // nil: none
	model      *bpe          // the only model implemented
	post       postProcessor // nil: none
	decoder    decoder       // nil: tokens joined with spaces

	added          *addedSplitter
	addedIDs       map[int64]bool   // ids of added tokens, which the ByteLevel decoder passes through
	tokens         []string         // by id, vocabulary and added tokens; "" where no token has the id
	hasToken       []bool           // by id
	addedByContent map[string]int64 // added tokens by content; the vocabulary is in model.ids
	special        map[int64]bool

	byteFallback bool // the decoder has a ByteFallback step
	cleanup      bool // clean_up_tokenization_spaces
	bos, eos     string
	hasBOS       bool
	hasEOS       bool
}

// fileJSON is the part of tokenizer.json that is read. Components stay raw
// until their type is known.
type fileJSON struct {
	AddedTokens   []addedTokenJSON `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	Model         *modelJSON       `json:"model"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
}

type addedTokenJSON struct {
	ID         int64  `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

// configJSON is the part of tokenizer_config.json that is read.
type configJSON struct {
	BOS                       json.RawMessage `json:"bos_token"`
	EOS                       json.RawMessage `json:"eos_token"`
	CleanUpTokenizationSpaces *bool           `json:"clean_up_tokenization_spaces"`
	AdditionalSpecialTokens   json.RawMessage `json:"additional_special_tokens"`
}

// typed reads the "type" field of a component.
type typed struct {
	Type string `json:"type"`
}

// componentType reads the "type" of a pipeline component (a normalizer,
// pre-tokenizer, post-processor or decoder); present is false for a null
// or absent one.
func componentType(raw json.RawMessage) (typ string, present bool, err error) {
	if isNull(raw) {
		return "", false, nil
	}
	var t typed
	if err := json.Unmarshal(raw, &t); err != nil {
		return "", true, err
	}
	return t.Type, true, nil
}

// loadSequence reads a Sequence component: the list of components under
// key, each read by load; null ones are left out.
func loadSequence[T any](raw json.RawMessage, key string, load func(json.RawMessage) (T, error)) ([]T, error) {
	var c map[string]json.RawMessage
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	var list []json.RawMessage
	if err := json.Unmarshal(c[key], &list); err != nil {
		return nil, fmt.Errorf("sequence component: %q: %w", key, err)
	}
	var q []T
	for _, r := range list {
		x, err := load(r)
		if err != nil {
			return nil, err
		}
		if any(x) != nil {
			q = append(q, x)
		}
	}
	return q, nil
}

func isNull(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}

// tokenString reads a special token that is either a string or an object
// with a "content" field; ok is false for null or a missing field.
func tokenString(raw json.RawMessage) (string, bool, error) {
	if isNull(raw) {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, true, nil
	}
	var obj struct {
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(raw, &obj); err != nil {
		return "", false, err
	}
	if obj.Content == nil {
		return "", false, nil
	}
	return *obj.Content, true, nil
}

// Load parses tokenizer.json and tokenizer_config.json (which may be nil).
func Load(tokenizerJSON, tokenizerConfigJSON []byte) (*Tokenizer, error) {
	var f fileJSON
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		return nil, fmt.Errorf("tokenizer.json: %w", err)
	}
	if f.Model == nil {
		return nil, errors.New("tokenizer.json: no model")
	}
	t := &Tokenizer{cleanup: true}
	var err error
	if t.model, err = loadModel(f.Model); err != nil {
		return nil, fmt.Errorf("tokenizer.json: model: %w", err)
	}
	if t.normalizer, err = loadNormalizer(f.Normalizer); err != nil {
		return nil, fmt.Errorf("tokenizer.json: normalizer: %w", err)
	}
	if t.preTok, err = loadPreTokenizer(f.PreTokenizer); err != nil {
		return nil, fmt.Errorf("tokenizer.json: pre_tokenizer: %w", err)
	}
	if t.decoder, err = loadDecoder(f.Decoder); err != nil {
		return nil, fmt.Errorf("tokenizer.json: decoder: %w", err)
	}
	t.byteFallback = hasByteFallback(t.decoder)

	// The id space: the model's vocabulary, then the added tokens.
	n := len(t.model.vocab)
	for _, a := range f.AddedTokens {
		if a.ID < 0 || a.ID >= maxVocab {
			return nil, fmt.Errorf("tokenizer.json: added token %q has id %d", a.Content, a.ID)
		}
		n = max(n, int(a.ID)+1)
	}
	t.tokens = make([]string, n)
	t.hasToken = make([]bool, n)
	copy(t.tokens, t.model.vocab)
	copy(t.hasToken, t.model.hasID)
	t.addedByContent = make(map[string]int64, len(f.AddedTokens))
	t.special = make(map[int64]bool)
	t.addedIDs = make(map[int64]bool)
	for _, a := range f.AddedTokens {
		if a.Content == "" {
			return nil, fmt.Errorf("tokenizer.json: added token %d is empty", a.ID)
		}
		t.tokens[a.ID], t.hasToken[a.ID] = a.Content, true
		t.addedByContent[a.Content] = a.ID
		t.addedIDs[a.ID] = true
		if a.Special {
			t.special[a.ID] = true
		}
	}
	t.added = newAddedSplitter(f.AddedTokens)

	if t.post, err = loadPostProcessor(f.PostProcessor, t.TokenID); err != nil {
		return nil, fmt.Errorf("tokenizer.json: post_processor: %w", err)
	}

	if len(tokenizerConfigJSON) > 0 {
		var c configJSON
		if err := json.Unmarshal(tokenizerConfigJSON, &c); err != nil {
			return nil, fmt.Errorf("tokenizer_config.json: %w", err)
		}
		if c.CleanUpTokenizationSpaces != nil {
			t.cleanup = *c.CleanUpTokenizationSpaces
		}
		if t.bos, t.hasBOS, err = tokenString(c.BOS); err != nil {
			return nil, fmt.Errorf("tokenizer_config.json: bos_token: %w", err)
		}
		if t.eos, t.hasEOS, err = tokenString(c.EOS); err != nil {
			return nil, fmt.Errorf("tokenizer_config.json: eos_token: %w", err)
		}
		if !isNull(c.AdditionalSpecialTokens) {
			var extra []json.RawMessage
			if err := json.Unmarshal(c.AdditionalSpecialTokens, &extra); err != nil {
				return nil, fmt.Errorf("tokenizer_config.json: additional_special_tokens: %w", err)
			}
			for _, raw := range extra {
				s, ok, err := tokenString(raw)
				if err != nil {
					return nil, fmt.Errorf("tokenizer_config.json: additional_special_tokens: %w", err)
				}
				if id, known := t.TokenID(s); ok && known {
					t.special[id] = true
				}
			}
		}
	}
	return t, nil
}

// Encode tokenizes s. With addSpecial the post-processor adds its special
// tokens (e.g. Llama 2's <s>), as Hugging Face's add_special_tokens does.
// Added-token strings inside s become their ids.
func (t *Tokenizer) Encode(s string, addSpecial bool) ([]int64, error) {
	var ids []int64
	for i, sec := range t.added.split(s) {
		if sec.id >= 0 {
			ids = append(ids, sec.id)
			continue
		}
		x := sec.text
		if t.normalizer != nil {
			var err error
			if x, err = t.normalizer.normalize(x); err != nil {
				return nil, err
			}
		}
		if x == "" {
			continue
		}
		pieces := []string{x}
		if t.preTok != nil {
			var err error
			if pieces, err = t.preTok.preTokenize(pieces, i == 0); err != nil {
				return nil, err
			}
		}
		for _, p := range pieces {
			ids = t.model.encode(ids, p)
		}
	}
	if t.post != nil {
		ids = t.post.process(ids, addSpecial)
	}
	return ids, nil
}

// Decode turns ids back into text, leaving out special tokens when
// skipSpecial is set, as Hugging Face's decode(ids, skip_special_tokens).
func (t *Tokenizer) Decode(ids []int64, skipSpecial bool) (string, error) {
	toks := make([]string, 0, len(ids))
	added := make([]bool, 0, len(ids))
	for _, id := range ids {
		tok, ok := t.Token(id)
		if !ok {
			return "", fmt.Errorf("%w: %d (vocabulary size %d)", ErrUnknownID, id, len(t.tokens))
		}
		if skipSpecial && t.special[id] {
			continue
		}
		toks = append(toks, tok)
		added = append(added, t.addedIDs[id])
	}
	var out string
	if t.decoder == nil {
		out = strings.Join(toks, " ")
	} else {
		out = strings.Join(decodeTokens(t.decoder, toks, added), "")
	}
	if t.cleanup {
		out = cleanUp(out)
	}
	return out, nil
}

// VocabSize is one more than the highest token id, added tokens included.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// TokenID returns the id of a vocabulary or added token.
func (t *Tokenizer) TokenID(token string) (int64, bool) {
	if id, ok := t.addedByContent[token]; ok {
		return id, true
	}
	id, ok := t.model.ids[token]
	return int64(id), ok
}

// Token returns the string of token id.
func (t *Tokenizer) Token(id int64) (string, bool) {
	if id < 0 || id >= int64(len(t.tokens)) || !t.hasToken[id] {
		return "", false
	}
	return t.tokens[id], true
}

// IsSpecial reports whether id is a special token: an added token marked
// special, or one tokenizer_config.json lists in additional_special_tokens.
func (t *Tokenizer) IsSpecial(id int64) bool { return t.special[id] }

// BOS returns tokenizer_config.json's bos_token.
func (t *Tokenizer) BOS() (string, bool) { return t.bos, t.hasBOS }

// EOS returns tokenizer_config.json's eos_token.
func (t *Tokenizer) EOS() (string, bool) { return t.eos, t.hasEOS }
