package node

// How a text model's tokens become text and back. Built test models use the
// "bytes" tokenizer (token i is byte i) and a plain chat layout; an imported
// model carries its Hugging Face tokenizer.json, tokenizer_config.json (chat
// template, special tokens) and generation_config.json as content-addressed
// files named in its manifest. This node reads them from its store, or
// fetches them from the model's servers like blocks, and keeps the parsed
// tokenizer of the few models it talks to.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
)

// maxCodecs bounds the parsed tokenizers a node keeps (a Llama 3 tokenizer
// takes some tens of MB parsed).
const maxCodecs = 8

// textCodec encodes prompts, renders chats and decodes generated tokens for
// one model. The zero value's tok is nil: the bytes tokenizer.
type textCodec struct {
	tok      *text.Tokenizer // nil: token i is byte i
	template *chat.Template  // nil: no chat template (chat is refused for hf models)
	bos, eos string          // the template's bos_token and eos_token
	stops    map[int64]bool  // tokens that end a generation
}

// bytesCodec is the codec of every "bytes" model.
var bytesCodec = &textCodec{}

// encode turns a prompt into tokens; addSpecial adds what the tokenizer's
// post-processor adds (Llama 2's <s>), as a plain completion does. A chat
// prompt rendered by the template already has them.
func (c *textCodec) encode(s string, addSpecial bool) ([]int64, error) {
	if c.tok == nil {
		p := make([]int64, len(s))
		for i := range len(s) {
			p[i] = int64(s[i])
		}
		return p, nil
	}
	return c.tok.Encode(s, addSpecial)
}

// decode is the text of tokens; special tokens are left out.
func (c *textCodec) decode(toks []int64) (string, error) {
	if c.tok == nil {
		b := make([]byte, 0, len(toks))
		for _, t := range toks {
			if t < 0 || t > 255 {
				return "", fmt.Errorf("token %d is not a byte", t)
			}
			b = append(b, byte(t))
		}
		return string(b), nil
	}
	return c.tok.Decode(toks, true)
}

// tokenStream turns generated tokens into text as they come.
type tokenStream interface {
	// Add returns the text that token tok makes final.
	Add(tok int64) (string, error)
	// Flush returns what is left once generation ends.
	Flush() string
}

