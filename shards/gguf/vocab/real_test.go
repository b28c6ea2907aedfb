package vocab_test

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/infermesh/infermesh/shards/gguf/vocab"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
	"github.com/infermesh/infermesh/shards/text/texttest"
)

// pre is the tokenizer.ggml.pre that convert_hf_to_gguf.py's
// get_vocab_base_pre finds for each model (by hashing the tokenizer's
// output), "default" for the SentencePiece path.
var pre = map[string]string{"llama3": "llama-bpe", "qwen3": "qwen2", "llama2": "default"}

// fromHF is vocab.FromHF for a test: the vocabulary llama.cpp's converter
// writes for the model's real tokenizer files.
func fromHF(tb testing.TB, model string, tokenizerJSON, configJSON []byte) *vocab.Vocab {
	tb.Helper()
	v, err := vocab.FromHF(tokenizerJSON, configJSON, pre[model])
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

// corpus is the text every model encodes: hand-written cases for what the
// tokenizers treat differently, then generated mixtures, the same each run.
func corpus() []string {
	out := []string{
		"", " ", "  ", "\n", "\r\n", "\t", "\n\n\n",
		"Hello, world!", " Hello world", "   leading spaces", "trailing spaces   ", "end\n",
		"The quick brown fox jumps over the lazy dog.",
		"I'm sure it's fine, isn't it? They'LL see. We'VE done what you'RE asking; he'D agree.",
		"Café naïve résumé coöperate Ångström façade Straße",
		"e\u0301 a\u0300 o\u0308 composed vs decomposed: é à ö",
		"日本語のテキストです。中文文本。한국어 텍스트.",
		"Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🦀 🇫🇷",
		"func main() {\n\tfmt.Println(\"hi\")\n\tfor i := 0; i < 10; i++ {\n\t\tx += i\n\t}\n}\n",
		"def f(x):\n    if x > 1:\n        return x * 2\n    return None\n",
		"numbers 1 12 123 1234 12345 123456789 3.14159 1,000,000 2026-12-07 ٣٤٥ ①②",
		"mixed: Hello мир שלום مرحبا नमस्ते สวัสดี Γειά σου",
		"<|begin_of_text|>Hello<|end_of_text|>",
		"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
		"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
		"<s>Hello</s>", "<s> Hello </s> world", "text<s>text</s>text", "<unk> and <pad>",
		"<think>\nreasoning here\n</think>\n\nanswer", "<tool_call>{\"name\": \"f\"}</tool_call>",
		"<|fim_prefix|>def<|fim_suffix|>pass<|fim_middle|>", "<|reserved_special_token_5|>",
		"   \n\n\t  \r\n  ", "a\r\nb\rc\nd", "tabs\tand\t\ttabs",
		"!!! ??? ... ,,, ''' \"\"\" ``` ~~~", "a . b , c ! d ? e ' f", "It 's a test . Is it ? Yes !",
		"𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 🂡", "\x00\x01\x07\x1b[0m", "ALL CAPS TEXT WITH 'S AND 'LL",
		strings.Repeat("a", 300), strings.Repeat("ab ", 100), strings.Repeat(" ", 40) + "x",
		strings.Repeat("😀", 20), "http://example.com/path?q=1&r=2#frag", "email@example.com",
		"▁ already a metaspace ▁▁ and <0x41> text",
		// Words Llama 3 keeps whole (ignore_merges) that its merges would split.
		"Tiếng Việt việc hợp nhiều điều ngoài nhiên",
		"Türkçe ektedir mektedir ıldı lardan; jeho ایران",
	}
	words := []string{"the", "The", "of", "model", "token", "mesh", "hello", "WORLD", "Straße", "naïve",
		"I'm", "they'LL", "don't", "O'Neil", "日本", "中文", "한국어", "テスト", "мир", "שלום", "مرحبا", "नमस्ते"}
	spaces := []string{" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "    ", "\u3000", "\u00a0"}
	punct := []string{".", ",", "!", "?", ";", ":", "'", "\"", "(", ")", "{", "}", "...", "-", "_", "/", "\\",
		"@", "#", "$", "%", "^", "&", "*", "+", "=", "<", ">", "|", "~", "`", "'s", "'ll", "n't", " .", " 's"}
	emoji := []string{"😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🦀", "🇫🇷", "✨", "☕"}
	code := []string{"func", "()", ":=", "if err != nil {", "return", "self.x", "#include", "x[i]", "->", "=>", "&&", "0x1F", "\treturn nil\n"}
	spec := []string{"<|begin_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
		"<s>", "</s>", "<unk>", "<think>", "</think>", "<|", "|>", "<", "s>"}
	r := rand.New(rand.NewPCG(20261207, 2))
	pick := func(p []string) string { return p[r.IntN(len(p))] }
	for range 600 {
		var b strings.Builder
		for range 1 + r.IntN(14) {
			switch k := r.IntN(20); {
			case k < 6:
				b.WriteString(pick(words))
			case k < 9:
				b.WriteString(pick(spaces))
			case k < 11:
				b.WriteString(pick(punct))
			case k < 12:
				b.WriteString(pick(emoji))
			case k < 14:
				b.WriteString(pick(code))
			case k < 15:
				fmt.Fprint(&b, r.IntN(1_000_000))
			case k < 16:
				b.WriteString(pick(spec))
			default:
				for range 1 + r.IntN(4) {
					b.WriteRune(randomRune(r))
				}
			}
		}
		out = append(out, b.String())
	}
	return out
}

// randomRune draws from the scripts and blocks tokenizers split differently.
func randomRune(r *rand.Rand) rune {
	ranges := [][2]rune{
		{0x20, 0x7e}, {0x20, 0x7e}, {0xa0, 0x17e}, {0x300, 0x36f}, {0x370, 0x4ff}, {0x590, 0x6ff},
		{0x900, 0x97f}, {0xe00, 0xe7f}, {0x2000, 0x206f}, {0x3040, 0x30ff}, {0x4e00, 0x9fff},
		{0xac00, 0xd7a3}, {0xff00, 0xffef}, {0x1d400, 0x1d7ff}, {0x1f300, 0x1faff}, {0x0, 0x1f},
	}
	for {
		g := ranges[r.IntN(len(ranges))]
		if c := g[0] + rune(r.IntN(int(g[1]-g[0]+1))); utf8.ValidRune(c) {
			return c
		}
	}
}

// loadBoth loads the real tokenizer of model and the one converted from the
// vocabulary the GGUF converter would write for it.
func loadBoth(tb testing.TB, model string) (orig, conv *text.Tokenizer, v *vocab.Vocab, convConfig []byte) {
	tb.Helper()
	tj, cj := texttest.Files(tb, model)
	v = fromHF(tb, model, tj, cj)
	gotTJ, gotCJ, err := vocab.Convert(v)
	if err != nil {
		tb.Fatalf("Convert: %v", err)
	}
	if orig, err = text.Load(tj, cj); err != nil {
		tb.Fatal(err)
	}
	if conv, err = text.Load(gotTJ, gotCJ); err != nil {
		tb.Fatalf("loading the converted files: %v", err)
	}
	return orig, conv, v, gotCJ
}

// TestRealTokenizers converts the vocabulary llama.cpp's converter writes
// for the real Llama 3, Qwen3 and Llama 2 tokenizers and checks that the
// result encodes and decodes the corpus exactly as the original files do,
// and that the special tokens and the chat template come through.
func TestRealTokenizers(t *testing.T) {
	texts := corpus()
	for _, model := range texttest.Models {
		t.Run(model, func(t *testing.T) {
			t.Parallel()
			orig, conv, v, convConfig := loadBoth(t, model)
			if orig.VocabSize() != conv.VocabSize() {
				t.Errorf("vocabulary size %d, want %d", conv.VocabSize(), orig.VocabSize())
			}

			// Special flags agree except where the GGUF converter promotes
			// an added token that looks special (Qwen3's <|fim_prefix|> and
			// kin) to a control token.
			promoted := map[int64]bool{}
			for id := range int64(orig.VocabSize()) {
				tok, _ := orig.Token(id)
				want := orig.IsSpecial(id)
				if v.Types[id] == vocab.TypeControl && !want && strings.HasPrefix(tok, "<|") && strings.HasSuffix(tok, "|>") {
					promoted[id] = true
					want = true
				}
				if conv.IsSpecial(id) != want {
					t.Errorf("token %d (%q): special %v, want %v", id, tok, conv.IsSpecial(id), want)
				}
			}
			t.Logf("%d added tokens the converter promotes to control", len(promoted))

			for _, s := range texts {
				want, err := orig.Encode(s, false)
				if err != nil {
					t.Fatal(err)
				}
				got, err := conv.Encode(s, false)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, want) {
					t.Errorf("Encode(%q):\n got %v\nwant %v", s, got, want)
					continue
				}
				checkDecode(t, orig, conv, want, promoted)
			}

			// Random id lists, special tokens included.
			r := rand.New(rand.NewPCG(7, uint64(len(model))))
			for range 300 {
				ids := make([]int64, 1+r.IntN(12))
				for i := range ids {
					ids[i] = r.Int64N(int64(orig.VocabSize()))
				}
				checkDecode(t, orig, conv, ids, promoted)
			}

			// The post-processor: the converted tokenizer adds what
			// llama.cpp adds for this metadata.
			const s = "Hello world"
			plain, _ := orig.Encode(s, false)
			gotSpecial, _ := conv.Encode(s, true)
			wantSpecial, _ := orig.Encode(s, true)
			if model == "llama3" {
				// This (older) Llama 3 tokenizer.json adds nothing, and its
				// tokenizer_config.json has no add_bos_token; llama.cpp adds
				// BOS for llama-bpe then, as the later Llama 3 files do.
				wantSpecial = append([]int64{v.BOS}, plain...)
			}
			if !slices.Equal(gotSpecial, wantSpecial) {
				t.Errorf("Encode(%q, addSpecial) = %v, want %v", s, gotSpecial, wantSpecial)
			}

			for _, x := range []struct {
				name      string
				got, want func(*text.Tokenizer) (string, bool)
			}{{"BOS", (*text.Tokenizer).BOS, (*text.Tokenizer).BOS}, {"EOS", (*text.Tokenizer).EOS, (*text.Tokenizer).EOS}} {
				gs, gok := x.got(conv)
				ws, wok := x.want(orig)
				if gs != ws || gok != wok {
					t.Errorf("%s = %q %v, want %q %v", x.name, gs, gok, ws, wok)
				}
			}
			var cfg struct {
				ChatTemplate string `json:"chat_template"`
			}
			if err := json.Unmarshal(convConfig, &cfg); err != nil {
				t.Fatal(err)
			}
			if cfg.ChatTemplate != v.ChatTemplate {
				t.Errorf("chat_template: got %d bytes, want %d", len(cfg.ChatTemplate), len(v.ChatTemplate))
			}
			if v.ChatTemplate == "" {
				if model != "llama2" { // the npm Llama 2 package has none
					t.Errorf("%s: the test vocabulary has no chat template", model)
				}
				return
			}
			_, origConfig := texttest.Files(t, model)
			if got, want := render(t, convConfig), render(t, origConfig); got != want {
				t.Errorf("chat prompt:\n got %q\nwant %q", got, want)
			}
		})
	}
}

// render renders a short conversation with the chat template and the BOS
// and EOS of a tokenizer_config.json.
func render(tb testing.TB, config []byte) string {
	tb.Helper()
	tmpl, err := chat.FromConfig(config, nil)
	if err != nil {
		tb.Fatal(err)
	}
	bos, eos := chat.BOSEOS(config)
	out, err := tmpl.Render([]chat.Message{
		{Role: "system", Content: "You are terse."},
		{Role: "user", Content: "Hi <3"},
		{Role: "assistant", Content: "Hello."},
		{Role: "user", Content: "Bye"},
	}, chat.Options{AddGenerationPrompt: true, BOS: bos, EOS: eos})
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// checkDecode decodes ids with both tokenizers, with and without special
// tokens; ids holding a promoted token are compared only with them kept.
func checkDecode(t *testing.T, orig, conv *text.Tokenizer, ids []int64, promoted map[int64]bool) {
	t.Helper()
	for _, skip := range []bool{false, true} {
		if skip && slices.ContainsFunc(ids, func(id int64) bool { return promoted[id] }) {
			continue
		}
		want, err := orig.Decode(ids, skip)
		if err != nil {
			t.Fatal(err)
		}
		got, err := conv.Decode(ids, skip)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("Decode(%v, skip %v) = %q, want %q", ids, skip, got, want)
		}
	}
}

// TestLlama2MergesMatch checks that the merges derived from the scores are
// Llama 2's own merge list, in the same order.
func TestLlama2MergesMatch(t *testing.T) {
	tj, cj := texttest.Files(t, "llama2")
	v := fromHF(t, "llama2", tj, cj)
	got, _, err := vocab.Convert(v)
	if err != nil {
		t.Fatal(err)
	}
	want := mergeList(t, tj)
	if g := mergeList(t, got); !slices.Equal(g, want) {
		t.Fatalf("%d merges, want %d; first difference at %d", len(g), len(want), firstDiff(g, want))
	}

	// score = -id gives the same set in another order.
	for id := range v.Scores {
		if v.Types[id] == vocab.TypeNormal {
			v.Scores[id] = -float32(id)
		}
	}
	got, _, err = vocab.Convert(v)
	if err != nil {
		t.Fatal(err)
	}
	g := mergeList(t, got)
	if slices.Equal(g, want) {
		t.Fatal("score = -id reproduced the order too: the rank-derived scores are not needed")
	}
	slices.Sort(g)
	w := slices.Clone(want)
	slices.Sort(w)
	if !slices.Equal(g, w) {
		t.Errorf("score = -id: the merge set differs")
	}
}

func mergeList(tb testing.TB, tokenizerJSON []byte) []string {
	tb.Helper()
	var f struct {
		Model struct {
			Merges json.RawMessage `json:"merges"`
		} `json:"model"`
	}
	if err := json.Unmarshal(tokenizerJSON, &f); err != nil {
		tb.Fatal(err)
	}
	m, err := vocab.MergeStrings(f.Model.Merges)
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

func firstDiff(a, b []string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
