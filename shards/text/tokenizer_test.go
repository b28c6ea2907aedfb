package text

import (
	"errors"
	"strings"
	"testing"
)

// tiny is a small byte-level BPE tokenizer.json for the tests that need no
// real model; {{PRE}}, {{MODEL}} and {{DEC}} are replaced by the test.
const tiny = `{
  "added_tokens": [{"id": 6, "content": "<eos>", "special": true},
                   {"id": 7, "content": "<tool>", "special": false, "lstrip": true, "rstrip": true}],
  "normalizer": null,
  "pre_tokenizer": {{PRE}},
  "model": {{MODEL}},
  "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<eos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}},
  "decoder": {{DEC}}
}`

const (
	tinyPre   = `{"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}`
	tinyModel = `{"type": "BPE", "vocab": {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4, "c": 5}, "merges": [["a", "b"], ["Ġ", "ab"]]}`
	tinyDec   = `{"type": "ByteLevel"}`
)

func tinyJSON(pre, model, dec string) []byte {
	r := strings.NewReplacer("{{PRE}}", pre, "{{MODEL}}", model, "{{DEC}}", dec)
	return []byte(r.Replace(tiny))
}

func TestTiny(t *testing.T) {
	tok, err := Load(tinyJSON(tinyPre, tinyModel, tinyDec), []byte(`{"bos_token": {"content": "<eos>"}, "eos_token": "<eos>", "clean_up_tokenization_spaces": false}`))
	if err != nil {
		t.Fatal(err)
	}
	ids, err := tok.Encode("ab ab<eos>c  <tool>  ab", true)
	if err != nil {
		t.Fatal(err)
	}
	want := []int64{6, 3, 4, 6, 5, 7, 3}
	if !equal(ids, want) {
		t.Errorf("Encode: got %v, want %v", ids, want)
	}
	if got, _ := tok.Decode(ids, true); got != "ab abc<tool>ab" {
		t.Errorf("Decode skipping special: %q", got)
	}
	if got, _ := tok.Decode(ids, false); got != "<eos>ab ab<eos>c<tool>ab" {
		t.Errorf("Decode: %q", got)
	}
	if n := tok.VocabSize(); n != 8 {
		t.Errorf("VocabSize %d, want 8", n)
	}
	if id, ok := tok.TokenID("Ġab"); !ok || id != 4 {
		t.Errorf("TokenID(Ġab) = %d, %v", id, ok)
	}
	if s, ok := tok.Token(7); !ok || s != "<tool>" {
		t.Errorf("Token(7) = %q, %v", s, ok)
	}
	if _, ok := tok.Token(8); ok {
		t.Error("Token(8) exists")
	}
	if !tok.IsSpecial(6) || tok.IsSpecial(7) || tok.IsSpecial(3) {
		t.Error("IsSpecial wrong")
	}
	if s, ok := tok.BOS(); !ok || s != "<eos>" {
		t.Errorf("BOS %q %v", s, ok)
	}
	if s, ok := tok.EOS(); !ok || s != "<eos>" {
		t.Errorf("EOS %q %v", s, ok)
	}
}

func equal(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestLoadErrors(t *testing.T) {
	for _, c := range []struct {
		name      string
		json      []byte
		config    []byte
		want      string
		component bool
	}{
		{"malformed", []byte(`{"model": `), nil, "tokenizer.json", false},
		{"no model", []byte(`{"added_tokens": []}`), nil, "no model", false},
		{"unknown model", tinyJSON(tinyPre, `{"type": "WordPiece", "vocab": {}}`, tinyDec), nil, `model type "WordPiece"`, true},
		{"unknown pre-tokenizer", tinyJSON(`{"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}]}`, tinyModel, tinyDec), nil, `pre-tokenizer type "Whitespace"`, true},
		{"unknown decoder", tinyJSON(tinyPre, tinyModel, `{"type": "CTC"}`), nil, `decoder type "CTC"`, true},
		{"unknown split behavior", tinyJSON(`{"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways"}`, tinyModel, tinyDec), nil, `Split behavior "Sideways"`, true},
		{"bad regex", tinyJSON(`{"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated"}`, tinyModel, tinyDec), nil, "regex", false},
		{"merge outside vocab", tinyJSON(tinyPre, `{"type": "BPE", "vocab": {"a": 0}, "merges": ["a z"]}`, tinyDec), nil, "missing from the vocabulary", false},
		{"bad merge string", tinyJSON(tinyPre, `{"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}`, tinyDec), nil, "not two tokens", false},
		{"malformed config", tinyJSON(tinyPre, tinyModel, tinyDec), []byte(`{`), "tokenizer_config.json", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Load(c.json, c.config)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
			if errors.Is(err, ErrUnknownComponent) != c.component {
				t.Errorf("errors.Is(%v, ErrUnknownComponent) = %v", err, !c.component)
			}
		})
	}
}

