package vocab_test

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards/gguf/vocab"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
)

// tiny is a byte-level vocabulary small enough to write by hand: the
// letters of "hello world", their merges, and two control tokens.
func tiny() *vocab.Vocab {
	return &vocab.Vocab{
		Model:  vocab.ModelGPT2,
		Pre:    "llama-bpe",
		Tokens: []string{"h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld", "<bos>", "<eos>", "<user>"},
		Types:  []int32{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 4},
		Merges: []string{"h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"},
		BOS:    17, EOS: 18, UNK: vocab.None, PAD: vocab.None,
	}
}

// spm is a SentencePiece vocabulary written by hand: <unk>, <s>, </s>,
// the 256 byte tokens, then pieces scored so that "▁h" + "i" wins over
// "▁" + "hi".
func spm() *vocab.Vocab {
	v := &vocab.Vocab{Model: vocab.ModelLlama, BOS: vocab.None, EOS: vocab.None, UNK: vocab.None, PAD: vocab.None}
	add := func(tok string, typ int32, score float32) {
		v.Tokens = append(v.Tokens, tok)
		v.Types = append(v.Types, typ)
		v.Scores = append(v.Scores, score)
	}
	add("<unk>", vocab.TypeUnknown, 0)
	add("<s>", vocab.TypeControl, 0)
	add("</s>", vocab.TypeControl, 0)
	for b := range 256 {
		add(string([]byte{'<', '0', 'x', "0123456789ABCDEF"[b>>4], "0123456789ABCDEF"[b&15], '>'}), vocab.TypeByte, 0)
	}
	add("▁h", vocab.TypeNormal, -1)
	add("hi", vocab.TypeNormal, -2)
	add("▁hi", vocab.TypeNormal, -3)
	add("▁", vocab.TypeNormal, -4)
	add("h", vocab.TypeNormal, -5)
	add("i", vocab.TypeNormal, -6)
	return v
}

func load(t *testing.T, v *vocab.Vocab) (*text.Tokenizer, map[string]any) {
	t.Helper()
	tj, cj, err := vocab.Convert(v)
	if err != nil {
		t.Fatalf("Convert: %v", err)
	}
	tok, err := text.Load(tj, cj)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(cj, &cfg); err != nil {
		t.Fatal(err)
	}
	return tok, cfg
}

