package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
)

// Publish adds a local blocked model to the node's store (every block
// verified) and announces the node as its provider, so that peers can fetch
// it. The node does not start serving its blocks for inference.
func (n *Node) Publish(ctx context.Context, dir string) (cid.Cid, int64, error) {
	m, err := shards.OpenModel(dir)
	if err != nil {
		return cid.Undef, 0, err
	}
	// Every block, then every file (the tokenizer...), each read verified.
	reads := make([]func() ([]byte, error), 0, len(m.Manifest.Blocks)+len(m.Manifest.Files))
	for i := range m.Manifest.Blocks {
		reads = append(reads, func() ([]byte, error) { return m.Block(i) })
	}
	for _, f := range m.Manifest.Files {
		reads = append(reads, func() ([]byte, error) { return m.File(f.Name) })
	}
	var size int64
	var cids []cid.Cid
	for _, read := range reads {
		data, err := read()
		if err != nil {
			return cid.Undef, 0, err
		}
		c, err := n.store.Put(shards.CodecBlock, data)
		if err != nil {
			return cid.Undef, 0, err
		}
		cids = append(cids, c)
		size += int64(len(data))
	}
	enc, err := m.Manifest.Encode()
	if err != nil {
		return cid.Undef, 0, err
	}
	if _, err := n.store.Put(shards.CodecManifest, enc); err != nil {
		return cid.Undef, 0, err
	}
	if err := n.mesh.Provide(ctx, append([]cid.Cid{m.ID}, cids...)...); err != nil {
		n.log.Warn("provider records not stored yet", "err", err)
	}
	n.log.Info("published", "model", m.ID, "blocks", len(cids), "bytes", size)
	return m.ID, size, nil
}

// Pull fetches a model's manifest and blocks [start, end) (end -1: all)
// from peers into the node's store, and announces the node as a provider.
func (n *Node) Pull(ctx context.Context, model cid.Cid, start, end int, progress func(mesh.FetchProgress)) (int64, error) {
	man, err := n.Manifest(ctx, model)
	if err != nil {
		return 0, err
	}
	if end < 0 || end > len(man.Blocks) {
		end = len(man.Blocks)
	}
	if start >= end {
		return 0, fmt.Errorf("blocks %d-%d: the model has %d", start, end-1, len(man.Blocks))
	}
	enc, _ := man.Encode()
	if _, err := n.store.Put(shards.CodecManifest, enc); err != nil {
		return 0, err
	}
	cids := man.FileCIDs()
	var size int64
	for _, f := range man.Files {
		size += f.Size
	}
	for _, b := range man.Blocks[start:end] {
		c, err := shards.ParseCID(b.CID)
		if err != nil {
			return 0, err
		}
		cids = append(cids, c)
		size += b.Size
	}
	// Room under --max-disk is made (or refused) before any transfer, as
	// for a span the node is to serve.
	release, err := n.disk.reserve(ctx, man, cids, fmt.Sprintf("blocks %d-%d of model %s (pull)", start, end-1, model))
	if err != nil {
		return 0, err
	}
	defer release()
	if err := n.mesh.FetchBlocks(ctx, cids, n.own, mesh.FetchOptions{Progress: progress}); err != nil {
		return 0, err
	}
	n.mesh.Provide(ctx, model)
	return size, nil
}

// PublishRequest is POST /v1/publish.
type PublishRequest struct {
	Dir string `json:"dir"`
}

// PullRequest is POST /v1/pull.
type PullRequest struct {
	Model string `json:"model"`
	Start int    `json:"start"`
	End   int    `json:"end"` // exclusive; 0: to the last block
}

