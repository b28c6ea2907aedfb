package text_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
	"github.com/infermesh/infermesh/shards/text/texttest"
)

// The bytes codec: a prompt's bytes are its tokens, a stream never splits
// a character, and chats are "ROLE: CONTENT" lines.
func TestBytesCodec(t *testing.T) {
	man := &shards.Manifest{Decoder: &shards.DecoderSpec{Tokenizer: shards.TokenizerBytes, Vocab: 256}}
	c, err := text.NewCodec(man, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := c.Encode("hé", true)
	if !slices.Equal(p, []int64{'h', 0xc3, 0xa9}) {
		t.Fatalf("encode: %v", p)
	}
	s := c.Stream()
	var pieces []string
	for _, tok := range p {
		piece, err := s.Add(tok)
		if err != nil {
			t.Fatal(err)
		}
		pieces = append(pieces, piece)
	}
	if !slices.Equal(pieces, []string{"h", "", "é"}) || s.Flush() != "" {
		t.Fatalf("stream pieces %q", pieces)
	}
	chatToks, err := c.Chat([]chat.Message{{Role: "user", Content: "hi"}})
	if got, _ := c.Decode(chatToks); err != nil || got != "user: hi\nassistant: " {
		t.Fatalf("chat: %q %v", got, err)
	}
	if _, err := c.Decode([]int64{300}); !errors.Is(err, text.ErrUnknownID) {
		t.Fatalf("decode of token 300: %v", err)
	}
}

// An imported model's codec: its eos tokens stop, its template renders,
// and a vocabulary smaller than the tokenizer's is refused.
func TestHFCodec(t *testing.T) {
	tokJSON, tokCfg := texttest.Files(t, "llama3")
	files := map[string][]byte{"tokenizer.json": tokJSON, "tokenizer_config.json": tokCfg}
	man := &shards.Manifest{Decoder: &shards.DecoderSpec{Tokenizer: shards.TokenizerHF, Vocab: 128256, EOS: []int64{128001, 128009}}}
	c, err := text.NewCodec(man, files)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Stop(128009) || !c.Stop(128001) || c.Stop(128000) {
		t.Fatal("eos tokens")
	}
	p, err := c.Chat([]chat.Message{{Role: "user", Content: "Hello"}})
	if err != nil {
		t.Fatal(err)
	}
	if p[0] != 128000 || p[len(p)-1] != 271 { // <|begin_of_text|> ... "\n\n" after the assistant header
		t.Fatalf("chat tokens %v", p)
	}
	if piece, _ := c.Piece(128000); piece != "<|begin_of_text|>" {
		t.Fatalf("piece %q", piece)
	}
	man.Decoder.Vocab = 1000
	if _, err := text.NewCodec(man, files); err == nil || !strings.Contains(err.Error(), "vocabulary") {
		t.Fatalf("a tokenizer bigger than the model's vocabulary: %v", err)
	}
	man.Decoder.Vocab, man.Decoder.EOS = 128256, nil
	if c, err = text.NewCodec(man, files); err != nil || !c.Stop(128001) { // tokenizer_config's eos_token
		t.Fatalf("eos from the tokenizer: %v", err)
	}
	delete(files, "tokenizer_config.json")
	c, _ = text.NewCodec(man, files)
	if _, err := c.Chat([]chat.Message{{Role: "user", Content: "Hello"}}); !errors.Is(err, text.ErrNoChatTemplate) {
		t.Fatalf("chat without a template: %v", err)
	}
}
