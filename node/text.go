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
	"sync"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
)

// maxCodecs bounds the parsed tokenizers a node keeps (a Llama 3 tokenizer
// takes some tens of MB parsed).
const maxCodecs = 8

// maxCodecFileBytes bounds each tokenizer file this node fetches and
// parses: the largest real ones are some tens of MB, and a manifest may
// claim anything.
const maxCodecFileBytes = 128 << 20

// chatPrompt renders a conversation with the model's codec, as the API
// answers its failures.
func chatPrompt(c *text.Codec, msgs []chat.Message) ([]int64, *httpError) {
	if len(msgs) == 0 {
		return nil, badRequest("messages must not be empty")
	}
	p, err := c.Chat(msgs)
	var terr *chat.TemplateError
	switch {
	case errors.As(err, &terr):
		return nil, &httpError{http.StatusBadRequest, "template_refused", "the model's chat template refused the conversation: " + terr.Message}
	case errors.Is(err, text.ErrNoChatTemplate):
		return nil, &httpError{http.StatusBadRequest, "no_chat_template", err.Error() + ": use /v1/completions"}
	case err != nil:
		return nil, badRequest("rendering the chat: %v", err)
	}
	return p, nil
}

// textCodecs caches the codecs of models this node talked to.
type textCodecs struct {
	mu sync.Mutex
	m  map[string]*text.Codec
}

// codec returns the text codec of model id with manifest man, reading its
// tokenizer files from the store or fetching them from the mesh.
func (n *Node) codec(ctx context.Context, id cid.Cid, man *shards.Manifest) (*text.Codec, error) {
	if man.Decoder == nil || man.Decoder.Tokenizer == shards.TokenizerBytes {
		return text.BytesCodec, nil
	}
	key := id.String()
	n.codecs.mu.Lock()
	c, ok := n.codecs.m[key]
	n.codecs.mu.Unlock()
	if ok {
		return c, nil
	}
	files, err := n.modelFiles(ctx, man, text.CodecFiles...)
	if err != nil {
		return nil, err
	}
	c, err = text.NewCodec(man, files)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", id, err)
	}
	n.codecs.mu.Lock()
	if n.codecs.m == nil || len(n.codecs.m) >= maxCodecs {
		n.codecs.m = map[string]*text.Codec{} // content-addressed: dropping is always safe
	}
	n.codecs.m[key] = c
	n.codecs.mu.Unlock()
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
		if f.Size > maxCodecFileBytes {
			return nil, fmt.Errorf("the model's %s is %d bytes, over the %d this node reads", name, f.Size, maxCodecFileBytes)
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
	_, man, codec, herr := n.textModelCodec(r.Context(), req.Model)
	var toks []int64
	if herr == nil && len(req.Messages) > 0 {
		var msgs []chat.Message
		msgs, err := chatMessages(req.Messages)
		if err != nil {
			herr = badRequest("%v", err)
		} else if herr = checkTextBytes(man, chatBytes(msgs)); herr == nil {
			toks, herr = chatPrompt(codec, msgs)
		}
	} else if herr == nil {
		// A text longer than the context is refused before it is tokenized.
		if herr = checkTextBytes(man, len(req.Content)); herr == nil {
			var err error
			if toks, err = codec.Encode(req.Content, req.AddSpecial); err != nil {
				herr = badRequest("tokenizing: %v", err)
			}
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
			piece, err := codec.Piece(t)
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
	s, err := codec.Decode(req.Tokens)
	if err != nil {
		writeAPIError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, DetokenizeResponse{Content: s})
}
