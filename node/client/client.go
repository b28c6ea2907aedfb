// Package client is the Go client of an infermesh node's local API: what an
// app imports to run passes and generations through the mesh without
// speaking libp2p. It talks HTTP to the node on this machine.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"net/http"
	"strings"

	"github.com/infermesh/infermesh/node"
	"github.com/infermesh/infermesh/protocol"
)

// Client calls one node's API. Its methods are safe for concurrent use.
type Client struct {
	base string
	http *http.Client
	// Token, if set, is sent as "Authorization: Bearer Token" (a node whose
	// API listens beyond loopback requires its token).
	Token string
}

// New returns a client of the node API at addr ("127.0.0.1:8700" or a URL).
// A nil httpClient means http.DefaultClient.
func New(addr string, httpClient *http.Client) *Client {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	if httpClient == nil {
		httpClient = http.DefaultClient
	}
	return &Client{base: strings.TrimSuffix(addr, "/"), http: httpClient}
}

// Error is an error the node answered with: its HTTP status and the API's
// code and message. errors.Is matches it against the sentinels below by
// code.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("node API: %s (%s, HTTP %d)", e.Message, e.Code, e.Status)
}

// Is matches the sentinel errors by code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Status == 0 && t.Code == e.Code
}

// Sentinels for errors.Is.
var (
	ErrBusy         = &Error{Code: "busy"}            // the mesh is at capacity: retry later
	ErrNoRoute      = &Error{Code: "no_route"}        // nobody serves some blocks of the model
	ErrUnknownModel = &Error{Code: "model_not_found"} // no peer has the model
	ErrBadRequest   = &Error{Code: "bad_request"}     // the request was malformed
	ErrDeadline     = &Error{Code: "deadline"}        // the request ran out of time
)

// Status is this node: ID, addresses, what it serves, its load.
func (c *Client) Status(ctx context.Context) (*node.Status, error) {
	var st node.Status
	return &st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Coverage is who serves each block of a model, as the node sees it.
func (c *Client) Coverage(ctx context.Context, model string) (*node.Coverage, error) {
	var cov node.Coverage
	return &cov, c.do(ctx, http.MethodGet, "/v1/peers?model="+model, nil, &cov)
}

// Infer runs one pass of a model through the mesh.
func (c *Client) Infer(ctx context.Context, model string, inputs map[string]*protocol.Tensor) (*node.InferResponse, error) {
	return c.InferWith(ctx, node.InferRequest{Model: model, Inputs: inputs})
}

// InferWith is Infer with every option of the request (fp16, timeout).
func (c *Client) InferWith(ctx context.Context, req node.InferRequest) (*node.InferResponse, error) {
	var resp node.InferResponse
	return &resp, c.do(ctx, http.MethodPost, "/v1/infer", req, &resp)
}

// Generate runs a whole generation and returns it.
func (c *Client) Generate(ctx context.Context, req node.GenerateAPIRequest) (*node.GenerateResponse, error) {
	req.Stream = false
	var resp node.GenerateResponse
	return &resp, c.do(ctx, http.MethodPost, "/v1/generate", req, &resp)
}

// Token is one generated token of a streamed generation.
type Token struct {
	Token int64  `json:"token"`
	Text  string `json:"text"`
}

// GenerateStream streams a generation: it yields each token as the mesh
// produces it, then stops. The final summary (route, timings) is stored in
// *summary when the stream ends well, if summary is not nil. A failure is
// yielded as the error of the last pair.
func (c *Client) GenerateStream(ctx context.Context, req node.GenerateAPIRequest, summary *node.GenerateResponse) iter.Seq2[Token, error] {
	return func(yield func(Token, error) bool) {
		req.Stream = true
		resp, err := c.request(ctx, http.MethodPost, "/v1/generate", req)
		if err != nil {
			yield(Token{}, err)
			return
		}
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		event := ""
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event:"):
				event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
				continue
			case !strings.HasPrefix(line, "data:"):
				continue
			}
			data := strings.TrimSpace(strings.TrimPrefix(line, "data:"))
			if data == "[DONE]" {
				return
			}
			if event == "error" {
				yield(Token{}, decodeError(http.StatusOK, []byte(data)))
				return
			}
			var ev struct {
				Token *int64 `json:"token"`
				Text  string `json:"text"`
			}
			if err := json.Unmarshal([]byte(data), &ev); err != nil {
				yield(Token{}, fmt.Errorf("node API: bad event %q: %w", data, err))
				return
			}
			if ev.Token != nil {
				if !yield(Token{Token: *ev.Token, Text: ev.Text}, nil) {
					return
				}
				continue
			}
			if summary != nil {
				if err := json.Unmarshal([]byte(data), summary); err != nil {
					yield(Token{}, fmt.Errorf("node API: bad summary: %w", err))
					return
				}
			}
		}
		if err := sc.Err(); err != nil {
			yield(Token{}, err)
			return
		}
		yield(Token{}, errors.New("node API: the stream ended before [DONE]"))
	}
}

