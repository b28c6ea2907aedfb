package node

import (
	"bytes"
	"context"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Status is GET /v1/status: this node.
type Status struct {
	ID           string                 `json:"id"`
	Version      string                 `json:"version"`
	Addrs        []string               `json:"addrs"`
	Serving      []protocol.ServedSpan  `json:"serving"`
	Load         protocol.Load          `json:"load"`
	Accelerators []protocol.Accelerator `json:"accelerators"`
	Coord        protocol.Coordinate    `json:"coord"`
	Connected    int                    `json:"connected_peers"`
	// DHTMode is the mode the node's DHT is in now: server (it stores
	// records and answers lookups) or client (it only asks).
	DHTMode string `json:"dht_mode"`
	// Disk is the node's own block store: bytes used, --max-disk,
	// evictions.
	Disk DiskStatus `json:"disk"`
}

// Coverage is GET /v1/peers?model=CID: who serves each block of a model.
type Coverage struct {
	Model     string     `json:"model"`
	Blocks    int        `json:"blocks"`
	Complete  bool       `json:"complete"`
	Uncovered []int      `json:"uncovered"`
	Peers     []PeerInfo `json:"peers"`
	ByBlock   [][]int    `json:"by_block"` // for each block, indexes into peers
	Updated   time.Time  `json:"updated"`
	// Mine says which blocks of the model this node serves, and why.
	Mine []MySpan `json:"mine,omitempty"`
}

// MySpan is a span this node serves, with the reason it chose it.
type MySpan struct {
	Start  int    `json:"start"`
	End    int    `json:"end"` // exclusive
	Reason string `json:"reason"`
}

// PeerInfo is one server of a model.
type PeerInfo struct {
	ID         string        `json:"id"`
	Start      int           `json:"start"`
	End        int           `json:"end"`     // exclusive
	PassMicros float64       `json:"pass_us"` // one pass through its span, measured by the peer
	Throughput float64       `json:"passes_per_s"`
	Load       protocol.Load `json:"load"`
	RTTMillis  float64       `json:"rtt_ms"` // estimated from network coordinates; 0 for this node, -1 unknown
	Version    string        `json:"version"`
	Addrs      []string      `json:"addrs"`
}

// PeersResponse is GET /v1/peers without a model: the coverage of every
// model this node serves, and its connected peers.
type PeersResponse struct {
	Models    []Coverage `json:"models"`
	Connected []string   `json:"connected"`
}

// listenAPI binds the API's address (Config.Validate allowed loopback
// only, or a token). New does it first: a taken port fails at once.
func listenAPI(addr string) (net.Listener, error) {
	if addr == "" {
		addr = DefaultAPI
	}
	ln, err := net.Listen("tcp", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("api: %s is taken (another infermesh node?): pick another address with --api (0 for any port): %w", addr, err)
	}
	if err != nil {
		return nil, fmt.Errorf("api: listen on %s (--api): %w", addr, err)
	}
	return ln, nil
}

// startAPI serves the API on the listener New bound.
func (n *Node) startAPI() error {
	addr := n.cfg.API
	if addr == "" {
		addr = DefaultAPI
	}
	ln := n.apiLn
	mux := http.NewServeMux()
	for _, r := range n.routes() {
		mux.Handle(r.pattern, r.handler)
	}
	readTimeout, idleTimeout := time.Duration(n.cfg.APIReadTimeout), time.Duration(n.cfg.APIIdleTimeout)
	if readTimeout == 0 {
		readTimeout = DefaultAPIReadTimeout
	}
	if idleTimeout == 0 {
		idleTimeout = DefaultAPIIdleTimeout
	}
	guard := newAPIGuard(addr, ln.Addr(), n.cfg.APIToken != "")
	// No WriteTimeout: a streamed generation or pull lasts as long as it
	// lasts. Reading a request, headers and body, is bounded; once the body
	// is read (bodyRead) the server lifts the bound.
	n.api = &http.Server{Handler: n.metrics.instrument(guard.wrap(requireToken(n.cfg.APIToken, mux))),
		ReadHeaderTimeout: min(5*time.Second, readTimeout), ReadTimeout: readTimeout, IdleTimeout: idleTimeout}
	ln = limitListener(ln, maxAPIConns)
	n.wg.Go(func() {
		if err := n.api.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.log.Error("api stopped", "err", err)
		}
	})
	// Written whole or not at all: `infermesh peers` (and tests) may read it
	// the moment it appears.
	path := filepath.Join(n.opts.DataDir, APIFile)
	if err := os.WriteFile(path+".tmp", []byte(ln.Addr().String()+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return err
	}
	n.log.Info("api listening; the dashboard is at its root", "addr", "http://"+ln.Addr().String()+"/")
	return nil
}

// Status describes this node.
func (n *Node) Status() Status {
	a := n.advert()
	st := Status{ID: n.mesh.ID().String(), Version: Version, Serving: a.Models, Load: a.Load, Accelerators: a.Accelerators,
		Coord: n.mesh.Coord(), Connected: len(n.mesh.Host().Network().Peers()), DHTMode: n.mesh.DHTMode(), Disk: n.disk.status()}
	for _, addr := range n.mesh.Host().Addrs() {
		st.Addrs = append(st.Addrs, addr.String()+"/p2p/"+st.ID)
	}
	if st.Serving == nil {
		st.Serving = []protocol.ServedSpan{}
	}
	return st
}

func (n *Node) handleStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, n.Status())
}

