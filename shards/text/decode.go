package text

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// postProcessor adds the special tokens of a single sequence.
type postProcessor interface {
	process(ids []int64, addSpecial bool) []int64
}

type postProcessorSeq []postProcessor

func (q postProcessorSeq) process(ids []int64, addSpecial bool) []int64 {
	for _, p := range q {
		ids = p.process(ids, addSpecial)
	}
	return ids
}

// byteLevelPost only adjusts offsets in Hugging Face; ids pass unchanged.
type byteLevelPost struct{}

func (byteLevelPost) process(ids []int64, _ bool) []int64 { return ids }

// template is TemplateProcessing's "single" template: special-token ids
// around sequence A.
type template struct {
	items [][]int64 // nil: the sequence
}

func (t template) process(ids []int64, addSpecial bool) []int64 {
	if !addSpecial {
		return ids
	}
	var out []int64
	for _, it := range t.items {
		if it == nil {
			out = append(out, ids...)
		} else {
			out = append(out, it...)
		}
	}
	return out
}

func loadPostProcessor(raw json.RawMessage, tokenID func(string) (int64, bool)) (postProcessor, error) {
	typ, present, err := componentType(raw)
	if !present || err != nil {
		return nil, err
	}
	switch typ {
	case "ByteLevel":
		return byteLevelPost{}, nil
	case "Sequence":
		var c struct {
			Processors []json.RawMessage `json:"processors"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, err
		}
		var q postProcessorSeq
		for _, r := range c.Processors {
			p, err := loadPostProcessor(r, tokenID)
			if err != nil {
				return nil, err
			}
			if p != nil {
				q = append(q, p)
			}
		}
		return q, nil
	case "TemplateProcessing":
		var c struct {
			Single []struct {
				SpecialToken *struct {
					ID string `json:"id"`
				} `json:"SpecialToken"`
				Sequence *struct {
					ID string `json:"id"`
				} `json:"Sequence"`
			} `json:"single"`
			SpecialTokens map[string]struct {
				IDs []int64 `json:"ids"`
			} `json:"special_tokens"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, err
		}
		var tp template
		for _, it := range c.Single {
			switch {
			case it.Sequence != nil:
				if it.Sequence.ID != "A" {
					return nil, fmt.Errorf("TemplateProcessing: single template names sequence %q", it.Sequence.ID)
				}
				tp.items = append(tp.items, nil)
			case it.SpecialToken != nil:
				st, ok := c.SpecialTokens[it.SpecialToken.ID]
				if !ok {
					id, known := tokenID(it.SpecialToken.ID)
					if !known {
						return nil, fmt.Errorf("TemplateProcessing: unknown special token %q", it.SpecialToken.ID)
					}
					st.IDs = []int64{id}
				}
				tp.items = append(tp.items, append([]int64{}, st.IDs...))
			default:
				return nil, fmt.Errorf("TemplateProcessing: template item is neither SpecialToken nor Sequence")
			}
		}
		return tp, nil
	}
	return nil, fmt.Errorf("%w: post-processor type %q", ErrUnknownComponent, typ)
}

// dtok is a token on its way through the decoders; added marks added
// tokens, which the ByteLevel decoder passes through unchanged.
type dtok struct {
	s     string
	added bool
}

type decoder interface {
	chain(toks []dtok) []dtok
}

// decodeTokens runs d over toks and returns the resulting strings.
func decodeTokens(d decoder, toks []string, added []bool) []string {
	in := make([]dtok, len(toks))
	for i := range toks {
		in[i] = dtok{toks[i], added[i]}
	}
	out := d.chain(in)
	strs := make([]string, len(out))
	for i, t := range out {
		strs[i] = t.s
	}
	return strs
}

type decoderSeq []decoder

func hasByteFallback(d decoder) bool {
	switch d := d.(type) {
	case byteFallbackDecoder:
		return true
	case decoderSeq:
		for _, x := range d {
			if hasByteFallback(x) {
				return true
			}
		}
	}
	return false
}

func (q decoderSeq) chain(toks []dtok) []dtok {
	for _, d := range q {
		toks = d.chain(toks)
	}
	return toks
}

// byteLevelDecoder maps byte-level runes back to bytes and reads them as
// UTF-8, replacing invalid sequences with U+FFFD.
type byteLevelDecoder struct{}

func (byteLevelDecoder) chain(toks []dtok) []dtok {
	var out []dtok
	var buf []byte
	flush := func() {
		if len(buf) > 0 {
			out = append(out, dtok{s: lossyUTF8(buf)})
			buf = buf[:0]
		}
	}
	for _, t := range toks {
		if t.added {
			flush()
			out = append(out, t)
			continue
		}
		for _, r := range t.s {
			if b, ok := runeToByte[r]; ok {
				buf = append(buf, b)
			} else {
				buf = utf8.AppendRune(buf, r)
			}
		}
	}
	flush()
	return out
}

type replaceDecoder struct {
	from, to string
}

func (r replaceDecoder) chain(toks []dtok) []dtok {
	for i := range toks {
		toks[i].s = strings.ReplaceAll(toks[i].s, r.from, r.to)
	}
	return toks
}

// byteFallbackDecoder turns runs of <0xNN> tokens back into text; a run
// that is not valid UTF-8 becomes one U+FFFD per byte, as in Hugging Face.
type byteFallbackDecoder struct{}

