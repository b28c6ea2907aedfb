package text

import (
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"
)

// addedSplitter finds added tokens in raw text: at each position the
// longest added token that starts there wins, as in Hugging Face.
type addedSplitter struct {
	byFirst map[byte][]addedTokenJSON // longest first
}

// section is a piece of the input: an added token (id >= 0) or text for
// the normalizer, pre-tokenizer and model (id == -1).
type section struct {
	text string
	id   int64
}

func newAddedSplitter(tokens []addedTokenJSON) *addedSplitter {
	s := &addedSplitter{byFirst: make(map[byte][]addedTokenJSON)}
	for _, a := range tokens {
		if a.Content == "" {
			continue
		}
		s.byFirst[a.Content[0]] = append(s.byFirst[a.Content[0]], a)
	}
	for _, list := range s.byFirst {
		sort.SliceStable(list, func(i, j int) bool { return len(list[i].Content) > len(list[j].Content) })
	}
	return s
}

func isWordRune(r rune) bool {
	return r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.Mn, r)
}

// match returns the added token starting at s[i:], if any.
func (a *addedSplitter) match(s string, i int) (addedTokenJSON, bool) {
	for _, tok := range a.byFirst[s[i]] {
		if !strings.HasPrefix(s[i:], tok.Content) {
			continue
		}
		if tok.SingleWord {
			if before, _ := utf8.DecodeLastRuneInString(s[:i]); i > 0 && isWordRune(before) {
				continue
			}
			end := i + len(tok.Content)
			if after, _ := utf8.DecodeRuneInString(s[end:]); end < len(s) && isWordRune(after) {
				continue
			}
		}
		return tok, true
	}
	return addedTokenJSON{}, false
}

// split cuts s into text and added-token sections. An lstrip (rstrip)
// token swallows the whitespace on its left (right).
func (a *addedSplitter) split(s string) []section {
	if len(a.byFirst) == 0 {
		if s == "" {
			return nil
		}
		return []section{{text: s, id: -1}}
	}
	var out []section
	start := 0
	for i := 0; i < len(s); {
		if _, ok := a.byFirst[s[i]]; !ok {
			i++
			continue
		}
		tok, ok := a.match(s, i)
		if !ok {
			i++
			continue
		}
		textEnd := i
		if tok.LStrip {
			textEnd = start + len(strings.TrimRightFunc(s[start:i], unicode.IsSpace))
		}
		if textEnd > start {
			out = append(out, section{text: s[start:textEnd], id: -1})
		}
		out = append(out, section{text: tok.Content, id: tok.ID})
		i += len(tok.Content)
		if tok.RStrip {
			i = len(s) - len(strings.TrimLeftFunc(s[i:], unicode.IsSpace))
		}
		start = i
	}
	if start < len(s) {
		out = append(out, section{text: s[start:], id: -1})
	}
	return out
}