func (n *Node) handlePeers(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	if m := r.URL.Query().Get("model"); m != "" {
		id, err := shards.ParseCID(m)
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", err.Error())
			return
		}
		cov, err := n.Coverage(ctx, id.String())
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, "unavailable", err.Error())
			return
		}
		writeJSON(w, http.StatusOK, cov)
		return
	}
	resp := PeersResponse{Models: []Coverage{}, Connected: []string{}}
	for _, id := range n.ServedModels() {
		cov, err := n.Coverage(ctx, id.String())
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, "unavailable", err.Error())
			return
		}
		resp.Models = append(resp.Models, *cov)
	}
	for _, p := range sortedPeers(n.mesh.Host().Network().Peers()) {
		resp.Connected = append(resp.Connected, p.String())
	}
	writeJSON(w, http.StatusOK, resp)
}

// Coverage is the view's coverage of a model, as the API shows it.
func (n *Node) Coverage(ctx context.Context, model string) (*Coverage, error) {
	id, err := shards.ParseCID(model)
	if err != nil {
		return nil, err
	}
	mv, err := n.mesh.View().Model(ctx, id)
	if err != nil {
		return nil, err
	}
	c := coverageOf(mv)
	for _, s := range n.servedSpans() {
		if s.model.ID.Equals(id) {
			reason := s.reason
			if reason == "" {
				reason = "given with --serve"
			}
			c.Mine = append(c.Mine, MySpan{Start: s.start, End: s.end, Reason: reason})
		}
	}
	return c, nil
}

func coverageOf(mv *mesh.ModelView) *Coverage {
	c := &Coverage{Model: mv.Model, Blocks: mv.Blocks, Complete: mv.Complete(), Uncovered: mv.Uncovered, ByBlock: mv.ByBlock,
		Updated: mv.Updated, Peers: []PeerInfo{}}
	if c.Uncovered == nil {
		c.Uncovered = []int{}
	}
	for _, p := range mv.Peers {
		pass := sum(p.Span.BlockMicros)
		pi := PeerInfo{ID: p.ID.String(), Start: p.Span.Start, End: p.Span.End, PassMicros: pass, Load: p.Record.Load,
			RTTMillis: float64(p.RTT.Microseconds()) / 1000, Version: p.Record.Version, Addrs: p.Record.Addrs}
		if p.RTT < 0 {
			pi.RTTMillis = -1
		}
		if pass > 0 {
			pi.Throughput = 1e6 / pass
		}
		c.Peers = append(c.Peers, pi)
	}
	return c
}

