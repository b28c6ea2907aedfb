package vocab

import (
	"bytes"
	"encoding/json"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// The tokenizer.json schema that Convert writes, fields in Hugging Face's
// order. Pipeline components are plain maps (encoding/json sorts their
// keys; Hugging Face reads them in any order).

type tokenizerFile struct {
	Version       string       `json:"version"`
	Truncation    any          `json:"truncation"`
	Padding       any          `json:"padding"`
	AddedTokens   []addedToken `json:"added_tokens"`
	Normalizer    any          `json:"normalizer"`
	PreTokenizer  any          `json:"pre_tokenizer"`
	PostProcessor any          `json:"post_processor"`
	Decoder       any          `json:"decoder"`
	Model         bpeModel     `json:"model"`
}

type addedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type bpeModel struct {
	Type                    string    `json:"type"`
	Dropout                 any       `json:"dropout"`
	UnkToken                *string   `json:"unk_token"`
	ContinuingSubwordPrefix any       `json:"continuing_subword_prefix"`
	EndOfWordSuffix         any       `json:"end_of_word_suffix"`
	FuseUnk                 bool      `json:"fuse_unk"`
	ByteFallback            bool      `json:"byte_fallback"`
	IgnoreMerges            bool      `json:"ignore_merges"`
	Vocab                   idVocab   `json:"vocab"`
	Merges                  mergeList `json:"merges"`
}

// configFile is tokenizer_config.json.
type configFile struct {
	AddBOS       bool    `json:"add_bos_token"`
	AddEOS       bool    `json:"add_eos_token"`
	BOS          *string `json:"bos_token"`
	EOS          *string `json:"eos_token"`
	UNK          *string `json:"unk_token"`
	PAD          *string `json:"pad_token"`
	CleanUp      bool    `json:"clean_up_tokenization_spaces"`
	ChatTemplate any     `json:"chat_template,omitempty"`
	Legacy       *bool   `json:"legacy,omitempty"`
	Class        string  `json:"tokenizer_class"`
}

type namedTemplate struct {
	Name     string `json:"name"`
	Template string `json:"template"`
}

// addedTokens lists the tokens that Hugging Face splits out of the text
// before the model: control and unknown tokens (special) and user-defined
// ones (not special). GGUF keeps user-defined tokens pre-normalized, so
// none is normalized.
func (c *checked) addedTokens() []addedToken {
	out := []addedToken{}
	for id, tok := range c.Tokens {
		switch t := c.typ(id); t {
		case TypeControl, TypeUnknown, TypeUserDefined:
			out = append(out, addedToken{ID: id, Content: tok, Special: t != TypeUserDefined})
		}
	}
	return out
}

// tokenAt returns the string of id, nil for None.
func (c *checked) tokenAt(id int64) *string {
	if id == None {
		return nil
	}
	return &c.Tokens[id]
}

// template is a TemplateProcessing post-processor adding BOS and EOS
// around each sequence.
func (c *checked) template(addBOS, addEOS bool) map[string]any {
	special := map[string]any{}
	seq := func(name string, typeID int) []any {
		var items []any
		if addBOS {
			items = append(items, map[string]any{"SpecialToken": map[string]any{"id": c.Tokens[c.bos], "type_id": typeID}})
		}
		items = append(items, map[string]any{"Sequence": map[string]any{"id": name, "type_id": typeID}})
		if addEOS {
			items = append(items, map[string]any{"SpecialToken": map[string]any{"id": c.Tokens[c.eos], "type_id": typeID}})
		}
		return items
	}
	for _, on := range []struct {
		add bool
		id  int64
	}{{addBOS, c.bos}, {addEOS, c.eos}} {
		if on.add {
			tok := c.Tokens[on.id]
			special[tok] = map[string]any{"id": tok, "ids": []int64{on.id}, "tokens": []string{tok}}
		}
	}
	return map[string]any{
		"type":           "TemplateProcessing",
		"single":         seq("A", 0),
		"pair":           append(seq("A", 0), seq("B", 1)...),
		"special_tokens": special,
	}
}

// config builds tokenizer_config.json.
func (c *checked) config(addBOS, addEOS, cleanUp bool, legacy *bool) ([]byte, error) {
	f := configFile{
		AddBOS:  addBOS,
		AddEOS:  addEOS,
		BOS:     c.tokenAt(c.bos),
		EOS:     c.tokenAt(c.eos),
		UNK:     c.tokenAt(c.unk),
		PAD:     c.tokenAt(c.pad),
		CleanUp: cleanUp,
		Legacy:  legacy,
		Class:   "PreTrainedTokenizerFast",
	}
	switch {
	case len(c.ChatTemplates) > 0:
		var list []namedTemplate
		if c.ChatTemplate != "" {
			list = append(list, namedTemplate{"default", c.ChatTemplate})
		}
		for _, name := range slices.Sorted(maps.Keys(c.ChatTemplates)) {
			list = append(list, namedTemplate{name, c.ChatTemplates[name]})
		}
		f.ChatTemplate = list
	case c.ChatTemplate != "":
		f.ChatTemplate = c.ChatTemplate
	}
	return marshal(f)
}

// marshal writes JSON as Hugging Face does: UTF-8 as is (no \u003c for <).
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// idVocab is the model's vocabulary, the tokens by id, written as a JSON
// object in id order (encoding/json would sort a map's keys, slowly).
type idVocab []string

func (v idVocab) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 16*len(v)+2)
	b = append(b, '{')
	for id, tok := range v {
		if id > 0 {
			b = append(b, ',')
		}
		b = appendString(b, tok)
		b = append(b, ':')
		b = strconv.AppendInt(b, int64(id), 10)
	}
	return append(b, '}'), nil
}

// mergeList writes merges as "left right" strings, as most tokenizer.json
// files do, or as ["left", "right"] pairs when a part holds a space.
type mergeList [][2]string

func (m mergeList) MarshalJSON() ([]byte, error) {
	pairs := slices.ContainsFunc(m, func(p [2]string) bool {
		return strings.Contains(p[0], " ") || strings.Contains(p[1], " ")
	})
	b := make([]byte, 0, 12*len(m)+2)
	b = append(b, '[')
	for i, p := range m {
		if i > 0 {
			b = append(b, ',')
		}
		if pairs {
			b = append(b, '[')
			b = appendString(b, p[0])
			b = append(b, ',')
			b = appendString(b, p[1])
			b = append(b, ']')
		} else {
			b = appendString(b, p[0]+" "+p[1])
		}
	}
	return append(b, ']'), nil
}

// appendString appends s as a JSON string, UTF-8 as is.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&15])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}
