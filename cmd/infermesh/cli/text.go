package cli

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
)

// printableText shows generated text, escaping the control characters a
// random model emits that a terminal would act on.
func printableText(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r == '\n' || r == '\t' || !unicode.IsControl(r) {
			b.WriteRune(r)
		} else {
			fmt.Fprintf(&b, "\\x%02x", r)
		}
	}
	return b.String()
}

// textCodec is a model's tokenizer for commands that run its blocks in
// this process: bytes for built models, the model's own tokenizer files
// (and chat template) for imported ones.
type textCodec struct {
	tok      *text.Tokenizer // nil: bytes
	stream   *text.Stream
	template *chat.Template
	bos, eos string
	pending  []byte // bytes model: an unfinished UTF-8 sequence
}

func localCodec(m *shards.Model) (*textCodec, error) {
	if m.Manifest.Decoder.Tokenizer == shards.TokenizerBytes {
		return &textCodec{}, nil
	}
	tokJSON, err := m.File("tokenizer.json")
	if err != nil {
		return nil, err
	}
	var tokCfg, tmpl []byte
	if _, ok := m.Manifest.File("tokenizer_config.json"); ok {
		if tokCfg, err = m.File("tokenizer_config.json"); err != nil {
			return nil, err
		}
	}
	if _, ok := m.Manifest.File("chat_template.jinja"); ok {
		if tmpl, err = m.File("chat_template.jinja"); err != nil {
			return nil, err
		}
	}
	tok, err := text.Load(tokJSON, tokCfg)
	if err != nil {
		return nil, err
	}
	c := &textCodec{tok: tok, stream: tok.NewStream(true)}
	if tokCfg != nil {
		c.bos, c.eos = chat.BOSEOS(tokCfg)
		if c.template, err = chat.FromConfig(tokCfg, tmpl); err != nil && !errors.Is(err, chat.ErrNoTemplate) {
			return nil, err
		}
	}
	return c, nil
}

// prompt tokenizes s, as a user message through the chat template when
// asChat is set.
func (c *textCodec) prompt(s string, asChat bool) ([]int64, error) {
	if c.tok == nil {
		if asChat {
			s = "user: " + s + "\nassistant: "
		}
		return bytesToTokens(s), nil
	}
	if !asChat {
		return c.tok.Encode(s, true)
	}
	if c.template == nil {
		return nil, errors.New("the model has no chat template: leave out --chat")
	}
	r, err := c.template.Render([]chat.Message{{Role: "user", Content: s}}, chat.Options{AddGenerationPrompt: true, BOS: c.bos, EOS: c.eos})
	if err != nil {
		return nil, err
	}
	return c.tok.Encode(r, false)
}

// add returns the printable text token tok completes.
func (c *textCodec) add(tok int64) (string, error) {
	if c.tok == nil {
		if tok < 0 || tok > 255 {
			return "", nil
		}
		c.pending = append(c.pending, byte(tok))
		if !utf8.FullRune(c.pending) && len(c.pending) < utf8.UTFMax {
			return "", nil
		}
		s := string(c.pending)
		c.pending = c.pending[:0]
		return printableText(validUTF8(s)), nil
	}
	s, err := c.stream.Add(tok)
	return printableText(s), err
}

func (c *textCodec) flush() string {
	if c.tok == nil {
		s := string(c.pending)
		c.pending = nil
		return printableText(validUTF8(s))
	}
	return printableText(c.stream.Flush())
}

// validUTF8 replaces each byte of s that is not part of a UTF-8 character
// by U+FFFD, as JSON encoding does to the node API's text.
func validUTF8(s string) string { return string([]rune(s)) }
