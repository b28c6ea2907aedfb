package node

// The OpenAI-compatible surface: POST /v1/completions, POST
// /v1/chat/completions (streamed as Server-Sent Events or not) and GET
// /v1/models, for text models: a manifest with a decoder, whose tokenizer is
// "bytes" (token i is byte i) or an imported model's Hugging Face tokenizer
// (text.go). The model field is the model's ID (CID).
//
// Chat messages become a prompt through the model's chat template; a bytes
// model has a plain one: one line "ROLE: CONTENT\n" per message, then
// "assistant: " for the reply. Generation stops at the model's eos tokens.
//
// The parameters read are model, prompt (a string, an array of one
// string, or an array of token IDs), messages, max_tokens (default 16
// for completions; for chat max_completion_tokens or max_tokens, default
// 256), temperature (default 1, as OpenAI's; 0 is greedy), top_p, stop (a
// string or an array), seed, n (must be 1), stream and
// stream_options.include_usage, and top_k (an extension). Other fields
// OpenAI's clients send are accepted and ignored.
//
// Errors are {"error": {"code", "message", "type"}}: the API's own shape
// with OpenAI's "type"; once a stream has started, they come as an "event:
// error" whose data is that JSON.
//
// The same generation loop serves POST /v1/generate.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/chat"
	"github.com/ipfs/go-cid"
)

const (
	defaultCompletionTokens = 16
	defaultChatTokens       = 256
	maxStops                = 16
)

// apiError is {"error": {"code", "message", "type"}}.
func apiError(status int, code, msg string) map[string]any {
	typ := "invalid_request_error"
	switch {
	case status == http.StatusTooManyRequests:
		typ = "rate_limit_error"
	case status >= 500:
		typ = "server_error"
	}
	return map[string]any{"error": map[string]string{"code": code, "message": msg, "type": typ}}
}

func writeAPIError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, apiError(status, code, msg))
}

// meshStatus is the HTTP status and error code of a failed generation.
func meshStatus(err error) (int, string) {
	switch {
	case errors.Is(err, mesh.ErrUnknownModel):
		return http.StatusNotFound, "model_not_found"
	case errors.Is(err, mesh.ErrNoRoute):
		return http.StatusServiceUnavailable, "no_route"
	case errors.Is(err, protocol.ErrBusy):
		return http.StatusTooManyRequests, "busy"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, protocol.ErrDeadline):
		return http.StatusGatewayTimeout, "deadline"
	case errors.Is(err, protocol.ErrBadRequest):
		return http.StatusBadRequest, "bad_request"
	}
	return http.StatusBadGateway, "mesh"
}

// Bounds on text requests, so that a huge prompt costs neither the memory
// nor the time of tokenizing it.
const (
	// maxBytesPerToken is more bytes of text than any token stands for in
	// practice: byte-level BPE vocabularies (Llama 3, Qwen, Mistral) make
	// 3 to 5 bytes of real text a token, and their longest tokens (runs of
	// spaces or of '=') are a few dozen bytes. A text longer than the
	// model's context times this cannot fit it, and is refused before it is
	// tokenized. (Every token is at least one byte, so bytes >= tokens, but
	// not the other way round: the bound is on the refusal side.)
	maxBytesPerToken = 32
	// maxTextRequestBytes bounds the body of a text request (completions,
	// chats, generate, tokenize): the largest context of the models
	// supported, 128k tokens (Llama 3.x), at maxBytesPerToken is 4 MiB of
	// text; four times that leaves room for JSON escapes and the other
	// fields. A larger body is refused as context_length_exceeded.
	maxTextRequestBytes = 16 << 20
)

// readOpenAI decodes a request body, accepting fields it does not know (as
// OpenAI's clients send many).
func readOpenAI(w http.ResponseWriter, r *http.Request, v any) bool {
	body := http.MaxBytesReader(w, r.Body, maxTextRequestBytes)
	if err := json.NewDecoder(body).Decode(v); err != nil {
		textBodyError(w, err)
		return false
	}
	bodyRead(body)
	return true
}

// textBodyError answers a text request whose body could not be decoded.
func textBodyError(w http.ResponseWriter, err error) {
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		writeAPIError(w, http.StatusBadRequest, "context_length_exceeded",
			fmt.Sprintf("the request is over %d MiB: more text than any model's context holds", maxTextRequestBytes>>20))
		return
	}
	writeAPIError(w, http.StatusBadRequest, "bad_request", "invalid request body: "+err.Error())
}

