package text

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/text/chat"
)

// CodecFiles are the model files a Codec reads, when the model has them.
var CodecFiles = []string{"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}

// ErrNoChatTemplate is returned by Codec.Chat for a model whose
// tokenizer_config.json has no chat template (a base model).
var ErrNoChatTemplate = errors.New("the model has no chat template (tokenizer_config.json has no chat_template)")

// Codec is everything a generation loop needs of a text model's vocabulary:
// prompts to tokens (through the chat template for conversations), tokens
// back to text as they stream, and the tokens that end a generation. A
// built test model's is the "bytes" codec (token i is byte i, chats laid
// out as "ROLE: CONTENT" lines); an imported model's reads its Hugging Face
// files. A Codec is safe for concurrent use.
type Codec struct {
	tok      *Tokenizer     // nil: token i is byte i
	template *chat.Template // nil: none (bytes: the plain layout)
	bos, eos string         // the template's bos_token and eos_token
	stops    map[int64]bool
}

// BytesCodec is the codec of every "bytes" model.
var BytesCodec = &Codec{}

// NewCodec builds the codec of a model from its manifest and the files of
// CodecFiles it has (files[name]; missing ones absent).
func NewCodec(man *shards.Manifest, files map[string][]byte) (*Codec, error) {
	d := man.Decoder
	if d == nil {
		return nil, errors.New("the model has no decoder: it is not a text model")
	}
	if d.Tokenizer == shards.TokenizerBytes {
		return BytesCodec, nil
	}
	tok, err := Load(files["tokenizer.json"], files["tokenizer_config.json"])
	if err != nil {
		return nil, err
	}
	if tok.VocabSize() > d.Vocab {
		return nil, fmt.Errorf("the tokenizer has %d tokens but the model's vocabulary is %d", tok.VocabSize(), d.Vocab)
	}
	c := &Codec{tok: tok, stops: map[int64]bool{}}
	for _, e := range d.EOS {
		c.stops[e] = true
	}
	if cfg := files["tokenizer_config.json"]; cfg != nil {
		c.bos, c.eos = chat.BOSEOS(cfg)
		c.template, err = chat.FromConfig(cfg, files["chat_template.jinja"])
		if err != nil && !errors.Is(err, chat.ErrNoTemplate) {
			return nil, fmt.Errorf("chat template: %w", err)
		}
	}
	if len(c.stops) == 0 { // no eos in the manifest: the tokenizer's own
		if eos, ok := tok.EOS(); ok {
			if id, ok := tok.TokenID(eos); ok {
				c.stops[id] = true
			}
		}
	}
	return c, nil
}

// Encode turns a prompt into tokens; addSpecial adds what the tokenizer's
// post-processor adds (Llama 2's <s>), as a plain completion does.
func (c *Codec) Encode(s string, addSpecial bool) ([]int64, error) {
	if c.tok == nil {
		p := make([]int64, len(s))
		for i := range len(s) {
			p[i] = int64(s[i])
		}
		return p, nil
	}
	return c.tok.Encode(s, addSpecial)
}

// Decode is the text of tokens, special tokens left out. A bytes model's
// text may hold bytes that are no UTF-8 (random models emit any byte).
func (c *Codec) Decode(toks []int64) (string, error) {
	if c.tok == nil {
		b := make([]byte, 0, len(toks))
		for _, t := range toks {
			if t < 0 || t > 255 {
				return "", fmt.Errorf("%w: token %d is not a byte", ErrUnknownID, t)
			}
			b = append(b, byte(t))
		}
		return string(b), nil
	}
	return c.tok.Decode(toks, true)
}

// Piece is the text of one token, special tokens included.
func (c *Codec) Piece(tok int64) (string, error) {
	if c.tok == nil {
		return c.Decode([]int64{tok})
	}
	return c.tok.Decode([]int64{tok}, false)
}

// Stop says whether tok ends a generation (one of the model's eos tokens).
func (c *Codec) Stop(tok int64) bool { return c.stops[tok] }

// StopTokens lists the model's eos tokens, in order.
func (c *Codec) StopTokens() []int64 {
	out := make([]int64, 0, len(c.stops))
	for t := range c.stops {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// TokenStream turns generated tokens into text as they come: Add returns
// the text token tok makes final (never half a UTF-8 character), Flush
// what is left when the generation ends.
type TokenStream interface {
	Add(tok int64) (string, error)
	Flush() string
}

// Stream starts decoding a generation; special tokens are left out.
func (c *Codec) Stream() TokenStream {
	if c.tok == nil {
		return &byteStream{}
	}
	return c.tok.NewStream(true)
}

// byteStream decodes byte tokens, holding back an incomplete UTF-8
// sequence until its last byte comes; tokens past 255 have no text.
type byteStream struct{ pending []byte }

func (s *byteStream) Add(tok int64) (string, error) {
	if tok < 0 || tok > 255 {
		return "", nil
	}
	s.pending = append(s.pending, byte(tok))
	cut := completeUTF8(s.pending)
	out := string(s.pending[:cut])
	s.pending = append(s.pending[:0], s.pending[cut:]...)
	return out, nil
}

func (s *byteStream) Flush() string {
	out := string(s.pending)
	s.pending = nil
	return out
}

// completeUTF8 is the length of the longest prefix of b that does not end
// inside a UTF-8 sequence.
func completeUTF8(b []byte) int {
	for i := len(b) - 1; i >= 0 && i >= len(b)-utf8.UTFMax+1; i-- {
		if utf8.RuneStart(b[i]) {
			if !utf8.FullRune(b[i:]) {
				return i
			}
			break
		}
	}
	return len(b)
}

// Chat renders a conversation with the model's chat template, a generation
// prompt for the reply appended, into the prompt's tokens. A conversation
// the template refuses gives its *chat.TemplateError; a model without a
// template gives ErrNoChatTemplate. A bytes model lays the conversation out
// as one "ROLE: CONTENT" line per message, then "assistant: ".
func (c *Codec) Chat(msgs []chat.Message) ([]int64, error) {
	if len(msgs) == 0 {
		return nil, errors.New("no messages")
	}
	if c.tok == nil {
		var b strings.Builder
		for _, m := range msgs {
			fmt.Fprintf(&b, "%s: %s\n", m.Role, m.Content)
		}
		b.WriteString("assistant: ")
		return c.Encode(b.String(), false)
	}
	if c.template == nil {
		return nil, ErrNoChatTemplate
	}
	s, err := c.template.Render(msgs, chat.Options{AddGenerationPrompt: true, BOS: c.bos, EOS: c.eos})
	if err != nil {
		return nil, err
	}
	// The template wrote the special tokens (BOS included) itself.
	return c.tok.Encode(s, false)
}
