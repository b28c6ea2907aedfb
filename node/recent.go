package node

// The recent requests an operator sees on the dashboard (GET
// /v1/requests): the last few passes, generations and jobs this node
// asked the mesh for, with their routes and per-hop timings. A fixed ring:
// memory does not grow with traffic.

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/infermesh/infermesh/mesh"
)

// recentMax is how many requests GET /v1/requests remembers.
const recentMax = 64

// RecentRequest is one request this node ran through the mesh.
type RecentRequest struct {
	ID      int64     `json:"id"`   // increasing
	Kind    string    `json:"kind"` // infer, generate, completion, chat, job
	Model   string    `json:"model"`
	Started time.Time `json:"started"`
	TotalMS float64   `json:"total_ms"`
	// FirstTokenMS and Tokens are for generations.
	FirstTokenMS float64 `json:"first_token_ms,omitempty"`
	Tokens       int     `json:"tokens,omitempty"`
	// Route is the (final) route with each hop's compute time (mean per
	// step for generations); empty when no step ran.
	Route     []HopTiming `json:"route"`
	Failovers int         `json:"failovers"`
	// Status is the HTTP status it was answered with (499: the client went
	// away); Error the failure, if any.
	Status int    `json:"status"`
	Error  string `json:"error,omitempty"`
}

// recentLog is a ring of the last recentMax requests.
type recentLog struct {
	mu   sync.Mutex
	next int64
	ring [recentMax]RecentRequest
}

// add records a finished request, numbering it.
func (l *recentLog) add(r RecentRequest) {
	if r.Route == nil {
		r.Route = []HopTiming{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.next++
	r.ID = l.next
	l.ring[l.next%recentMax] = r
}

// list returns the remembered requests, newest first.
func (l *recentLog) list() []RecentRequest {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]RecentRequest, 0, min(l.next, recentMax))
	for id := l.next; id > 0 && id > l.next-recentMax; id-- {
		out = append(out, l.ring[id%recentMax])
	}
	return out
}

// failure is the HTTP status a failed request is answered with, and its
// message; 200 and "" for none.
func failure(ctx context.Context, err error) (int, string) {
	if err == nil {
		return http.StatusOK, ""
	}
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return 499, "the client went away"
	}
	status, _ := meshStatus(err)
	var herr *httpError
	if errors.As(err, &herr) {
		status = herr.status
	}
	return status, err.Error()
}

// record adds a finished request to the log: its steps (one for a pass,
// one per micro-batch or token otherwise) give the route and timings.
func (n *Node) record(ctx context.Context, kind, model string, start time.Time, steps []*mesh.StepInfo, gen *GenerateResult, err error) {
	r := RecentRequest{Kind: kind, Model: model, Started: start, TotalMS: msSince(start)}
	if route, failovers := stepsSummary(steps); route != nil {
		r.Route, r.Failovers = route, failovers
	}
	if gen != nil {
		r.Tokens, r.FirstTokenMS = len(gen.Tokens), float64(gen.FirstToken.Microseconds())/1000
	}
	r.Status, r.Error = failure(ctx, err)
	n.recent.add(r)
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// handleRequests is GET /v1/requests: the recent requests, newest first.
func (n *Node) handleRequests(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"requests": n.recent.list()})
}