// TransferResponse answers publish and pull.
type TransferResponse struct {
	Model   string  `json:"model"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

func (n *Node) handlePublish(w http.ResponseWriter, r *http.Request) {
	var req PublishRequest
	if !readRequestUpTo(w, r, &req, maxSmallRequestBytes) {
		return
	}
	dir, ok := n.publishable(req.Dir)
	if !ok {
		// The same answer whether the path exists or not.
		writeError(w, http.StatusForbidden, "forbidden_dir", fmt.Sprintf(
			"this node publishes only from %s, the directories it serves (--serve) and those given with --publish-dir (publish_dirs); %q is none of them",
			filepath.Join(n.opts.DataDir, PublishDir), req.Dir))
		return
	}
	start := time.Now()
	id, size, err := n.Publish(r.Context(), dir)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, TransferResponse{Model: id.String(), Bytes: size, Seconds: time.Since(start).Seconds()})
}

// PublishDir is the directory of a node's data directory that POST
// /v1/publish always reads from.
const PublishDir = "models"

// publishRoots are the directories POST /v1/publish reads models from, with
// everything below them: DATA/models, the --serve models' directories and
// the configured publish_dirs, each absolute and with its links resolved.
func (n *Node) publishRoots() []string {
	dirs := append([]string{filepath.Join(n.opts.DataDir, PublishDir)}, n.cfg.PublishDirs...)
	for _, s := range n.cfg.Serve {
		if dir, _, _, err := ParseServe(s); err == nil {
			dirs = append(dirs, dir)
		}
	}
	var roots []string
	for _, d := range dirs {
		abs, err := filepath.Abs(d)
		if err != nil {
			continue
		}
		roots = append(roots, abs)
		if real, err := filepath.EvalSymlinks(abs); err == nil && real != abs {
			roots = append(roots, real)
		}
	}
	return roots
}

// publishable resolves dir (links included) and says whether it lies under
// one of publishRoots. Whether a path outside them exists is not told: one
// is refused before it is looked at.
func (n *Node) publishable(dir string) (string, bool) {
	if dir == "" {
		return "", false
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", false
	}
	roots := n.publishRoots()
	if !under(abs, roots) {
		return "", false
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return abs, true // inside an allowed directory: OpenModel says what is wrong
	}
	return real, under(real, roots) // a link may not lead out
}

// under says whether path is one of dirs or below one.
func under(path string, dirs []string) bool {
	for _, d := range dirs {
		if rel, err := filepath.Rel(d, path); err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

// PullEvent is one line of POST /v1/pull's answer, a stream of JSON lines
// (application/x-ndjson): progress while blocks arrive, then the result or
// an error.
type PullEvent struct {
	Done   int64             `json:"done"`
	Total  int64             `json:"total"`
	Result *TransferResponse `json:"result,omitempty"`
	Error  string            `json:"error,omitempty"`
}

func (n *Node) handlePull(w http.ResponseWriter, r *http.Request) {
	var req PullRequest
	if !readRequestUpTo(w, r, &req, maxSmallRequestBytes) {
		return
	}
	id, err := shards.ParseCID(req.Model)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	end := req.End
	if end == 0 {
		end = -1
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	send := func(ev PullEvent) {
		enc.Encode(ev)
		if flusher != nil {
			flusher.Flush()
		}
	}
	var mu sync.Mutex
	perBlock := map[cid.Cid]int64{}
	var total int64
	var last time.Time
	progress := func(p mesh.FetchProgress) {
		mu.Lock()
		defer mu.Unlock()
		if _, ok := perBlock[p.CID]; !ok {
			total += p.Total
		}
		perBlock[p.CID] = p.Done
		if time.Since(last) < 200*time.Millisecond && !p.Stored {
			return
		}
		last = time.Now()
		var done int64
		for _, d := range perBlock {
			done += d
		}
		send(PullEvent{Done: done, Total: total})
	}
	start := time.Now()
	size, err := n.Pull(r.Context(), id, req.Start, end, progress)
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		send(PullEvent{Error: err.Error()})
		return
	}
	send(PullEvent{Done: size, Total: size, Result: &TransferResponse{Model: id.String(), Bytes: size, Seconds: time.Since(start).Seconds()}})
}