// stream starts decoding a generation; special tokens are left out.
func (c *textCodec) stream() tokenStream {
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
// inside a UTF-8 sequence, so that streamed pieces of text split runes
// nowhere.
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

// chatPrompt renders a conversation into the prompt's tokens: through the
// model's chat template, or, for a bytes model, as "ROLE: CONTENT\n" per
// message then "assistant: ".
func (c *textCodec) chatPrompt(msgs []chat.Message) ([]int64, *httpError) {
	if len(msgs) == 0 {
		return nil, badRequest("messages must not be empty")
	}
	if c.tok == nil {
		var b strings.Builder
		for _, m := range msgs {
			fmt.Fprintf(&b, "%s: %s\n", m.Role, m.Content)
		}
		b.WriteString("assistant: ")
		p, _ := c.encode(b.String(), false)
		return p, nil
	}
	if c.template == nil {
		return nil, &httpError{http.StatusBadRequest, "no_chat_template",
			"the model has no chat template (tokenizer_config.json has no chat_template): use /v1/completions"}
	}
	s, err := c.template.Render(msgs, chat.Options{AddGenerationPrompt: true, BOS: c.bos, EOS: c.eos})
	var terr *chat.TemplateError
	if errors.As(err, &terr) {
		return nil, &httpError{http.StatusBadRequest, "template_refused", "the model's chat template refused the conversation: " + terr.Message}
	}
	if err != nil {
		return nil, badRequest("rendering the chat template: %v", err)
	}
	// The template wrote the special tokens (BOS included) itself.
	p, err := c.encode(s, false)
	if err != nil {
		return nil, badRequest("tokenizing the chat prompt: %v", err)
	}
	return p, nil
}

// textCodecs caches the codecs of models this node talked to.
type textCodecs struct {
	mu sync.Mutex
	m  map[string]*textCodec
}

// codec returns the text codec of model id with manifest man, reading its
// tokenizer files from the store or fetching them from the mesh.
func (n *Node) codec(ctx context.Context, id cid.Cid, man *shards.Manifest) (*textCodec, error) {
	if man.Decoder == nil || man.Decoder.Tokenizer == shards.TokenizerBytes {
		return bytesCodec, nil
	}
	key := id.String()
	n.codecs.mu.Lock()
	c, ok := n.codecs.m[key]
	n.codecs.mu.Unlock()
	if ok {
		return c, nil
	}
	files, err := n.modelFiles(ctx, man, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
	if err != nil {
		return nil, err
	}
	c, err = newHFCodec(man, files)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", id, err)
	}
	n.codecs.mu.Lock()
	if n.codecs.m == nil || len(n.codecs.m) >= maxCodecs {
		n.codecs.m = map[string]*textCodec{} // content-addressed: dropping is always safe
	}
	n.codecs.m[key] = c
	n.codecs.mu.Unlock()
	return c, nil
}

// newHFCodec builds the codec of an imported model from its files (absent
// ones are missing from files).
func newHFCodec(man *shards.Manifest, files map[string][]byte) (*textCodec, error) {
	tok, err := text.Load(files["tokenizer.json"], files["tokenizer_config.json"])
	if err != nil {
		return nil, err
	}
	if tok.VocabSize() > man.Decoder.Vocab {
		return nil, fmt.Errorf("the tokenizer has %d tokens but the model's vocabulary is %d", tok.VocabSize(), man.Decoder.Vocab)
	}
	c := &textCodec{tok: tok, stops: map[int64]bool{}}
	for _, e := range man.Decoder.EOS {
		c.stops[e] = true
	}
	if cfg := files["tokenizer_config.json"]; cfg != nil {
		c.bos, c.eos = chat.BOSEOS(cfg)
		c.template, err = chat.FromConfig(cfg, files["chat_template.jinja"])
		if err != nil && !errors.Is(err, chat.ErrNoTemplate) {
			return nil, fmt.Errorf("chat template: %w", err)
		}
	}
	if len(c.stops) == 0 { // no generation_config: the tokenizer's own eos
		if eos, ok := tok.EOS(); ok {
			if id, ok := tok.TokenID(eos); ok {
				c.stops[id] = true
			}
		}
	}
	return c, nil
}

// modelFiles returns the named files of a model that it has (others are
// left out), from this node's store or else fetched from peers into it.
func (n *Node) modelFiles(ctx context.Context, man *shards.Manifest, names ...string) (map[string][]byte, error) {
	var missing []cid.Cid
	for _, name := range names {
		f, ok := man.File(name)
		if !ok {
			continue
		}
		c, _ := shards.ParseCID(f.CID)
		if has, _ := n.store.Has(c); !has {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		if err := n.mesh.FetchBlocks(ctx, missing, n.own, mesh.FetchOptions{}); err != nil {
			return nil, fmt.Errorf("fetching the model's tokenizer files: %w", err)
		}
	}
	out := map[string][]byte{}
	for _, name := range names {
		f, ok := man.File(name)
		if !ok {
			continue
		}
		c, _ := shards.ParseCID(f.CID)
		b, err := n.store.Get(c) // verified against its CID
		if err != nil {
			return nil, fmt.Errorf("file %s: %w", name, err)
		}
		out[name] = b
	}
	return out, nil
}

// TokenizeRequest is POST /v1/tokenize (as llama.cpp's server has it, with
// a model): the tokens of content, with the special tokens the tokenizer
// adds when add_special is set; or, with messages, of the chat prompt the
// model's template renders.
type TokenizeRequest struct {
	Model      string        `json:"model"`
	Content    string        `json:"content"`
	AddSpecial bool          `json:"add_special"`
	Messages   []ChatMessage `json:"messages,omitempty"`
	// WithPieces answers each token with its text.
	WithPieces bool `json:"with_pieces"`
}

// TokenizeResponse answers POST /v1/tokenize.
type TokenizeResponse struct {
	Tokens []int64 `json:"tokens"`
	// Pieces is each token's text when with_pieces was asked (a token
	// that is part of a UTF-8 character has the bytes it holds, as
	// replacement characters).
	Pieces []string `json:"pieces,omitempty"`
}

// DetokenizeRequest is POST /v1/detokenize.
type DetokenizeRequest struct {
	Model  string  `json:"model"`
	Tokens []int64 `json:"tokens"`
}

// DetokenizeResponse answers POST /v1/detokenize: the text, special tokens
// left out.
type DetokenizeResponse struct {
	Content string `json:"content"`
}

// maxTokenizeTokens bounds a detokenize request's token list.
const maxTokenizeTokens = 1 << 20

func (n *Node) handleTokenize(w http.ResponseWriter, r *http.Request) {
	var req TokenizeRequest
	if !readOpenAI(w, r, &req) {
		return
	}
	_, _, codec, herr := n.textModelCodec(r.Context(), req.Model)
	var toks []int64
	if herr == nil && len(req.Messages) > 0 {
		var msgs []chat.Message
		msgs, err := chatMessages(req.Messages)
		if err != nil {
			herr = badRequest("%v", err)
		} else {
			toks, herr = codec.chatPrompt(msgs)
		}
	} else if herr == nil {
		var err error
		if toks, err = codec.encode(req.Content, req.AddSpecial); err != nil {
			herr = badRequest("tokenizing: %v", err)
		}
	}
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	resp := TokenizeResponse{Tokens: toks}
	if resp.Tokens == nil {
		resp.Tokens = []int64{}
	}
	if req.WithPieces {
		for _, t := range toks {
			piece, err := codec.piece(t)
			if err != nil {
				writeAPIError(w, http.StatusInternalServerError, "tokenizer", err.Error())
				return
			}
			resp.Pieces = append(resp.Pieces, piece)
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

func (n *Node) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	var req DetokenizeRequest
	if !readOpenAI(w, r, &req) {
		return
	}
	if len(req.Tokens) > maxTokenizeTokens {
		writeAPIError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("at most %d tokens", maxTokenizeTokens))
		return
	}
	_, man, codec, herr := n.textModelCodec(r.Context(), req.Model)
	if herr == nil {
		herr = checkTokens(man, req.Tokens)
	}
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	s, err := codec.decode(req.Tokens)
	if err != nil {
		writeAPIError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, DetokenizeResponse{Content: s})
}

// piece is the text of one token, special tokens included.
func (c *textCodec) piece(tok int64) (string, error) {
	if c.tok == nil {
		return strings.ToValidUTF8(string([]byte{byte(tok)}), "\uFFFD"), nil
	}
	return c.tok.Decode([]int64{tok}, false)
}
