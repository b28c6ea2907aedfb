package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Limits of batch jobs.
const (
	maxJobs      = 256              // jobs kept at once; finished ones go first
	jobRetention = 10 * time.Minute // how long a finished job's result is kept
	defaultMicro = 8                // rows per micro-batch when the job does not say
)

// JobRequest is POST /v1/jobs: a batch pass run in the background, cut
// into micro-batches that travel the pipeline at once.
type JobRequest struct {
	Model      string                      `json:"model"`
	Inputs     map[string]*protocol.Tensor `json:"inputs"` // batch on the first dimension of every input
	MicroBatch int                         `json:"micro_batch,omitempty"`
	FP16       bool                        `json:"fp16,omitempty"`
}

// Job is a batch job's state: GET /v1/jobs/{id}.
type Job struct {
	ID       string                      `json:"id"`
	Model    string                      `json:"model"`
	State    string                      `json:"state"` // running, done, failed, cancelled
	Done     int                         `json:"done"`  // micro-batches done
	Total    int                         `json:"total"` // micro-batches in all
	Outputs  map[string]*protocol.Tensor `json:"outputs,omitempty"`
	Error    string                      `json:"error,omitempty"`
	Created  time.Time                   `json:"created"`
	Finished time.Time                   `json:"finished,omitzero"`
}

type jobEntry struct {
	job    Job
	cancel context.CancelFunc
}

type jobs struct {
	mu sync.Mutex
	m  map[string]*jobEntry
}

func (n *Node) handleJobCreate(w http.ResponseWriter, r *http.Request) {
	var req JobRequest
	if !readRequest(w, r, &req) {
		return
	}
	model, err := shards.ParseCID(req.Model)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	batch, err := mesh.BatchSize(req.Inputs)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	// Malformed inputs are the caller's: a 400 now, before any hop is
	// asked (or blamed). A manifest that cannot be had yet is the mesh's
	// to report, as for a single pass.
	man, err := n.Manifest(r.Context(), model)
	if errors.Is(err, mesh.ErrUnknownModel) {
		meshError(w, err)
		return
	}
	if err == nil {
		if err := man.CheckStep(req.Inputs, 0); err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", err.Error())
			return
		}
	}
	micro := req.MicroBatch
	if micro <= 0 {
		micro = defaultMicro
	}
	var b [8]byte
	rand.Read(b[:])
	ctx, cancel := context.WithCancel(n.ctx)
	e := &jobEntry{job: Job{ID: hex.EncodeToString(b[:]), Model: model.String(), State: "running",
		Total: (batch + micro - 1) / micro, Created: time.Now()}, cancel: cancel}
	n.jobs.mu.Lock()
	if n.jobs.m == nil {
		n.jobs.m = map[string]*jobEntry{}
	}
	n.pruneJobsLocked()
	if len(n.jobs.m) >= maxJobs {
		n.jobs.mu.Unlock()
		cancel()
		writeError(w, http.StatusTooManyRequests, "busy", "too many jobs; wait for some to finish")
		return
	}
	n.jobs.m[e.job.ID] = e
	job := e.job
	n.jobs.mu.Unlock()

	n.wg.Go(func() {
		defer cancel()
		out, info, err := n.mesh.InferBatch(ctx, model, req.Inputs, micro, mesh.InferOptions{FP16: req.FP16}, func(done, total int) {
			n.jobs.mu.Lock()
			e.job.Done = done
			n.jobs.mu.Unlock()
		})
		n.record(ctx, "job", model.String(), job.Created, info, nil, err)
		n.jobs.mu.Lock()
		defer n.jobs.mu.Unlock()
		e.job.Finished = time.Now()
		switch {
		case e.job.State == "cancelled":
		case err != nil:
			e.job.State, e.job.Error = "failed", err.Error()
		default:
			e.job.State, e.job.Outputs, e.job.Done = "done", out, e.job.Total
		}
	})
	writeJSON(w, http.StatusAccepted, job)
}

// pruneJobsLocked forgets finished jobs past their retention, then the
// oldest finished ones while over the limit.
func (n *Node) pruneJobsLocked() {
	now := time.Now()
	for id, e := range n.jobs.m {
		if !e.job.Finished.IsZero() && now.Sub(e.job.Finished) > jobRetention {
			delete(n.jobs.m, id)
		}
	}
	for len(n.jobs.m) >= maxJobs {
		var oldest *jobEntry
		for _, e := range n.jobs.m {
			if !e.job.Finished.IsZero() && (oldest == nil || e.job.Finished.Before(oldest.job.Finished)) {
				oldest = e
			}
		}
		if oldest == nil {
			return
		}
		delete(n.jobs.m, oldest.job.ID)
	}
}

func (n *Node) handleJobGet(w http.ResponseWriter, r *http.Request)    { n.answerJob(w, r, false) }
func (n *Node) handleJobCancel(w http.ResponseWriter, r *http.Request) { n.answerJob(w, r, true) }

// answerJob answers GET and DELETE /v1/jobs/{id}: the job as it is, after
// cancelling it first when cancel is set and it still runs.
func (n *Node) answerJob(w http.ResponseWriter, r *http.Request, cancel bool) {
	n.jobs.mu.Lock()
	e, ok := n.jobs.m[r.PathValue("id")]
	var job Job
	if ok {
		if cancel && e.job.State == "running" {
			e.job.State = "cancelled"
			e.cancel()
		}
		job = e.job
	}
	n.jobs.mu.Unlock()
	if !ok {
		writeError(w, http.StatusNotFound, "unknown_job", "no such job (finished jobs are kept for 10 minutes)")
		return
	}
	writeJSON(w, http.StatusOK, job)
}
