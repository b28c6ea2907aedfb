package cli

import (
	"errors"
	"fmt"
	"strings"
	"unicode"

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

// localCodec reads the text codec of a model in a local directory.
func localCodec(m *shards.Model) (*text.Codec, error) {
	files := map[string][]byte{}
	for _, name := range text.CodecFiles {
		if _, ok := m.Manifest.File(name); !ok {
			continue
		}
		b, err := m.File(name)
		if err != nil {
			return nil, err
		}
		files[name] = b
	}
	return text.NewCodec(m.Manifest, files)
}

// localPrompt tokenizes s, as a user message through the model's chat
// template when asChat is set.
func localPrompt(c *text.Codec, s string, asChat bool) ([]int64, error) {
	if !asChat {
		return c.Encode(s, true)
	}
	p, err := c.Chat([]chat.Message{{Role: "user", Content: s}})
	if errors.Is(err, text.ErrNoChatTemplate) {
		return nil, fmt.Errorf("%w: leave out --chat", err)
	}
	return p, err
}

// validUTF8 replaces each byte of s that is not part of a UTF-8 character
// by U+FFFD, as JSON encoding does to the node API's text.
func validUTF8(s string) string { return string([]rune(s)) }
