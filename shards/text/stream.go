package text

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Stream window sizes: once more than streamRebaseAfter ids are pending and
// all their text is out, the stream keeps only the last few ids (at least
// streamContext) as context, so that each Add decodes a bounded window.
const (
	streamRebaseAfter = 32
	streamContext     = 4
	// streamContextRunes is the least text the context must decode to:
	// longer than clean_up_tokenization's longest pattern (" n't").
	streamContextRunes = 5
)

// errStreamUnstable means a later token changed text a Stream had already
// returned, which the hold-back rules are meant to rule out.
var errStreamUnstable = errors.New("stream: decoded text changed behind the returned text")

// Stream decodes generated tokens one at a time. Each Add returns the text
// that no later token can change: never half a UTF-8 character, never
// text from a byte-fallback run (<0xNN> tokens) before the run ends, never a space that the clean-up of
// spaces before punctuation could still remove. Everything returned by Add
// and Flush, joined, equals Decode of all the ids. A Stream is not safe for
// concurrent use.
type Stream struct {
	t    *Tokenizer
	skip bool

	ids        []int64 // the window: ids[:prefix] is context whose text is out
	prefix     int
	prefixText string // Decode(ids[:prefix])
	out        string // text of the window beyond prefixText already returned
}

// NewStream starts decoding a sequence of generated tokens.
func (t *Tokenizer) NewStream(skipSpecial bool) *Stream {
	return &Stream{t: t, skip: skipSpecial}
}

// Add appends one token and returns the text that is now final.
func (s *Stream) Add(id int64) (string, error) {
	if _, ok := s.t.Token(id); !ok {
		return "", fmt.Errorf("%w: %d (vocabulary size %d)", ErrUnknownID, id, len(s.t.tokens))
	}
	s.ids = append(s.ids, id)
	if tok, _ := s.t.Token(id); s.t.byteFallback && !(s.skip && s.t.special[id]) {
		if _, isByte := byteToken(tok); isByte {
			// A byte-fallback run decodes as a whole, and a later invalid
			// byte turns all of it into U+FFFD: wait for its end.
			return "", nil
		}
	}
	cand, err := s.window()
	if err != nil {
		s.ids = s.ids[:len(s.ids)-1]
		return "", err
	}
	stable := len(cand) - s.holdBack(cand)
	if stable < len(s.out) {
		return "", nil
	}
	piece := cand[len(s.out):stable]
	s.out = cand[:stable]
	if stable == len(cand) && len(s.ids)-s.prefix > streamRebaseAfter {
		s.rebase(cand)
	}
	return piece, nil
}

// window decodes the window and returns its text beyond the context.
func (s *Stream) window() (string, error) {
	full, err := s.t.Decode(s.ids, s.skip)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(full, s.prefixText) {
		return "", errStreamUnstable
	}
	cand := full[len(s.prefixText):]
	if !strings.HasPrefix(cand, s.out) {
		return "", errStreamUnstable
	}
	return cand, nil
}

// rebase keeps the last streamContext (or 2, 4 times as many) ids as context when their text can
// stand for the text so far: it must be the tail of what was returned, at
// least streamContextRunes long (so that a Strip decoder only ever strips
// the context, and a clean-up pattern across its start lies in text already
// final), and must not start inside a character (U+FFFD).
func (s *Stream) rebase(cand string) {
	for n := streamContext; n <= streamRebaseAfter/2; n *= 2 {
		ctx := s.ids[len(s.ids)-n:]
		text, err := s.t.Decode(ctx, s.skip)
		if err != nil || utf8.RuneCountInString(text) < streamContextRunes || !strings.HasSuffix(s.prefixText+cand, text) {
			continue
		}
		if r, _ := utf8.DecodeRuneInString(text); r == utf8.RuneError {
			continue
		}
		s.ids = append(s.ids[:0:0], ctx...)
		s.prefix = len(s.ids)
		s.prefixText = text
		s.out = ""
		return
	}
}

// cleanUpPrefixes are the ends of text that a following token could turn
// into one of clean_up_tokenization's patterns.
var cleanUpPrefixes = []string{" n'", " 'v", " 'r", " n", " '", " "}

// holdBack is how many bytes at the end of cand a later token could still
// change.
func (s *Stream) holdBack(cand string) int {
	n := 0
	for strings.HasSuffix(cand[:len(cand)-n], "\uFFFD") {
		n += len("\uFFFD")
	}
	if s.t.cleanup {
		rest := cand[:len(cand)-n]
		for _, p := range cleanUpPrefixes {
			if strings.HasSuffix(rest, p) {
				n += len(p)
				break
			}
		}
	}
	return n
}

// Flush returns the text still held back and resets the stream.
func (s *Stream) Flush() string {
	cand, err := s.window()
	var rest string
	if err == nil {
		rest = cand[len(s.out):]
	}
	*s = Stream{t: s.t, skip: s.skip}
	return rest
}
