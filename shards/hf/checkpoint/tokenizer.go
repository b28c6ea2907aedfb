package checkpoint

import "encoding/json"

// ByteTokenizer returns tokenizer.json and tokenizer_config.json of a
// byte-level BPE tokenizer: the 256 byte tokens of GPT-2's alphabet, no
// merges, <s> (id 256, BOS) and </s> (257, EOS). It is a real tokenizer of
// the kind Llama 3 and Qwen use, small enough for a Tiny model's
// vocabulary, for tests that need a tokenizer but not a real one's size
// (a GGUF file must carry one).
func ByteTokenizer() (tokenizerJSON, tokenizerConfigJSON []byte) {
	vocab := map[string]int{}
	n := 0
	for b := range 256 {
		r := rune(b)
		if !(b >= '!' && b <= '~' || b >= 0xa1 && b <= 0xac || b >= 0xae) {
			r = rune(256 + n) // GPT-2 maps the unprintable bytes past 255
			n++
		}
		vocab[string(r)] = b
	}
	special := func(id int, s string) map[string]any {
		return map[string]any{"id": id, "content": s, "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}
	}
	level := map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
	tok, _ := json.Marshal(map[string]any{
		"version":       "1.0",
		"added_tokens":  []map[string]any{special(256, "<s>"), special(257, "</s>")},
		"pre_tokenizer": level,
		"decoder":       level,
		"model":         map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{}},
	})
	return tok, []byte(`{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}`)
}