func TestDecodeErrors(t *testing.T) {
	tok, err := Load(tinyJSON(tinyPre, tinyModel, tinyDec), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []int64{-1, 8, 1 << 40} {
		if _, err := tok.Decode([]int64{3, id}, false); !errors.Is(err, ErrUnknownID) {
			t.Errorf("Decode(%d): %v, want ErrUnknownID", id, err)
		}
		if _, err := tok.NewStream(false).Add(id); !errors.Is(err, ErrUnknownID) {
			t.Errorf("Stream.Add(%d): %v, want ErrUnknownID", id, err)
		}
	}
	if got, err := tok.Decode(nil, false); err != nil || got != "" {
		t.Errorf("Decode(nil) = %q, %v", got, err)
	}
}

func TestLossyUTF8(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"abc", "abc"},
		{"\xe2\x82", "\uFFFD"},
		{"\xe2\x82a", "\uFFFDa"},
		{"\xf0\x9f\x98", "\uFFFD"},
		{"\xff\xfe", "\uFFFD\uFFFD"},
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"}, // a surrogate: ED A0 is not a valid prefix
		{"\xc0\xaf", "\uFFFD\uFFFD"},
		{"a\xf4\x90\x80\x80b", "a\uFFFD\uFFFD\uFFFD\uFFFDb"},
	} {
		if got := lossyUTF8([]byte(c.in)); got != c.want {
			t.Errorf("lossyUTF8(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestSplitBehaviors(t *testing.T) {
	for _, c := range []struct {
		behavior string
		invert   bool
		want     []string
	}{
		{behaviorIsolated, false, []string{"a", "-", "b", "-", "-", "c"}},
		{behaviorRemoved, false, []string{"a", "b", "c"}},
		{behaviorMergedWithPrevious, false, []string{"a-", "b-", "-", "c"}},
		{behaviorMergedWithNext, false, []string{"a", "-b", "-", "-c"}},
		{behaviorContiguous, false, []string{"a", "-", "b", "--", "c"}},
		{behaviorRemoved, true, []string{"-", "-", "-"}},
	} {
		s := &split{pattern: pattern{str: "-"}, behavior: c.behavior, invert: c.invert}
		got, _ := s.preTokenize([]string{"a-b--c"}, true)
		if strings.Join(got, "|") != strings.Join(c.want, "|") {
			t.Errorf("%s (invert %v): %q, want %q", c.behavior, c.invert, got, c.want)
		}
	}
}

// FuzzEncode checks that any text encodes without error and that Decode
// accepts the ids and a Stream joins to the same text.
func FuzzEncode(f *testing.F) {
	tok, err := Load(tinyJSON(tinyPre, tinyModel, tinyDec), nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add("ab ab<eos>c")
	f.Add("\xff\xfe<tool>")
	f.Fuzz(func(t *testing.T, s string) {
		ids, err := tok.Encode(s, true)
		if err != nil {
			t.Fatal(err)
		}
		want, err := tok.Decode(ids, false)
		if err != nil {
			t.Fatal(err)
		}
		st := tok.NewStream(false)
		var b strings.Builder
		for _, id := range ids {
			p, err := st.Add(id)
			if err != nil {
				t.Fatal(err)
			}
			b.WriteString(p)
		}
		b.WriteString(st.Flush())
		if b.String() != want {
			t.Fatalf("stream %q, Decode %q", b.String(), want)
		}
	})
}

// FuzzLoad checks that Load refuses or accepts any bytes without panicking.
func FuzzLoad(f *testing.F) {
	f.Add(tinyJSON(tinyPre, tinyModel, tinyDec))
	f.Add([]byte(`{"model": {"type": "BPE", "vocab": {"a": -1}, "merges": []}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		tok, err := Load(data, nil)
		if err == nil {
			_, _ = tok.Encode("ab c", true)
		}
	})
}

// TestConcurrent encodes from several goroutines at once (the word cache is
// shared); run it with -race.
func TestConcurrent(t *testing.T) {
	tok, err := Load(tinyJSON(tinyPre, tinyModel, tinyDec), nil)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := tok.Encode("ab ab c ab", false)
	done := make(chan error)
	for range 4 {
		go func() {
			for range 200 {
				got, err := tok.Encode("ab ab c ab", false)
				if err == nil && !equal(got, want) {
					err = errors.New("different ids")
				}
				if err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}

func TestMetaspace(t *testing.T) {
	for _, c := range []struct {
		config  string
		atStart bool
		in      string
		want    []string
	}{
		{`{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}`, true, "Hey friend!  x", []string{"▁Hey", "▁friend!", "▁", "▁x"}},
		{`{"type": "Metaspace", "replacement": "▁", "add_prefix_space": true}`, false, "Hey friend", []string{"▁Hey", "▁friend"}},
		{`{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}`, false, "Hey friend", []string{"Hey▁friend"}},
		{`{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}`, true, "Hey friend", []string{"▁Hey▁friend"}},
		{`{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"}`, true, " Hey", []string{"▁Hey"}},
	} {
		p, err := loadPreTokenizer([]byte(c.config))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := p.preTokenize([]string{c.in}, c.atStart)
		if strings.Join(got, "|") != strings.Join(c.want, "|") {
			t.Errorf("%s on %q (at start %v): %q, want %q", c.config, c.in, c.atStart, got, c.want)
		}
	}
	d, err := loadDecoder([]byte(`{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(decodeTokens(d, []string{"▁▁Hey", "▁friend"}, []bool{false, false}), ""); got != "Hey friend" {
		t.Errorf("Metaspace decoder: %q", got)
	}
	if _, err := loadPreTokenizer([]byte(`{"type": "Metaspace", "prepend_scheme": "sometimes"}`)); !errors.Is(err, ErrUnknownComponent) {
		t.Errorf("bad prepend_scheme: %v", err)
	}
}