// writeJSON answers v as JSON: indented for people reading it with curl
// when it is small, compact when it is large (tensors), where indenting
// would put every number on a line of its own and double the bytes and the
// time.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":{"code":"internal","message":"encoding the answer failed"}}`)
	}
	if len(b) <= indentUpTo {
		var ind bytes.Buffer
		if json.Indent(&ind, b, "", "  ") == nil {
			b = ind.Bytes()
		}
	}
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// indentUpTo is the largest answer writeJSON indents.
const indentUpTo = 16 << 10

// writeError writes {"error": {"code", "message"}}.
func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]string{"code": code, "message": msg}})
}

// maxRequestBytes bounds an API request body (tensors for /v1/infer, rows
// for /v1/jobs).
const maxRequestBytes = 64 << 20

// maxSmallRequestBytes bounds the body of requests that name things
// (publish, pull).
const maxSmallRequestBytes = 64 << 10

// InferRequest is POST /v1/infer: one pass of a model through the mesh.
type InferRequest struct {
	Model     string                      `json:"model"`
	Inputs    map[string]*protocol.Tensor `json:"inputs"`
	FP16      bool                        `json:"fp16,omitempty"`
	TimeoutMS int                         `json:"timeout_ms,omitempty"`
}

// HopTiming is a hop of the route a step took, with its compute time.
type HopTiming struct {
	Peer      string `json:"peer"`
	Start     int    `json:"start"`
	End       int    `json:"end"` // exclusive
	ComputeUS int64  `json:"compute_us"`
}

// InferResponse is the answer to POST /v1/infer.
type InferResponse struct {
	Outputs   map[string]*protocol.Tensor `json:"outputs"`
	Route     []HopTiming                 `json:"route"`
	TotalMS   float64                     `json:"total_ms"`
	Failovers int                         `json:"failovers"`
}

// GenerateAPIRequest is POST /v1/generate (byte-level models).
type GenerateAPIRequest struct {
	Model       string  `json:"model"`
	Prompt      string  `json:"prompt"`
	MaxTokens   int     `json:"max_tokens"`
	Temperature float64 `json:"temperature,omitempty"`
	TopK        int     `json:"top_k,omitempty"`
	Seed        uint64  `json:"seed,omitempty"`
	FP16        bool    `json:"fp16,omitempty"`
	// Stream answers text/event-stream: an event {"token", "text"} per
	// token, then the GenerateResponse, then [DONE].
	Stream bool     `json:"stream,omitempty"`
	Stop   []string `json:"stop,omitempty"` // end at the first of these; it is left out
	TopP   float64  `json:"top_p,omitempty"`
	// DecodeLoop: "ring" (default) runs the decode loop inside the route,
	// "requester" at this node.
	DecodeLoop string `json:"decode_loop,omitempty"`
}

// GenerateResponse is the answer to POST /v1/generate.
type GenerateResponse struct {
	Text         string      `json:"text"`
	Tokens       []int64     `json:"tokens"`
	Route        []HopTiming `json:"route"` // the final route, with mean compute per step
	FirstTokenMS float64     `json:"first_token_ms"`
	TotalMS      float64     `json:"total_ms"`
	TokensPerS   float64     `json:"tokens_per_s"`
	Failovers    int         `json:"failovers"`
}

// stepsSummary is a generation's final route with each hop's mean compute
// per step, and the failovers over all steps; nil when there were no steps.
func stepsSummary(steps []*mesh.StepInfo) ([]HopTiming, int) {
	k := len(steps)
	if k == 0 {
		return nil, 0
	}
	last := steps[k-1]
	mean := make([]int64, len(last.Route))
	failovers := 0
	for _, s := range steps {
		failovers += s.Failovers
		if len(s.HopMicros) == len(mean) {
			for i, us := range s.HopMicros {
				mean[i] += us / int64(k)
			}
		}
	}
	return timings(last.Route, mean), failovers
}

