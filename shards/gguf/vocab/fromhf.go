package vocab

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// FromHF builds the vocabulary llama.cpp's convert_hf_to_gguf.py writes for
// a Hugging Face model folder holding this tokenizer.json and
// tokenizer_config.json, with pre as tokenizer.ggml.pre (the converter
// finds it by hashing the tokenizer's output; "llama-bpe" for Llama 3,
// "qwen2" for Qwen2 and Qwen3). It is how tests and random-weight GGUF
// checkpoints get a real tokenizer into a GGUF file.
//
//   - A byte-level BPE ("gpt2": Llama 3, Qwen): one token per id up to the
//     highest, "[PADn]" (unused) for a gap, added tokens as control when
//     special or when they look special, user-defined otherwise, the rest
//     normal; the merges as "left right"; no scores.
//   - A BPE with byte fallback ("llama": Llama 2, Mistral v0.1): the
//     converter reads types and scores from tokenizer.model, which is
//     rebuilt here from tokenizer.json: <unk> unknown, <s> and </s>
//     control, <0xNN> byte, the rest normal, then the added tokens
//     (special: control, score -1000). SentencePiece BPE scores a piece by
//     the rank of the merge that made it, so a piece scores minus the rank
//     of the first merge that makes it; pieces no merge makes (single
//     characters) score below all of those, in id order; byte and control
//     pieces 0. Convert derives exactly the tokenizer.json's merges, in
//     order, from these scores.
//
// Special token ids come from tokenizer_config.json's *_token strings
// looked up among the added tokens, add_bos/add_eos from its add_*_token
// booleans (absent stays nil), the chat template from its chat_template.
func FromHF(tokenizerJSON, tokenizerConfigJSON []byte, pre string) (*Vocab, error) {
	var f struct {
		AddedTokens []struct {
			ID      int64  `json:"id"`
			Content string `json:"content"`
			Special bool   `json:"special"`
		} `json:"added_tokens"`
		Model struct {
			Type         string           `json:"type"`
			ByteFallback bool             `json:"byte_fallback"`
			Vocab        map[string]int64 `json:"vocab"`
			Merges       json.RawMessage  `json:"merges"`
		} `json:"model"`
	}
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		return nil, fmt.Errorf("%w: tokenizer.json: %v", ErrMalformed, err)
	}
	if f.Model.Type != "BPE" {
		return nil, fmt.Errorf("%w: tokenizer.json model %q (only BPE)", ErrUnsupported, f.Model.Type)
	}
	var c struct {
		AddBOS       *bool           `json:"add_bos_token"`
		AddEOS       *bool           `json:"add_eos_token"`
		BOS          json.RawMessage `json:"bos_token"`
		EOS          json.RawMessage `json:"eos_token"`
		UNK          json.RawMessage `json:"unk_token"`
		PAD          json.RawMessage `json:"pad_token"`
		ChatTemplate string          `json:"chat_template"`
	}
	if err := json.Unmarshal(tokenizerConfigJSON, &c); err != nil {
		return nil, fmt.Errorf("%w: tokenizer_config.json: %v", ErrMalformed, err)
	}
	n := int64(0)
	byID := map[int64]string{}
	for tok, id := range f.Model.Vocab {
		if id < 0 {
			return nil, fmt.Errorf("%w: token %q has id %d", ErrMalformed, tok, id)
		}
		byID[id] = tok
		n = max(n, id+1)
	}
	added := map[int64]bool{}
	special := map[int64]bool{}
	addedID := map[string]int64{}
	for _, a := range f.AddedTokens {
		if a.ID < 0 {
			return nil, fmt.Errorf("%w: added token %q has id %d", ErrMalformed, a.Content, a.ID)
		}
		byID[a.ID] = a.Content
		added[a.ID] = true
		special[a.ID] = a.Special
		addedID[a.Content] = a.ID
		n = max(n, a.ID+1)
	}
	merges, err := MergeStrings(f.Model.Merges)
	if err != nil {
		return nil, err
	}
	tokenID := func(raw json.RawMessage) int64 {
		var s string
		if json.Unmarshal(raw, &s) != nil || s == "" {
			var obj struct{ Content string }
			if json.Unmarshal(raw, &obj) != nil || obj.Content == "" {
				return None
			}
			s = obj.Content
		}
		if id, ok := addedID[s]; ok {
			return id
		}
		return None
	}
	v := &Vocab{
		Pre:          pre,
		BOS:          tokenID(c.BOS),
		EOS:          tokenID(c.EOS),
		UNK:          tokenID(c.UNK),
		PAD:          tokenID(c.PAD),
		AddBOS:       c.AddBOS,
		AddEOS:       c.AddEOS,
		ChatTemplate: c.ChatTemplate,
		Tokens:       make([]string, n),
		Types:        make([]int32, n),
	}
	if !f.Model.ByteFallback {
		v.Model = ModelGPT2
		v.Merges = merges
		for id := range n {
			tok, ok := byID[id]
			switch {
			case !ok:
				v.Tokens[id], v.Types[id] = fmt.Sprintf("[PAD%d]", id), TypeUnused
			case added[id] && (special[id] || looksSpecial(tok)):
				v.Tokens[id], v.Types[id] = tok, TypeControl
			case added[id]:
				v.Tokens[id], v.Types[id] = strings.ReplaceAll(tok, "\u2581", " "), TypeUserDefined
			default:
				v.Tokens[id], v.Types[id] = tok, TypeNormal
			}
		}
		return v, nil
	}

	v.Model = ModelLlama
	prefix := true // tokenizer.model's normalizer_spec.add_dummy_prefix
	v.AddSpacePrefix = &prefix
	firstMerge := map[string]int{}
	for rank, m := range merges {
		l, r, _ := strings.Cut(m, " ")
		if _, seen := firstMerge[l+r]; !seen {
			firstMerge[l+r] = rank
		}
	}
	v.Scores = make([]float32, n)
	for id := range n {
		tok, ok := byID[id]
		if !ok {
			return nil, fmt.Errorf("%w: no token %d", ErrMalformed, id)
		}
		v.Tokens[id] = tok
		switch {
		case id == 0:
			v.Types[id] = TypeUnknown
		case id == 1 || id == 2:
			v.Types[id] = TypeControl
		case byteToken.MatchString(tok):
			v.Types[id] = TypeByte
		default:
			v.Types[id] = TypeNormal
			if rank, ok := firstMerge[tok]; ok {
				v.Scores[id] = -float32(rank)
			} else {
				v.Scores[id] = -float32(int64(len(merges)) + id)
			}
		}
		if added[id] {
			if special[id] || looksSpecial(tok) {
				v.Types[id] = TypeControl
			} else {
				v.Types[id] = TypeUserDefined
			}
			v.Scores[id] = -1000
		}
	}
	return v, nil
}

var byteToken = regexp.MustCompile(`^<0x[0-9A-F]{2}>$`)

// looksSpecial is the converter's does_token_look_special: added tokens not
// marked special that it writes as control tokens all the same.
func looksSpecial(tok string) bool {
	switch tok {
	case "<pad>", "<mask>", "<2mass>", "[@BOS@]":
		return true
	}
	return strings.HasPrefix(tok, "<|") && strings.HasSuffix(tok, "|>") ||
		strings.HasPrefix(tok, "<｜") && strings.HasSuffix(tok, "｜>") ||
		strings.HasPrefix(tok, "<unused") && strings.HasSuffix(tok, ">")
}

// MergeStrings reads tokenizer.json merges written as "left right"
// strings or as [left, right] pairs.
func MergeStrings(raw json.RawMessage) ([]string, error) {
	var out []string
	if json.Unmarshal(raw, &out) == nil {
		return out, nil
	}
	var pairs [][2]string
	if err := json.Unmarshal(raw, &pairs); err != nil {
		return nil, fmt.Errorf("%w: merges: %v", ErrMalformed, err)
	}
	out = make([]string, len(pairs))
	for i, p := range pairs {
		out[i] = p[0] + " " + p[1]
	}
	return out, nil
}
