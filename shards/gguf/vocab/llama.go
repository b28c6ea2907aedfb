package vocab

import (
	"cmp"
	"slices"
)

// metaspace is SentencePiece's stand-in for a space.
const metaspace = "\u2581"

// convertLlama writes a SentencePiece BPE tokenizer as Llama 2's own
// tokenizer.json has it: spaces become ▁ (and a ▁ goes before the text
// when add_space_prefix holds) in the normalizer, no pre-tokenizer, BPE
// with byte fallback to <0xNN> tokens and the unknown token fused, and a
// decoder that undoes each step.
func convertLlama(c *checked) (tokenizerJSON, tokenizerConfigJSON []byte, err error) {
	addBOS, addEOS, err := c.addFlags(true)
	if err != nil {
		return nil, nil, err
	}
	prefix := true
	if c.AddSpacePrefix != nil {
		prefix = *c.AddSpacePrefix
	}
	merges := c.merges
	if merges == nil {
		merges = c.scoreMerges()
	}

	replace := map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": metaspace}
	normalizer := []any{replace}
	decoder := []any{
		map[string]any{"type": "Replace", "pattern": map[string]any{"String": metaspace}, "content": " "},
		map[string]any{"type": "ByteFallback"},
		map[string]any{"type": "Fuse"},
	}
	if prefix {
		normalizer = []any{map[string]any{"type": "Prepend", "prepend": metaspace}, replace}
		decoder = append(decoder, map[string]any{"type": "Strip", "content": " ", "start": 1, "stop": 0})
	}
	f := tokenizerFile{
		Version:     "1.0",
		AddedTokens: c.addedTokens(),
		Normalizer:  map[string]any{"type": "Sequence", "normalizers": normalizer},
		Decoder:     map[string]any{"type": "Sequence", "decoders": decoder},
		Model: bpeModel{
			Type:         "BPE",
			UnkToken:     c.tokenAt(c.unk),
			FuseUnk:      true,
			ByteFallback: true,
			Vocab:        c.Tokens,
			Merges:       merges,
		},
	}
	if addBOS || addEOS {
		f.PostProcessor = c.template(addBOS, addEOS)
	}
	if tokenizerJSON, err = marshal(f); err != nil {
		return nil, nil, err
	}
	legacy := true
	if tokenizerConfigJSON, err = c.config(addBOS, addEOS, false, &legacy); err != nil {
		return nil, nil, err
	}
	return tokenizerJSON, tokenizerConfigJSON, nil
}

// scoreMerges derives BPE merges from SentencePiece scores, as Hugging
// Face's converters do: every split of a normal token into two tokens is a
// merge, ranked by the merged token's score, highest first; ties keep the
// merged tokens' id order, and the splits of one token go by the ids of
// their left then right part. SentencePiece merges by the same score, so
// the ranks reproduce its choices. Control, unknown, byte, unused and
// user-defined tokens are never merge results: SentencePiece and llama.cpp
// match them whole or not at all.
func (c *checked) scoreMerges() [][2]string {
	type cand struct {
		score         float32
		piece, left   int32
		right         int32
		leftS, rightS string
	}
	var cands []cand
	for id, tok := range c.Tokens {
		if c.typ(id) != TypeNormal {
			continue
		}
		for k := 1; k < len(tok); k++ {
			l, okL := c.ids[tok[:k]]
			r, okR := c.ids[tok[k:]]
			if okL && okR {
				cands = append(cands, cand{c.Scores[id], int32(id), l, r, tok[:k], tok[k:]})
			}
		}
	}
	slices.SortFunc(cands, func(a, b cand) int {
		return cmp.Or(
			cmp.Compare(b.score, a.score),
			cmp.Compare(a.piece, b.piece),
			cmp.Compare(a.left, b.left),
			cmp.Compare(a.right, b.right),
		)
	})
	out := make([][2]string, len(cands))
	for i, m := range cands {
		out[i] = [2]string{m.leftS, m.rightS}
	}
	return out
}