func timings(route []protocol.Hop, micros []int64) []HopTiming {
	out := make([]HopTiming, len(route))
	for i, h := range route {
		out[i] = HopTiming{Peer: h.Peer, Start: h.Start, End: h.End}
		if i < len(micros) {
			out[i].ComputeUS = micros[i]
		}
	}
	return out
}

func readRequest(w http.ResponseWriter, r *http.Request, v any) bool {
	return readRequestUpTo(w, r, v, maxRequestBytes)
}

// readRequestUpTo decodes a body of at most limit bytes into v, refusing
// fields v does not have.
func readRequestUpTo(w http.ResponseWriter, r *http.Request, v any, limit int64) bool {
	body := http.MaxBytesReader(w, r.Body, limit)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		status := http.StatusBadRequest
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			status = http.StatusRequestEntityTooLarge
		}
		writeError(w, status, "bad_request", err.Error())
		return false
	}
	bodyRead(body)
	return true
}

// bodyRead reads what is left of a request's body after its JSON (bounded,
// as body is), while the server's read deadline holds: a client may not
// trickle it. At its end the server lifts the deadline and watches the
// connection, so that a long stream runs on and a client that goes away
// cancels the request's context.
func bodyRead(body io.Reader) {
	io.Copy(io.Discard, body)
}

// meshError maps a failure of a request through the mesh to an HTTP answer.
func meshError(w http.ResponseWriter, err error) {
	status, code := meshStatus(err)
	writeError(w, status, code, err.Error())
}

func (n *Node) handleInfer(w http.ResponseWriter, r *http.Request) {
	var req InferRequest
	if !readRequest(w, r, &req) {
		return
	}
	model, err := shards.ParseCID(req.Model)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	opts := mesh.InferOptions{FP16: req.FP16, StepTimeout: time.Duration(req.TimeoutMS) * time.Millisecond}
	res, err := n.Infer(r.Context(), model, req.Inputs, opts)
	if err != nil {
		meshError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, InferResponse{Outputs: res.Outputs, Route: timings(res.Info.Route, res.Info.HopMicros),
		TotalMS: float64(res.Info.Total.Microseconds()) / 1000, Failovers: res.Info.Failovers})
}

// handleGenerate is POST /v1/generate (see generateAPI in openai.go).
func (n *Node) handleGenerate(w http.ResponseWriter, r *http.Request) {
	var req GenerateAPIRequest
	body := http.MaxBytesReader(w, r.Body, maxTextRequestBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		textBodyError(w, err)
		return
	}
	bodyRead(body)
	n.generateAPI(w, r, &req)
}

