package text

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/dlclark/regexp2/v2"
)

// preTokenizer cuts normalized text into the pieces the model encodes one
// by one. atStart says the section begins the input (no added token before
// it), which Metaspace's prepend_scheme "first" needs.
type preTokenizer interface {
	preTokenize(pieces []string, atStart bool) ([]string, error)
}

type preTokenizerSeq []preTokenizer

func (q preTokenizerSeq) preTokenize(pieces []string, atStart bool) ([]string, error) {
	var err error
	for _, p := range q {
		if pieces, err = p.preTokenize(pieces, atStart); err != nil {
			return nil, err
		}
	}
	return pieces, nil
}

// Split behaviors: what happens to the matched delimiters.
const (
	behaviorRemoved            = "Removed"
	behaviorIsolated           = "Isolated"
	behaviorMergedWithPrevious = "MergedWithPrevious"
	behaviorMergedWithNext     = "MergedWithNext"
	behaviorContiguous         = "Contiguous"
)

type split struct {
	pattern  pattern
	behavior string
	invert   bool
}

func (s *split) preTokenize(pieces []string, _ bool) ([]string, error) {
	var out []string
	for _, p := range pieces {
		var err error
		if out, err = s.splitOne(out, p); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// splitOne appends the pieces of text to out.
func (s *split) splitOne(out []string, text string) ([]string, error) {
	type seg struct {
		a, b  int
		delim bool
	}
	var segs []seg
	prev := 0
	ms, err := s.pattern.find(text)
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		if m[0] > prev {
			segs = append(segs, seg{prev, m[0], s.invert})
		}
		segs = append(segs, seg{m[0], m[1], !s.invert})
		prev = m[1]
	}
	if prev < len(text) {
		segs = append(segs, seg{prev, len(text), s.invert})
	}
	switch s.behavior {
	case behaviorIsolated:
		for _, g := range segs {
			out = append(out, text[g.a:g.b])
		}
	case behaviorRemoved:
		for _, g := range segs {
			if !g.delim {
				out = append(out, text[g.a:g.b])
			}
		}
	case behaviorMergedWithPrevious:
		start := -1
		for _, g := range segs {
			if start < 0 {
				start = g.a
			}
			if g.delim {
				out = append(out, text[start:g.b])
				start = -1
			}
		}
		if start >= 0 {
			out = append(out, text[start:])
		}
	case behaviorMergedWithNext:
		start := -1
		for _, g := range segs {
			if g.delim && start >= 0 {
				out = append(out, text[start:g.a])
				start = -1
			}
			if start < 0 {
				start = g.a
			}
		}
		if start >= 0 {
			out = append(out, text[start:])
		}
	case behaviorContiguous:
		for i := 0; i < len(segs); {
			j := i + 1
			for segs[i].delim && j < len(segs) && segs[j].delim {
				j++
			}
			out = append(out, text[segs[i].a:segs[j-1].b])
			i = j
		}
	}
	return out, nil
}

// gpt2Pattern is the ByteLevel pre-tokenizer's split when use_regex is set.
var gpt2Pattern = func() *regexp2.Regexp {
	re := regexp2.MustCompile(`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, regexp2.None)
	re.MatchTimeout = regexTimeout
	return re
}()

// byteLevel maps every byte to a printable rune (GPT-2's bytes_to_unicode),
// after an optional GPT-2 split and leading space.
type byteLevel struct {
	addPrefixSpace bool
	useRegex       bool
}

func (b *byteLevel) preTokenize(pieces []string, _ bool) ([]string, error) {
	var out []string
	for _, p := range pieces {
		if b.addPrefixSpace && !strings.HasPrefix(p, " ") {
			p = " " + p
		}
		if b.useRegex {
			ms, err := gpt2Pattern.FindAllStringIndex(p, -1)
			if err != nil {
				return nil, fmt.Errorf("ByteLevel split: %w", err)
			}
			for _, m := range ms {
				out = append(out, toByteLevel(p[m[0]:m[1]]))
			}
			continue
		}
		out = append(out, toByteLevel(p))
	}
	return out, nil
}

// byteToRune and runeToByte are GPT-2's bytes_to_unicode table.
var byteToRune, runeToByte = func() ([256]rune, map[rune]byte) {
	var b2r [256]rune
	r2b := make(map[rune]byte, 256)
	n := 0
	for b := range 256 {
		printable := (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
		if printable {
			b2r[b] = rune(b)
		} else {
			b2r[b] = rune(256 + n)
			n++
		}
		r2b[b2r[b]] = byte(b)
	}
	return b2r, r2b
}()

func toByteLevel(s string) string {
	var b strings.Builder
	b.Grow(2 * len(s))
	for i := 0; i < len(s); i++ {
		b.WriteRune(byteToRune[s[i]])
	}
	return b.String()
}

// Metaspace prepend schemes: when a section gets the replacement in front.
const (
	prependAlways = "always"
	prependFirst  = "first" // only the section at the start of the input
	prependNever  = "never"
)

// metaspace is SentencePiece's whitespace handling: spaces become the
// replacement (usually ▁), which is prepended per the scheme; with split,
// pieces start at each replacement.
type metaspace struct {
	replacement string
	prepend     string
	split       bool
}

func (m *metaspace) preTokenize(pieces []string, atStart bool) ([]string, error) {
	var out []string
	for i, p := range pieces {
		p = strings.ReplaceAll(p, " ", m.replacement)
		if !strings.HasPrefix(p, m.replacement) &&
			(m.prepend == prependAlways || (m.prepend == prependFirst && atStart && i == 0)) {
			p = m.replacement + p
		}
		if !m.split {
			out = append(out, p)
			continue
		}
		for p != "" {
			j := strings.Index(p[len(m.replacement):], m.replacement)
			if j < 0 {
				out = append(out, p)
				break
			}
			out = append(out, p[:len(m.replacement)+j])
			p = p[len(m.replacement)+j:]
		}
	}
	return out, nil
}

// metaspaceConfig reads Metaspace's fields, old (add_prefix_space) or new
// (prepend_scheme).
func metaspaceConfig(raw json.RawMessage) (*metaspace, error) {
	c := struct {
		Replacement    string  `json:"replacement"`
		AddPrefixSpace *bool   `json:"add_prefix_space"`
		PrependScheme  *string `json:"prepend_scheme"`
		Split          *bool   `json:"split"`
	}{Replacement: "\u2581"}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	if c.Replacement == "" {
		return nil, fmt.Errorf("metaspace with an empty replacement")
	}
	m := &metaspace{replacement: c.Replacement, prepend: prependAlways, split: true}
	if c.AddPrefixSpace != nil && !*c.AddPrefixSpace {
		m.prepend = prependNever
	}
	if c.PrependScheme != nil {
		switch *c.PrependScheme {
		case prependAlways, prependFirst, prependNever:
			m.prepend = *c.PrependScheme
		default:
			return nil, fmt.Errorf("%w: Metaspace prepend_scheme %q", ErrUnknownComponent, *c.PrependScheme)
		}
	}
	if c.Split != nil {
		m.split = *c.Split
	}
	return m, nil
}

func loadPreTokenizer(raw json.RawMessage) (preTokenizer, error) {
	typ, present, err := componentType(raw)
	if !present || err != nil {
		return nil, err
	}
	switch typ {
	case "Sequence":
		q, err := loadSequence(raw, "pretokenizers", loadPreTokenizer)
		return preTokenizerSeq(q), err
	case "Split":
		var c struct {
			Pattern  pattern `json:"pattern"`
			Behavior string  `json:"behavior"`
			Invert   bool    `json:"invert"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("pre-tokenizer Split: %w", err)
		}
		switch c.Behavior {
		case behaviorRemoved, behaviorIsolated, behaviorMergedWithPrevious, behaviorMergedWithNext, behaviorContiguous:
		default:
			return nil, fmt.Errorf("%w: Split behavior %q", ErrUnknownComponent, c.Behavior)
		}
		return &split{c.Pattern, c.Behavior, c.Invert}, nil
	case "ByteLevel":
		c := struct {
			AddPrefixSpace bool `json:"add_prefix_space"`
			UseRegex       bool `json:"use_regex"`
		}{UseRegex: true}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, err
		}
		return &byteLevel{c.AddPrefixSpace, c.UseRegex}, nil
	case "Metaspace":
		return metaspaceConfig(raw)
	}
	return nil, fmt.Errorf("%w: pre-tokenizer type %q", ErrUnknownComponent, typ)
}