func byteToken(s string) (byte, bool) {
	if len(s) != 6 || !strings.HasPrefix(s, "<0x") || s[5] != '>' {
		return 0, false
	}
	b, err := strconv.ParseUint(s[3:5], 16, 8)
	return byte(b), err == nil
}

func (byteFallbackDecoder) chain(toks []dtok) []dtok {
	var out []dtok
	var buf []byte
	flush := func() {
		if len(buf) == 0 {
			return
		}
		if utf8.Valid(buf) {
			out = append(out, dtok{s: string(buf)})
		} else {
			out = append(out, dtok{s: strings.Repeat("\uFFFD", len(buf))})
		}
		buf = buf[:0]
	}
	for _, t := range toks {
		if b, ok := byteToken(t.s); ok {
			buf = append(buf, b)
			continue
		}
		flush()
		out = append(out, t)
	}
	flush()
	return out
}

type fuseDecoder struct{}

func (fuseDecoder) chain(toks []dtok) []dtok {
	var b strings.Builder
	for _, t := range toks {
		b.WriteString(t.s)
	}
	return []dtok{{s: b.String()}}
}

// stripDecoder removes up to start leading and stop trailing copies of
// content from every token.
type stripDecoder struct {
	content     string
	start, stop int
}

func (d stripDecoder) chain(toks []dtok) []dtok {
	for i := range toks {
		s := toks[i].s
		for n := 0; n < d.start && strings.HasPrefix(s, d.content); n++ {
			s = s[len(d.content):]
		}
		for n := 0; n < d.stop && strings.HasSuffix(s, d.content); n++ {
			s = s[:len(s)-len(d.content)]
		}
		toks[i].s = s
	}
	return toks
}

// metaspaceDecoder turns the replacement back into spaces; in the first
// token it is dropped unless the scheme never prepends (as Hugging Face's
// Metaspace decoder does).
type metaspaceDecoder struct{ m *metaspace }

func (d metaspaceDecoder) chain(toks []dtok) []dtok {
	for i := range toks {
		to := " "
		if i == 0 && d.m.prepend != prependNever {
			to = ""
		}
		toks[i].s = strings.ReplaceAll(toks[i].s, d.m.replacement, to)
	}
	return toks
}

func loadDecoder(raw json.RawMessage) (decoder, error) {
	typ, present, err := componentType(raw)
	if !present || err != nil {
		return nil, err
	}
	switch typ {
	case "Sequence":
		q, err := loadSequence(raw, "decoders", loadDecoder)
		return decoderSeq(q), err
	case "ByteLevel":
		return byteLevelDecoder{}, nil
	case "ByteFallback":
		return byteFallbackDecoder{}, nil
	case "Metaspace":
		m, err := metaspaceConfig(raw)
		if err != nil {
			return nil, err
		}
		return metaspaceDecoder{m}, nil
	case "Fuse":
		return fuseDecoder{}, nil
	case "Replace":
		var c struct {
			Pattern pattern `json:"pattern"`
			Content string  `json:"content"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("decoder Replace: %w", err)
		}
		if c.Pattern.re != nil {
			return nil, fmt.Errorf("%w: Replace decoder with a Regex pattern", ErrUnknownComponent)
		}
		return replaceDecoder{c.Pattern.str, c.Content}, nil
	case "Strip":
		var c struct {
			Content string `json:"content"`
			Start   int    `json:"start"`
			Stop    int    `json:"stop"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, err
		}
		if c.Content == "" {
			return nil, fmt.Errorf("decoder Strip has empty content")
		}
		return stripDecoder{c.Content, c.Start, c.Stop}, nil
	}
	return nil, fmt.Errorf("%w: decoder type %q", ErrUnknownComponent, typ)
}

// cleanUpPairs is transformers' clean_up_tokenization: spaces before
// punctuation and English contractions go. The replacements run one after
// another over the whole text, as in transformers.
var cleanUpPairs = [][2]string{
	{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
	{" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"},
}

func cleanUp(s string) string {
	if !strings.Contains(s, " ") {
		return s
	}
	for _, p := range cleanUpPairs {
		s = strings.ReplaceAll(s, p[0], p[1])
	}
	return s
}

// lossyUTF8 reads b as UTF-8, replacing each maximal invalid subpart with
// one U+FFFD (the WHATWG and Rust from_utf8_lossy rule, not Go's one per
// byte).
func lossyUTF8(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var sb strings.Builder
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if r != utf8.RuneError || size > 1 {
			sb.Write(b[i : i+size])
			i += size
			continue
		}
		sb.WriteString("\uFFFD")
		i += invalidPrefix(b[i:])
	}
	return sb.String()
}

// invalidPrefix is the length of the maximal subpart of a UTF-8 sequence
// at the start of b, which is not a valid character.
func invalidPrefix(b []byte) int {
	c := b[0]
	var need int
	lo, hi := byte(0x80), byte(0xBF)
	switch {
	case c >= 0xC2 && c <= 0xDF:
		need = 2
	case c >= 0xE0 && c <= 0xEF:
		need = 3
		if c == 0xE0 {
			lo = 0xA0
		} else if c == 0xED {
			hi = 0x9F
		}
	case c >= 0xF0 && c <= 0xF4:
		need = 4
		if c == 0xF0 {
			lo = 0x90
		} else if c == 0xF4 {
			hi = 0x8F
		}
	default:
		return 1
	}
	n := 1
	for n < need && n < len(b) {
		if b[n] < lo || b[n] > hi {
			break
		}
		lo, hi = 0x80, 0xBF
		n++
	}
	return n
}