func encode(t *testing.T, tok *text.Tokenizer, s string, addSpecial bool) []int64 {
	t.Helper()
	ids, err := tok.Encode(s, addSpecial)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func TestTinyGPT2(t *testing.T) {
	tok, cfg := load(t, tiny())
	if got, want := encode(t, tok, "hello world", true), []int64{17, 11, 16}; !slices.Equal(got, want) {
		t.Errorf("Encode = %v, want %v (BOS added by default for llama-bpe)", got, want)
	}
	if got, want := encode(t, tok, "<user>hello<eos>", false), []int64{19, 11, 18}; !slices.Equal(got, want) {
		t.Errorf("Encode = %v, want %v", got, want)
	}
	if s, err := tok.Decode([]int64{17, 11, 16, 19, 18}, true); err != nil || s != "hello world<user>" {
		t.Errorf("Decode(skip special) = %q, %v", s, err)
	}
	if !tok.IsSpecial(17) || tok.IsSpecial(19) {
		t.Error("control tokens must be special, user-defined ones not")
	}
	if cfg["bos_token"] != "<bos>" || cfg["eos_token"] != "<eos>" || cfg["add_bos_token"] != true || cfg["unk_token"] != nil {
		t.Errorf("config = %v", cfg)
	}

	v := tiny()
	no, yes := false, true
	v.AddBOS, v.AddEOS = &no, &yes
	v.ChatTemplate = "{{ messages }}"
	v.ChatTemplates = map[string]string{"tool_use": "{{ tools }}"}
	tok, cfg = load(t, v)
	if got, want := encode(t, tok, "hello", true), []int64{11, 18}; !slices.Equal(got, want) {
		t.Errorf("Encode with add_eos = %v, want %v", got, want)
	}
	want := []any{
		map[string]any{"name": "default", "template": "{{ messages }}"},
		map[string]any{"name": "tool_use", "template": "{{ tools }}"},
	}
	if got, _ := json.Marshal(cfg["chat_template"]); string(got) != string(must(json.Marshal(want))) {
		t.Errorf("chat_template = %s", got)
	}
	_, cj, _ := vocab.Convert(v)
	if tmpl, err := chat.FromConfig(cj, nil); err != nil || tmpl.Source() != "{{ messages }}" {
		t.Errorf("chat.FromConfig: %v, want the default template", err)
	}
}

func must[T any](x T, err error) T {
	if err != nil {
		panic(err)
	}
	return x
}

func TestSentencePiece(t *testing.T) {
	tok, cfg := load(t, spm())
	// "▁h" (score -1) merges before "hi" (-2): ▁h i, then ▁hi.
	if got, want := encode(t, tok, "hi", true), []int64{1, 261}; !slices.Equal(got, want) {
		t.Errorf("Encode(hi) = %v, want %v", got, want)
	}
	// Unknown characters fall back to bytes: "é" is C3 A9.
	if got, want := encode(t, tok, "é", false), []int64{262, 3 + 0xC3, 3 + 0xA9}; !slices.Equal(got, want) {
		t.Errorf("Encode(é) = %v, want %v", got, want)
	}
	if s, err := tok.Decode([]int64{1, 261, 262, 3 + 0xC3, 3 + 0xA9}, true); err != nil || s != "hi é" {
		t.Errorf("Decode = %q, %v", s, err)
	}
	// llama.cpp's defaults for absent ids: BOS 1, EOS 2, UNK 0.
	if cfg["bos_token"] != "<s>" || cfg["eos_token"] != "</s>" || cfg["unk_token"] != "<unk>" || cfg["add_bos_token"] != true {
		t.Errorf("config = %v", cfg)
	}

	v := spm()
	no := false
	v.AddSpacePrefix = &no
	tok, _ = load(t, v)
	if got, want := encode(t, tok, "hi hi", false), []int64{260, 261}; !slices.Equal(got, want) {
		t.Errorf("Encode without space prefix = %v, want %v", got, want)
	}
	if s, _ := tok.Decode([]int64{261}, false); s != " hi" {
		t.Errorf("Decode without space prefix = %q, want \" hi\"", s)
	}
}

func TestUnsupported(t *testing.T) {
	for _, c := range []struct{ model, pre, name string }{
		{"bert", "", `"bert"`},
		{"t5", "", `"t5"`},
		{"rwkv", "", `"rwkv"`},
		{"", "", `""`},
		{"gpt2", "deepseek-llm", `"deepseek-llm"`},
		{"gpt2", "tekken", `"tekken"`},
	} {
		v := tiny()
		v.Model, v.Pre = c.model, c.pre
		_, _, err := vocab.Convert(v)
		if !errors.Is(err, vocab.ErrUnsupported) {
			t.Errorf("%s/%s: err = %v, want ErrUnsupported", c.model, c.pre, err)
			continue
		}
		if !strings.Contains(err.Error(), c.name) || !strings.Contains(err.Error(), "supported:") {
			t.Errorf("%s/%s: error %q does not name it and list the supported ones", c.model, c.pre, err)
		}
	}
	models, pres := vocab.Supported()
	if !slices.Equal(models, []string{"gpt2", "llama"}) || !slices.Contains(pres, "llama-bpe") || !slices.Contains(pres, "qwen2") {
		t.Errorf("Supported() = %v, %v", models, pres)
	}
	// An absent pre-tokenizer is llama.cpp's "default".
	v := tiny()
	v.Pre = ""
	if _, _, err := vocab.Convert(v); err != nil {
		t.Errorf("absent pre: %v", err)
	}
}

func TestMalformed(t *testing.T) {
	yes := true
	for _, c := range []struct {
		name  string
		edit  func(*vocab.Vocab)
		about string
	}{
		{"nil tokens", func(v *vocab.Vocab) { v.Tokens, v.Types = nil, nil }, "no tokens"},
		{"types length", func(v *vocab.Vocab) { v.Types = v.Types[1:] }, "19 token types for 20 tokens"},
		{"scores length", func(v *vocab.Vocab) { v.Scores = make([]float32, 3) }, "3 scores for 20 tokens"},
		{"empty token", func(v *vocab.Vocab) { v.Tokens[2] = "" }, "token 2 is empty"},
		{"duplicate", func(v *vocab.Vocab) { v.Tokens[3] = "h" }, `tokens 0 and 3 are both "h"`},
		{"invalid utf-8", func(v *vocab.Vocab) { v.Tokens[3] = "\xff" }, "not valid UTF-8"},
		{"bad type", func(v *vocab.Vocab) { v.Types[4] = 9 }, "type 9"},
		{"merge unknown part", func(v *vocab.Vocab) { v.Merges[1] = "l x" }, `names "x"`},
		{"merge unknown result", func(v *vocab.Vocab) { v.Merges[1] = "l o" }, `names "lo"`},
		{"merge without space", func(v *vocab.Vocab) { v.Merges[0] = "he" }, `merge 0 ("he")`},
		{"no merges", func(v *vocab.Vocab) { v.Merges = nil }, "needs merges"},
		{"bos out of range", func(v *vocab.Vocab) { v.BOS = 20 }, "bos_token_id is 20"},
		{"eos negative", func(v *vocab.Vocab) { v.EOS = -7 }, "eos_token_id is -7"},
		{"pad out of range", func(v *vocab.Vocab) { v.PAD = 1000 }, "padding_token_id is 1000"},
		{"add bos without bos", func(v *vocab.Vocab) { v.BOS = vocab.None }, "no bos_token_id"},
		{"add eos without eos", func(v *vocab.Vocab) { v.EOS, v.AddEOS = vocab.None, &yes }, "no eos_token_id"},
	} {
		v := tiny()
		c.edit(v)
		_, _, err := vocab.Convert(v)
		if !errors.Is(err, vocab.ErrMalformed) || !strings.Contains(err.Error(), c.about) {
			t.Errorf("%s: err = %v, want ErrMalformed saying %q", c.name, err, c.about)
		}
	}

	v := spm()
	v.Scores = nil
	if _, _, err := vocab.Convert(v); !errors.Is(err, vocab.ErrMalformed) || !strings.Contains(err.Error(), "needs scores") {
		t.Errorf("llama without scores or merges: err = %v", err)
	}
	if _, _, err := vocab.Convert(nil); !errors.Is(err, vocab.ErrMalformed) {
		t.Errorf("nil: err = %v", err)
	}
}
