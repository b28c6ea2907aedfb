package vocab

// The split regexes, as the models' own tokenizer.json files write them
// (llama.cpp runs hand-expanded equivalents: (?i:'s) becomes '[sS]).
const (
	// gpt2Regex is GPT-2's split, also what a ByteLevel pre-tokenizer with
	// use_regex runs.
	gpt2Regex = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
	// llama3Regex is Llama 3's (numbers in runs of up to three digits).
	llama3Regex = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	// qwen2Regex is Qwen2's and Qwen3's (one digit at a time).
	qwen2Regex = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// preTokenizer is how llama.cpp treats one family of tokenizer.ggml.pre
// names (src/llama-vocab.cpp): the regexes it splits with, one after the
// other, each keeping both what matches and what does not (Hugging Face's
// Split with behavior Isolated), and its defaults.
type preTokenizer struct {
	names        []string
	splits       []string
	nfc          bool // the model's tokenizer.json normalizes to NFC first
	ignoreMerges bool // a pre-token that is a whole token is not merged
	addBOS       bool // default for an absent add_bos_token
	cleanUp      bool // clean_up_tokenization_spaces
}

// preTokenizers are the supported tokenizer.ggml.pre names of a "gpt2"
// model.
var preTokenizers = []preTokenizer{
	{
		// Also what llama.cpp uses for a file without tokenizer.ggml.pre.
		names:   []string{"default"},
		splits:  []string{`[\p{P}\$\+<=>\^~\|]+`, gpt2Regex, `\p{N}+`, `[0-9][0-9][0-9]`},
		cleanUp: true,
	},
	{names: []string{"gpt-2"}, splits: []string{gpt2Regex}, cleanUp: true},
	{
		names:        []string{"llama-bpe", "llama3", "llama-v3"},
		splits:       []string{llama3Regex},
		ignoreMerges: true,
		addBOS:       true,
		cleanUp:      true,
	},
	{names: []string{"qwen2"}, splits: []string{qwen2Regex}, nfc: true},
	{names: []string{"smollm"}, splits: []string{`\p{N}`, gpt2Regex}},
	{names: []string{"starcoder"}, splits: []string{`\p{N}`, gpt2Regex}, cleanUp: true},
}

// findPre looks name up; empty is "default", as llama.cpp reads it.
func findPre(name string) (preTokenizer, bool) {
	if name == "" {
		name = "default"
	}
	for _, p := range preTokenizers {
		for _, n := range p.names {
			if n == name {
				return p, true
			}
		}
	}
	return preTokenizer{}, false
}

// convertGPT2 writes a byte-level BPE tokenizer: the pre-tokenizer's
// splits then the byte-to-character mapping, the vocabulary and merges as
// the file has them, and BOS/EOS added by a TemplateProcessing
// post-processor when asked.
func convertGPT2(c *checked, pre preTokenizer) (tokenizerJSON, tokenizerConfigJSON []byte, err error) {
	addBOS, addEOS, err := c.addFlags(pre.addBOS)
	if err != nil {
		return nil, nil, err
	}
	var steps []any
	for _, re := range pre.splits {
		steps = append(steps, map[string]any{
			"type":     "Split",
			"pattern":  map[string]any{"Regex": re},
			"behavior": "Isolated",
			"invert":   false,
		})
	}
	steps = append(steps, map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false})
	f := tokenizerFile{
		Version:      "1.0",
		AddedTokens:  c.addedTokens(),
		PreTokenizer: map[string]any{"type": "Sequence", "pretokenizers": steps},
		Decoder:      map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
		Model: bpeModel{
			Type:         "BPE",
			IgnoreMerges: pre.ignoreMerges,
			Vocab:        c.Tokens,
			Merges:       c.merges,
		},
	}
	if pre.nfc {
		f.Normalizer = map[string]any{"type": "NFC"}
	}
	byteLevel := map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
	if addBOS || addEOS {
		f.PostProcessor = map[string]any{"type": "Sequence", "processors": []any{byteLevel, c.template(addBOS, addEOS)}}
	} else {
		f.PostProcessor = byteLevel
	}
	if tokenizerJSON, err = marshal(f); err != nil {
		return nil, nil, err
	}
	if tokenizerConfigJSON, err = c.config(addBOS, addEOS, pre.cleanUp, nil); err != nil {
		return nil, nil, err
	}
	return tokenizerJSON, tokenizerConfigJSON, nil
}