// requireToken answers 401 to requests without "Authorization: Bearer
// token" when a token is set.
func requireToken(token string, next http.Handler) http.Handler {
	if token == "" {
		return next
	}
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && dashboardPath(r.URL.Path) {
			next.ServeHTTP(w, r) // static files; the page asks for the token
			return
		}
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="infermesh"`)
			writeError(w, http.StatusUnauthorized, "unauthorized", "this node's API needs its token: Authorization: Bearer TOKEN")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// maxAPIConns bounds the API's open connections; past it, new ones wait
// in the kernel's accept queue.
const maxAPIConns = 512

// limitListener accepts at most n connections at once.
func limitListener(ln net.Listener, n int) net.Listener {
	return &limitedListener{Listener: ln, slots: make(chan struct{}, n)}
}

type limitedListener struct {
	net.Listener
	slots chan struct{}
}

func (l *limitedListener) Accept() (net.Conn, error) {
	l.slots <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.slots }}, nil
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// apiGuard keeps browsers' cross-site requests off the API. A request is
// refused (403) when its Host is not one of the API's own names (a page
// whose domain an attacker re-pointed at 127.0.0.1, DNS rebinding), or
// when it carries an Origin other than the API's own (a page elsewhere
// posting to it; browsers send Origin with every POST, curl and the SDKs
// send none). A POST must be JSON (Content-Type: application/json), which
// no page can send cross-site without a preflight the API never answers.
// An API with a token answers any Host (operators may call it by a name of
// their own; a rebound page has no token), still only from its own pages.
type apiGuard struct {
	port    string          // the listener's port
	hosts   map[string]bool // lower-case names and IPs, without the port
	anyIP   bool            // the API listens on every address: any IP literal names it
	anyHost bool            // the API has a token: any Host
}

func newAPIGuard(configured string, addr net.Addr, token bool) *apiGuard {
	g := &apiGuard{hosts: map[string]bool{"localhost": true}, anyHost: token}
	if h, p, err := net.SplitHostPort(addr.String()); err == nil {
		g.port, g.hosts[strings.ToLower(h)] = p, true
	}
	if h, _, err := net.SplitHostPort(configured); err == nil {
		if ip := net.ParseIP(h); h == "" || ip != nil && ip.IsUnspecified() {
			g.anyIP = true
		} else {
			g.hosts[strings.ToLower(h)] = true
		}
	}
	return g
}

// ours says whether host (HOST or HOST:PORT) names the API. An IP literal
// cannot be rebound, so any loopback IP names it, and any IP at all when
// it listens on every address.
func (g *apiGuard) ours(hostport string) bool {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		h, p = strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), "80"
	}
	if p != g.port || h == "" {
		return false
	}
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	if g.hosts[h] {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && (ip.IsLoopback() || g.anyIP)
}

func (g *apiGuard) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !g.anyHost && !g.ours(r.Host) {
			writeError(w, http.StatusForbidden, "forbidden_host",
				fmt.Sprintf("Host %q is not this API's address: call it as 127.0.0.1:%s, localhost:%s or its configured address", r.Host, g.port, g.port))
			return
		}
		if origin := r.Header.Get("Origin"); origin != "" {
			u, err := url.Parse(origin)
			if err != nil || u.Scheme != "http" || u.Path != "" || !strings.EqualFold(u.Host, r.Host) && !g.ours(u.Host) {
				writeError(w, http.StatusForbidden, "forbidden_origin",
					fmt.Sprintf("requests from pages of %q are refused: only this API's own pages (its dashboard) and programs that send no Origin may call it", origin))
				return
			}
		}
		if r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch {
			mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
			if err != nil || mt != "application/json" && !strings.HasSuffix(mt, "+json") {
				writeError(w, http.StatusUnsupportedMediaType, "unsupported_media_type",
					"request bodies are JSON: send Content-Type: application/json (with curl: --json, or -H 'Content-Type: application/json')")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// openAPI documents the API (GET /openapi.json).
//
//go:embed openapi.json
var openAPI []byte

type route struct {
	pattern string // "METHOD /path", as ServeMux takes it
	handler http.Handler
}

// routes are every endpoint of the API; openapi.json documents each (a test
// checks).
func (n *Node) routes() []route {
	h := func(p string, f http.HandlerFunc) route { return route{p, f} }
	return []route{
		h("GET /v1/status", n.handleStatus),
		h("GET /v1/peers", n.handlePeers),
		h("POST /v1/infer", n.handleInfer),
		h("POST /v1/generate", n.handleGenerate),
		h("POST /v1/publish", n.handlePublish),
		h("POST /v1/pull", n.handlePull),
		h("POST /v1/completions", n.handleCompletions),
		h("POST /v1/chat/completions", n.handleChat),
		h("POST /v1/tokenize", n.handleTokenize),
		h("POST /v1/detokenize", n.handleDetokenize),
		h("GET /v1/models", n.handleModels),
		h("GET /v1/models/{model}", n.handleModel),
		h("POST /v1/jobs", n.handleJobCreate),
		h("GET /v1/jobs/{id}", n.handleJobGet),
		h("DELETE /v1/jobs/{id}", n.handleJobCancel),
		h("GET /v1/requests", n.handleRequests),
		{"GET /metrics", n.metrics.handler()},
		{"GET /{$}", dashboardHandler()},
		{"GET /dashboard/", dashboardHandler()},
		h("GET /openapi.json", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.Write(openAPI)
		}),
	}
}