// Tokenize returns the tokens of a text (or, with req.Messages, of a chat
// rendered by the model's template), with the model's tokenizer.
func (c *Client) Tokenize(ctx context.Context, req node.TokenizeRequest) (*node.TokenizeResponse, error) {
	var out node.TokenizeResponse
	return &out, c.do(ctx, http.MethodPost, "/v1/tokenize", req, &out)
}

// Detokenize returns the text of tokens, special tokens left out.
func (c *Client) Detokenize(ctx context.Context, model string, tokens []int64) (string, error) {
	var out node.DetokenizeResponse
	err := c.do(ctx, http.MethodPost, "/v1/detokenize", node.DetokenizeRequest{Model: model, Tokens: tokens}, &out)
	return out.Content, err
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	return c.doStatus(ctx, method, path, body, out, http.StatusOK)
}

func (c *Client) doStatus(ctx context.Context, method, path string, body, out any, ok int) error {
	resp, err := c.requestStatus(ctx, method, path, body, ok)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(io.LimitReader(resp.Body, 1<<30)).Decode(out)
}

// request sends a request and returns the answer if its status is 200.
func (c *Client) request(ctx context.Context, method, path string, body any) (*http.Response, error) {
	return c.requestStatus(ctx, method, path, body, http.StatusOK)
}

// requestStatus sends a request and returns the answer if its status is ok.
func (c *Client) requestStatus(ctx context.Context, method, path string, body any, ok int) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("node API: %w", err)
	}
	if resp.StatusCode != ok {
		defer resp.Body.Close()
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return nil, decodeError(resp.StatusCode, data)
	}
	return resp, nil
}

func decodeError(status int, data []byte) error {
	var e struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if json.Unmarshal(data, &e) == nil && e.Error.Message != "" {
		return &Error{Status: status, Code: e.Error.Code, Message: e.Error.Message}
	}
	return &Error{Status: status, Code: "unknown", Message: strings.TrimSpace(string(data))}
}

// Peers is the coverage of every model the node serves, and its connected
// peers.
func (c *Client) Peers(ctx context.Context) (*node.PeersResponse, error) {
	var p node.PeersResponse
	return &p, c.do(ctx, http.MethodGet, "/v1/peers", nil, &p)
}

// Publish adds a local model folder (on the node's machine) to the node's
// store and announces it to peers.
func (c *Client) Publish(ctx context.Context, dir string) (*node.TransferResponse, error) {
	var r node.TransferResponse
	return &r, c.do(ctx, http.MethodPost, "/v1/publish", node.PublishRequest{Dir: dir}, &r)
}

// Pull has the node fetch a model's blocks from peers, calling progress
// (if not nil) as bytes arrive.
func (c *Client) Pull(ctx context.Context, req node.PullRequest, progress func(done, total int64)) (*node.TransferResponse, error) {
	resp, err := c.request(ctx, http.MethodPost, "/v1/pull", req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev node.PullEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("node API: %w", err)
		}
		if ev.Error != "" {
			return nil, &Error{Status: http.StatusOK, Code: "pull", Message: ev.Error}
		}
		if progress != nil {
			progress(ev.Done, ev.Total)
		}
		if ev.Result != nil {
			return ev.Result, nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, errors.New("node API: the answer ended early")
}

// SubmitJob starts a batch job: the inputs' rows are cut into micro-batches
// that travel the pipeline at once. Poll it with Job.
func (c *Client) SubmitJob(ctx context.Context, req node.JobRequest) (*node.Job, error) {
	var j node.Job
	return &j, c.doStatus(ctx, http.MethodPost, "/v1/jobs", req, &j, http.StatusAccepted)
}

// Job is a batch job's state, with its outputs once done.
func (c *Client) Job(ctx context.Context, id string) (*node.Job, error) {
	var j node.Job
	return &j, c.do(ctx, http.MethodGet, "/v1/jobs/"+id, nil, &j)
}

// CancelJob cancels a running job.
func (c *Client) CancelJob(ctx context.Context, id string) (*node.Job, error) {
	var j node.Job
	return &j, c.do(ctx, http.MethodDelete, "/v1/jobs/"+id, nil, &j)
}