// checkTextBytes refuses, before it is tokenized, a text of size bytes
// that cannot fit the model's context (see maxBytesPerToken).
func checkTextBytes(man *shards.Manifest, size int) *httpError {
	if limit := man.Decoder.MaxContext * maxBytesPerToken; size > limit {
		return &httpError{http.StatusBadRequest, "context_length_exceeded",
			fmt.Sprintf("the prompt is %d bytes, more than the model's context of %d tokens can hold (at most %d bytes)",
				size, man.Decoder.MaxContext, limit)}
	}
	return nil
}

// chatBytes is the size of a chat for checkTextBytes: its text, and a
// token's worth for each message, which every template frames.
func chatBytes(msgs []chat.Message) int {
	size := 0
	for _, m := range msgs {
		size += len(m.Role) + len(m.Content) + maxBytesPerToken
	}
	return size
}

// httpError is a failure with its HTTP answer.
type httpError struct {
	status int
	code   string
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, args ...any) *httpError {
	return &httpError{http.StatusBadRequest, "bad_request", fmt.Sprintf(format, args...)}
}

// textModel resolves a text model: 404 if this node and the mesh do not
// know it, 400 if it is not a byte-level text model.
func (n *Node) textModel(ctx context.Context, model string) (cid.Cid, *shards.Manifest, *httpError) {
	id, err := shards.ParseCID(model)
	if err != nil || id.Prefix().Codec != shards.CodecManifest {
		return cid.Undef, nil, &httpError{http.StatusNotFound, "model_not_found",
			fmt.Sprintf("model %q does not exist: a model is the CID of its manifest (GET /v1/models lists them)", model)}
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	man, err := n.Manifest(ctx, id)
	if err != nil {
		status, code := meshStatus(err)
		return cid.Undef, nil, &httpError{status, code, fmt.Sprintf("model %s: %v", id, err)}
	}
	if !isTextModel(man) {
		return cid.Undef, nil, &httpError{http.StatusBadRequest, "unsupported_model",
			fmt.Sprintf("model %s is not a text model (its manifest declares no decoder)", id)}
	}
	return id, man, nil
}

func isTextModel(man *shards.Manifest) bool {
	return man != nil && man.Decoder != nil
}

// textModelCodec resolves a text model and its codec.
func (n *Node) textModelCodec(ctx context.Context, model string) (cid.Cid, *shards.Manifest, *text.Codec, *httpError) {
	id, man, herr := n.textModel(ctx, model)
	if herr != nil {
		return id, man, nil, herr
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := n.codec(ctx, id, man)
	if err != nil {
		status, code := meshStatus(err)
		if status == http.StatusBadGateway {
			status, code = http.StatusInternalServerError, "tokenizer"
		}
		return id, man, nil, &httpError{status, code, fmt.Sprintf("model %s: tokenizer: %v", id, err)}
	}
	return id, man, c, nil
}

// textRequest is one generation from a text model.
type textRequest struct {
	model     cid.Cid
	man       *shards.Manifest
	codec     *text.Codec // nil: looked up from the manifest
	prompt    []int64
	maxTokens int
	sampling  shards.Sampling
	stop      []string
	opts      mesh.InferOptions
	kind      string // for GET /v1/requests: generate, completion, chat
}

// textResult is a finished generation; Tokens and text leave out a stop
// sequence.
type textResult struct {
	*GenerateResult
	text      string
	generated int    // tokens generated, a stop sequence or eos token included
	finish    string // "stop" (an eos token or a stop sequence) or "length"
}

// checkTokens vets tokens against the model's vocabulary.
func checkTokens(man *shards.Manifest, toks []int64) *httpError {
	for _, t := range toks {
		if t < 0 || t >= int64(man.Decoder.Vocab) {
			return badRequest("token %d outside the vocabulary [0,%d)", t, man.Decoder.Vocab)
		}
	}
	return nil
}

// checkPrompt vets a prompt against the model.
func checkPrompt(man *shards.Manifest, prompt []int64) *httpError {
	if len(prompt) == 0 {
		return badRequest("empty prompt")
	}
	if herr := checkTokens(man, prompt); herr != nil {
		return herr
	}
	if len(prompt) >= man.Decoder.MaxContext {
		return &httpError{http.StatusBadRequest, "context_length_exceeded",
			fmt.Sprintf("the prompt has %d tokens; the model's context is %d", len(prompt), man.Decoder.MaxContext)}
	}
	return nil
}

// generateText decodes req through the mesh, one session along the route.
// emit (if not nil) gets each token once it cannot be part of a stop
// sequence; generation ends at the first stop sequence, which is left out.
// An error from emit (the client went away) ends it too.
func (n *Node) generateText(ctx context.Context, req *textRequest, emit func(tok int64, text string) error) (_ *textResult, err error) {
	start := time.Now()
	res := &textResult{GenerateResult: &GenerateResult{}, finish: "length"}
	sess := &meshSession{ctx: ctx, metrics: n.metrics}
	defer func() {
		n.record(ctx, req.kind, req.model.String(), start, sess.infos, res.GenerateResult, err)
	}()
	codec := req.codec
	if codec == nil {
		if codec, err = n.codec(ctx, req.model, req.man); err != nil {
			return nil, err
		}
	}
	opts := req.opts
	if opts.Check == nil {
		opts.Check = checkOutputs(req.man)
	}
	sess.s = n.mesh.NewSession(req.model, opts)
	defer sess.Close()
	next, stop, err := n.tokenSource(ctx, req, sess, codec)
	if err != nil {
		return nil, err
	}
	defer stop()
	var (
		toks []int64
		text []byte
		ends []int // len(text) after each token
		sent int   // tokens emitted
		// whole: the tokens up to the last one that completed some text;
		// those after it have none yet (they end inside a character, or
		// are special) and wait, so that text the stream holds back goes
		// out with a token, however the generation ends.
		whole  int
		stream = codec.Stream()
		// stopped: a stop sequence ended the generation, its text cut
		stopped bool
	)
	// release emits the first n tokens whose text ends by upto.
	release := func(n, upto int) error {
		for ; sent < n && ends[sent] <= upto; sent++ {
			if emit == nil {
				continue
			}
			from := 0
			if sent > 0 {
				from = ends[sent-1]
			}
			if err := emit(toks[sent], string(text[from:ends[sent]])); err != nil {
				return err
			}
		}
		return nil
	}
	for range req.maxTokens {
		tok, err := next()
		if errors.Is(err, shards.ErrContextFull) {
			break
		}
		if err != nil {
			return nil, err
		}
		if len(toks) == 0 {
			res.FirstToken = time.Since(start)
		}
		res.generated++
		if codec.Stop(tok) {
			res.finish = "stop"
			break
		}
		piece, err := stream.Add(tok)
		if err != nil {
			return nil, err
		}
		toks = append(toks, tok)
		text = append(text, piece...)
		ends = append(ends, len(text))
		if piece != "" {
			whole = len(toks)
		}
		if s, ok := stopAt(text, req.stop); ok {
			cut := len(text) - len(s)
			k := 0
			for k < len(toks) && ends[k] <= cut {
				k++
			}
			if err := release(k, cut); err != nil {
				return nil, err
			}
			toks, text, res.finish, stopped = toks[:k], text[:cut], "stop", true
			break
		}
		if err := release(whole, len(text)-holdBack(text, req.stop)); err != nil {
			return nil, err
		}
	}
	if !stopped {
		if rest := stream.Flush(); rest != "" && len(ends) > 0 {
			text = append(text, rest...)
			ends[len(ends)-1] = len(text)
		}
		if err := release(len(toks), len(text)); err != nil {
			return nil, err
		}
	}
	res.Tokens, res.text = toks, string(text)
	res.Steps, res.Total = sess.infos, time.Since(start)
	return res, nil
}

// tokenSource gives a generation's tokens one at a time: from a decode
// ring (the route's last hop samples and feeds the first), or, with
// opts.RequesterLoop, from a loop run here (each token comes back before
// the next step goes out). next returns shards.ErrContextFull when the
// model's context is full; stop ends the ring early.
func (n *Node) tokenSource(ctx context.Context, req *textRequest, sess *meshSession, codec *text.Codec) (next func() (int64, error), stop func(), err error) {
	spec := req.man.Decoder
	if req.opts.RequesterLoop {
		dec, err := shards.NewDecoder(spec, sess, req.prompt, req.sampling)
		if err != nil {
			return nil, nil, badRequest("%v", err)
		}
		return dec.Next, func() {}, nil
	}
	if err := spec.CheckPrompt(req.prompt); err != nil {
		return nil, nil, badRequest("%v", err)
	}
	room := spec.MaxContext - len(req.prompt)
	if room <= 0 {
		return func() (int64, error) { return 0, shards.ErrContextFull }, func() {}, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	toks := make(chan mesh.RingToken, 1)
	done := make(chan error, 1)
	go func() {
		o := mesh.RingOptions{Prompt: shards.StepInputs(spec, req.prompt, 0), Positions: len(req.prompt),
			Sampling: req.sampling, MaxTokens: min(req.maxTokens, room), Eos: codec.StopTokens(), Decoder: spec}
		done <- sess.s.Ring(ctx, o, func(t mesh.RingToken) bool {
			select {
			case toks <- t:
				return true
			case <-ctx.Done():
				return false
			}
		})
		close(toks)
	}()
	next = func() (int64, error) {
		t, ok := <-toks
		if !ok {
			if err := <-done; err != nil {
				return 0, err
			}
			// The ring stops by itself at max tokens (never asked for
			// more), at an eos token (the caller stops at it) and when
			// the context is full.
			return 0, shards.ErrContextFull
		}
		sess.observe(t.Info, nil)
		return t.Token, nil
	}
	stop = func() {
		cancel()
		for range toks {
		}
	}
	return next, stop, nil
}

// decodeLoop reads an API request's decode_loop: whether the requester
// runs the loop (true) or a decode ring does.
func decodeLoop(s string) (requester bool, _ *httpError) {
	switch s {
	case "", "ring":
		return false, nil
	case "requester":
		return true, nil
	}
	return false, badRequest("decode_loop must be \"ring\" or \"requester\", got %q", s)
}

// stopAt says which stop sequence text ends with, if any.
func stopAt(text []byte, stop []string) (string, bool) {
	for _, s := range stop {
		if s != "" && bytes.HasSuffix(text, []byte(s)) {
			return s, true
		}
	}
	return "", false
}

// holdBack is how many bytes at the end of text could begin a stop
// sequence, and so must not be sent yet.
func holdBack(text []byte, stop []string) int {
	hold := 0
	for _, s := range stop {
		for k := min(len(s)-1, len(text)); k > hold; k-- {
			if bytes.HasSuffix(text, []byte(s[:k])) {
				hold = k
				break
			}
		}
	}
	return hold
}

// generateResponse is the answer of /v1/generate.
func generateResponse(res *textResult) GenerateResponse {
	resp := GenerateResponse{Text: res.text, Tokens: res.Tokens, FirstTokenMS: float64(res.FirstToken.Microseconds()) / 1000,
		TotalMS: float64(res.Total.Microseconds()) / 1000, Route: []HopTiming{}}
	if resp.Tokens == nil {
		resp.Tokens = []int64{}
	}
	if res.generated > 1 && res.Total > res.FirstToken {
		resp.TokensPerS = float64(res.generated-1) / (res.Total - res.FirstToken).Seconds()
	}
	if route, failovers := stepsSummary(res.Steps); route != nil {
		resp.Route, resp.Failovers = route, failovers
	}
	return resp
}

// generateAPI is POST /v1/generate: with "stream", one event {"token", "text"} per token as it comes,
// then the GenerateResponse, then [DONE].
func (n *Node) generateAPI(w http.ResponseWriter, r *http.Request, req *GenerateAPIRequest) {
	if req.MaxTokens < 0 {
		writeAPIError(w, http.StatusBadRequest, "bad_request", "max_tokens must not be negative")
		return
	}
	if req.MaxTokens == 0 {
		req.MaxTokens = 32
	}
	if req.TopP < 0 || req.TopP > 1 || req.Temperature < 0 || req.TopK < 0 {
		writeAPIError(w, http.StatusBadRequest, "bad_request", "temperature, top_k must not be negative and top_p must be in [0,1]")
		return
	}
	if len(req.Stop) > maxStops {
		writeAPIError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("at most %d stop sequences", maxStops))
		return
	}
	if _, err := shards.ParseCID(req.Model); err != nil {
		writeAPIError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	model, man, codec, herr := n.textModelCodec(r.Context(), req.Model)
	var prompt []int64
	if herr == nil {
		prompt, herr = encodePrompt(man, codec, req.Prompt)
	}
	if herr == nil {
		herr = checkPrompt(man, prompt)
	}
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	loop, herr := decodeLoop(req.DecodeLoop)
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	sampling := shards.Sampling{Temperature: req.Temperature, TopK: req.TopK, TopP: req.TopP, Seed: req.Seed}
	tr := &textRequest{model: model, man: man, codec: codec, prompt: prompt, maxTokens: req.MaxTokens,
		sampling: sampling, stop: req.Stop, opts: mesh.InferOptions{FP16: req.FP16, RequesterLoop: loop}, kind: "generate"}
	var sse *sseWriter
	var emit func(int64, string) error
	if req.Stream {
		sse = &sseWriter{w: w}
		emit = func(tok int64, text string) error {
			return sse.event("", map[string]any{"token": tok, "text": text})
		}
	}
	res, err := n.generateText(r.Context(), tr, emit)
	if err != nil {
		n.failText(w, r, sse, err)
		return
	}
	if sse == nil {
		writeJSON(w, http.StatusOK, generateResponse(res))
		return
	}
	if sse.event("", generateResponse(res)) == nil {
		sse.done()
	}
}

// failText answers a failed generation: with a status if nothing was sent
// yet, else as an error event (nothing if the client went away).
func (n *Node) failText(w http.ResponseWriter, r *http.Request, sse *sseWriter, err error) {
	if r.Context().Err() != nil && (sse == nil || sse.started) {
		return // the client went away
	}
	status, code := meshStatus(err)
	var herr *httpError
	if errors.As(err, &herr) {
		status, code = herr.status, herr.code
	}
	if sse != nil && sse.started {
		sse.fail(status, code, err.Error())
		return
	}
	writeAPIError(w, status, code, err.Error())
}

// OpenAIParams are the sampling parameters of /v1/completions and
// /v1/chat/completions.
type OpenAIParams struct {
	Model       string          `json:"model"`
	MaxTokens   *int            `json:"max_tokens,omitempty"`
	Temperature *float64        `json:"temperature,omitempty"`
	TopP        *float64        `json:"top_p,omitempty"`
	TopK        int             `json:"top_k,omitempty"`
	N           *int            `json:"n,omitempty"`
	Stream      bool            `json:"stream,omitempty"`
	Stop        json.RawMessage `json:"stop,omitempty"`
	Seed        *int64          `json:"seed,omitempty"`
	// DecodeLoop (an infermesh extension): "ring" (default) runs the
	// decode loop inside the route, "requester" at this node.
	DecodeLoop    string `json:"decode_loop,omitempty"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options,omitempty"`
}

// CompletionRequest is POST /v1/completions.
type CompletionRequest struct {
	OpenAIParams
	Prompt json.RawMessage `json:"prompt"`
}

// ChatRequest is POST /v1/chat/completions.
type ChatRequest struct {
	OpenAIParams
	Messages            []ChatMessage `json:"messages"`
	MaxCompletionTokens *int          `json:"max_completion_tokens,omitempty"`
}

// ChatMessage is a message of a chat; content is a string or an array of
// {"type": "text", "text"} parts.
type ChatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// Usage counts the tokens of a request.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// ChatContent is a chat message of an answer (or its delta when streamed).
type ChatContent struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

// Choice is one choice of an answer: Text for completions, Message or
// Delta for chat.
type Choice struct {
	Index        int          `json:"index"`
	Text         *string      `json:"text,omitempty"`
	Message      *ChatContent `json:"message,omitempty"`
	Delta        *ChatContent `json:"delta,omitempty"`
	Logprobs     any          `json:"logprobs"`
	FinishReason *string      `json:"finish_reason"`
}

// Completion is the answer of /v1/completions and /v1/chat/completions,
// whole or a streamed chunk.
type Completion struct {
	ID      string   `json:"id"`
	Object  string   `json:"object"`
	Created int64    `json:"created"`
	Model   string   `json:"model"`
	Choices []Choice `json:"choices"`
	Usage   *Usage   `json:"usage,omitempty"`
}

// OpenAIModel is a model as GET /v1/models lists it.
type OpenAIModel struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// Mesh is infermesh's own: the model's coverage (OpenAI's clients
	// ignore it).
	Mesh *MeshModel `json:"infermesh"`
}

// MeshModel is what this node knows of a model in the mesh.
type MeshModel struct {
	Name   string `json:"name,omitempty"` // from the manifest, when this node has it
	Blocks int    `json:"blocks"`
	// Text: a text model, for completions, chat and generate.
	Text bool `json:"text"`
	// Of an imported text model: its architecture (as Hugging Face names
	// it), weight dtype, parameter count; of any text model, its context
	// length and tokenizer ("bytes" or "hf").
	Architecture  string `json:"architecture,omitempty"`
	DType         string `json:"dtype,omitempty"`
	Parameters    int64  `json:"parameters,omitempty"`
	ContextLength int    `json:"context_length,omitempty"`
	Tokenizer     string `json:"tokenizer,omitempty"`
	// Complete: every block has a server; Uncovered lists those that have
	// none; Servers counts the peers serving some span.
	Complete  bool  `json:"complete"`
	Uncovered []int `json:"uncovered"`
	Servers   int   `json:"servers"`
}

// sampling vets the parameters; maxTokens is the request's own, if any.
func (p *OpenAIParams) sampling(maxTokens *int, def int) (shards.Sampling, int, []string, *httpError) {
	s := shards.Sampling{Temperature: 1, TopK: p.TopK}
	if p.N != nil && *p.N != 1 {
		return s, 0, nil, badRequest("n must be 1 (this server makes one choice per request)")
	}
	if maxTokens != nil {
		if *maxTokens <= 0 {
			return s, 0, nil, badRequest("max_tokens must be at least 1, got %d", *maxTokens)
		}
		def = *maxTokens
	}
	if p.Temperature != nil {
		if *p.Temperature < 0 || *p.Temperature > 2 {
			return s, 0, nil, badRequest("temperature must be in [0,2], got %g", *p.Temperature)
		}
		s.Temperature = *p.Temperature
	}
	if p.TopP != nil {
		if *p.TopP < 0 || *p.TopP > 1 {
			return s, 0, nil, badRequest("top_p must be in [0,1], got %g", *p.TopP)
		}
		s.TopP = max(*p.TopP, 1e-9) // 0: the most likely token only
	}
	if p.TopK < 0 {
		return s, 0, nil, badRequest("top_k must not be negative")
	}
	if p.Seed != nil {
		s.Seed = uint64(*p.Seed)
	}
	var stop []string
	if len(p.Stop) > 0 && !bytes.Equal(p.Stop, []byte("null")) {
		var one string
		if err := json.Unmarshal(p.Stop, &one); err == nil {
			stop = []string{one}
		} else if err := json.Unmarshal(p.Stop, &stop); err != nil {
			return s, 0, nil, badRequest("stop must be a string or an array of strings")
		}
		if len(stop) > maxStops {
			return s, 0, nil, badRequest("at most %d stop sequences", maxStops)
		}
	}
	return s, def, stop, nil
}

func newID(prefix string) string {
	b := make([]byte, 12)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// encodePrompt tokenizes a completion's prompt, with the special tokens
// the tokenizer adds (Llama 2's <s>), unless it is too long for the model.
func encodePrompt(man *shards.Manifest, codec *text.Codec, s string) ([]int64, *httpError) {
	if herr := checkTextBytes(man, len(s)); herr != nil {
		return nil, herr
	}
	p, err := codec.Encode(s, true)
	if err != nil {
		return nil, badRequest("tokenizing the prompt: %v", err)
	}
	return p, nil
}

// completionPrompt reads the prompt of /v1/completions: a string, an
// array of one string, or an array of token IDs.
func completionPrompt(man *shards.Manifest, codec *text.Codec, raw json.RawMessage) ([]int64, *httpError) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return encodePrompt(man, codec, s)
	}
	var ss []string
	if err := json.Unmarshal(raw, &ss); err == nil {
		if len(ss) != 1 {
			return nil, badRequest("prompt: one prompt per request, got %d", len(ss))
		}
		return encodePrompt(man, codec, ss[0])
	}
	var toks []int64
	if err := json.Unmarshal(raw, &toks); err == nil {
		return toks, nil
	}
	return nil, badRequest("prompt must be a string, an array of one string or an array of token IDs")
}

// chatMessages reads a chat's messages: each content a string or text
// parts, joined.
func chatMessages(msgs []ChatMessage) ([]chat.Message, error) {
	out := make([]chat.Message, 0, len(msgs))
	for i, m := range msgs {
		if m.Role == "" {
			return nil, fmt.Errorf("messages[%d]: no role", i)
		}
		var text string
		if err := json.Unmarshal(m.Content, &text); err != nil {
			var parts []struct {
				Type string `json:"type"`
				Text string `json:"text"`
			}
			if err := json.Unmarshal(m.Content, &parts); err != nil {
				return nil, fmt.Errorf("messages[%d]: content must be a string or an array of text parts", i)
			}
			for _, p := range parts {
				if p.Type != "text" {
					return nil, fmt.Errorf("messages[%d]: content part of type %q: only text is supported", i, p.Type)
				}
				text += p.Text
			}
		}
		out = append(out, chat.Message{Role: m.Role, Content: text})
	}
	return out, nil
}

func (n *Node) handleCompletions(w http.ResponseWriter, r *http.Request) {
	var req CompletionRequest
	if !readOpenAI(w, r, &req) {
		return
	}
	if len(req.Prompt) == 0 {
		writeAPIError(w, http.StatusBadRequest, "bad_request", "prompt is required")
		return
	}
	n.openAI(w, r, &req.OpenAIParams, req.MaxTokens, func(man *shards.Manifest, c *text.Codec) ([]int64, *httpError) {
		return completionPrompt(man, c, req.Prompt)
	}, false)
}

func (n *Node) handleChat(w http.ResponseWriter, r *http.Request) {
	var req ChatRequest
	if !readOpenAI(w, r, &req) {
		return
	}
	msgs, err := chatMessages(req.Messages)
	if err != nil {
		writeAPIError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	maxTokens := req.MaxTokens
	if req.MaxCompletionTokens != nil {
		maxTokens = req.MaxCompletionTokens
	}
	n.openAI(w, r, &req.OpenAIParams, maxTokens, func(man *shards.Manifest, c *text.Codec) ([]int64, *httpError) {
		if herr := checkTextBytes(man, chatBytes(msgs)); herr != nil {
			return nil, herr
		}
		return chatPrompt(c, msgs)
	}, true)
}

// openAI runs a completion or chat completion and answers it, whole or
// streamed; promptOf makes the prompt's tokens with the model's codec,
// refusing a text too long for its manifest's context before tokenizing.
func (n *Node) openAI(w http.ResponseWriter, r *http.Request, p *OpenAIParams, maxTokens *int,
	promptOf func(*shards.Manifest, *text.Codec) ([]int64, *httpError), isChat bool) {
	def := defaultCompletionTokens
	if isChat {
		def = defaultChatTokens
	}
	sampling, limit, stop, herr := p.sampling(maxTokens, def)
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	model, man, codec, herr := n.textModelCodec(r.Context(), p.Model)
	var prompt []int64
	if herr == nil {
		prompt, herr = promptOf(man, codec)
	}
	if herr == nil {
		herr = checkPrompt(man, prompt)
	}
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	loop, herr := decodeLoop(p.DecodeLoop)
	if herr != nil {
		writeAPIError(w, herr.status, herr.code, herr.msg)
		return
	}
	tr := &textRequest{model: model, man: man, codec: codec, prompt: prompt, maxTokens: limit, sampling: sampling, stop: stop, kind: "completion",
		opts: mesh.InferOptions{RequesterLoop: loop}}
	if isChat {
		tr.kind = "chat"
	}
	c := Completion{ID: newID("cmpl-"), Object: "text_completion", Created: time.Now().Unix(), Model: p.Model}
	if isChat {
		c.ID, c.Object = newID("chatcmpl-"), "chat.completion"
	}
	usage := func(res *textResult) *Usage {
		return &Usage{PromptTokens: len(prompt), CompletionTokens: res.generated, TotalTokens: len(prompt) + res.generated}
	}
	choice := func(text *string, finish *string) Choice {
		ch := Choice{Text: text, FinishReason: finish}
		if isChat {
			ch.Text = nil
			if p.Stream {
				ch.Delta = &ChatContent{Content: text}
			} else {
				ch.Message = &ChatContent{Role: "assistant", Content: text}
			}
		}
		return ch
	}
	if !p.Stream {
		res, err := n.generateText(r.Context(), tr, nil)
		if err != nil {
			n.failText(w, r, nil, err)
			return
		}
		c.Choices, c.Usage = []Choice{choice(&res.text, &res.finish)}, usage(res)
		writeJSON(w, http.StatusOK, c)
		return
	}

	if isChat {
		c.Object = "chat.completion.chunk"
	}
	sse := &sseWriter{w: w}
	chunk := func(ch Choice) error {
		cc := c
		cc.Choices = []Choice{ch}
		return sse.event("", cc)
	}
	// The codec's stream hands out whole characters only: each piece of
	// text goes out as it comes.
	send := func(text string) error {
		if text == "" {
			return nil
		}
		if !sse.started && isChat { // the first chunk carries the role
			empty := ""
			if err := chunk(Choice{Delta: &ChatContent{Role: "assistant", Content: &empty}}); err != nil {
				return err
			}
		}
		return chunk(choice(&text, nil))
	}
	res, err := n.generateText(r.Context(), tr, func(_ int64, text string) error { return send(text) })
	if err != nil {
		n.failText(w, r, sse, err)
		return
	}
	last := choice(nil, &res.finish)
	if isChat {
		last.Delta = &ChatContent{}
		if !sse.started {
			empty := ""
			last.Delta = &ChatContent{Role: "assistant", Content: &empty}
		}
	} else {
		empty := ""
		last.Text = &empty
	}
	if chunk(last) != nil {
		return
	}
	if p.StreamOptions != nil && p.StreamOptions.IncludeUsage {
		cc := c
		cc.Choices, cc.Usage = []Choice{}, usage(res)
		if sse.event("", cc) != nil {
			return
		}
	}
	sse.done()
}

// models are the models this node knows, text models first: those it
// serves, those in its store (published or pulled) and those it has seen in
// the mesh's capacity records, each with its coverage as the view has it.
func (n *Node) models(ctx context.Context) []OpenAIModel {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	mans := map[string]*shards.Manifest{}
	for _, s := range n.servedSpans() {
		mans[s.model.ID.String()] = s.model.Manifest
	}
	if ids, err := n.store.List(); err == nil {
		for _, id := range ids {
			if id.Prefix().Codec != shards.CodecManifest || mans[id.String()] != nil {
				continue
			}
			if b, err := n.store.Get(id); err == nil {
				if man, err := shards.DecodeManifest(b); err == nil {
					mans[id.String()] = man
				}
			}
		}
	}
	ids := n.mesh.View().KnownModels()
	for id := range mans {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	out := []OpenAIModel{}
	for _, id := range ids {
		c, err := shards.ParseCID(id)
		if err != nil || c.Prefix().Codec != shards.CodecManifest {
			continue
		}
		info := &MeshModel{Uncovered: []int{}}
		man := mans[id]
		if man == nil { // seen in the mesh: its servers have the manifest (cached once fetched)
			man, _ = n.Manifest(ctx, c)
		}
		if man != nil {
			info.Name, info.Blocks, info.Text = man.Name, len(man.Blocks), isTextModel(man)
			if d := man.Decoder; d != nil {
				info.ContextLength, info.Tokenizer = d.MaxContext, d.Tokenizer
			}
			if mi := man.Info; mi != nil {
				info.Architecture, info.DType, info.Parameters = mi.Architecture, mi.DType, mi.Parameters
			}
		}
		if mv, err := n.mesh.View().Model(ctx, c); err == nil {
			info.Complete, info.Servers = mv.Complete(), len(mv.Peers)
			if mv.Blocks > 0 {
				info.Blocks = mv.Blocks
			}
			if mv.Uncovered != nil {
				info.Uncovered = mv.Uncovered
			}
		}
		out = append(out, OpenAIModel{ID: id, Object: "model", OwnedBy: "infermesh", Mesh: info})
	}
	// Text models first: an OpenAI client picking the first model gets one
	// it can talk to.
	slices.SortStableFunc(out, func(a, b OpenAIModel) int {
		switch {
		case a.Mesh.Text == b.Mesh.Text:
			return 0
		case a.Mesh.Text:
			return -1
		}
		return 1
	})
	return out
}

// handleModels is GET /v1/models in OpenAI's shape, with the mesh's
// coverage of each model in its "infermesh" field.
func (n *Node) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": n.models(r.Context())})
}

// handleModel is GET /v1/models/{model}.
func (n *Node) handleModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("model")
	for _, m := range n.models(r.Context()) {
		if m.ID == id {
			writeJSON(w, http.StatusOK, m)
			return
		}
	}
	writeAPIError(w, http.StatusNotFound, "model_not_found", fmt.Sprintf("model %q is not a model this node knows", id))
}
