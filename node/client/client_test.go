package client_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/infermesh/infermesh/node"
	"github.com/infermesh/infermesh/node/client"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// liveMesh starts three nodes on loopback, each serving a span of a built
// GPT, and returns the model and a client of the first node.
func liveMesh(t *testing.T) (*shards.Model, *client.Client) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "gpt")
	m, err := build.GPT(build.GPTConfig{Layers: 4, Dim: 64, Heads: 2, Context: 128, Seed: 4}, dir)
	if err != nil {
		t.Fatal(err)
	}
	var nodes []*node.Node
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, n := range nodes {
			wg.Go(func() { n.Close() })
		}
		wg.Wait()
	})
	var boot []string
	for _, span := range []string{"0-1", "2-3", "4-5"} {
		data := t.TempDir()
		cfg := node.DefaultConfig()
		cfg.Listen, cfg.API = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, "127.0.0.1:0"
		cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode, cfg.Threads = true, true, "server", 1
		cfg.Bootstrap, cfg.Serve = boot, []string{dir + ":" + span}
		cfg.ViewRefresh = node.Duration(300 * time.Millisecond)
		if _, err := node.Init(data, cfg); err != nil {
			t.Fatal(err)
		}
		n, err := node.New(context.Background(), cfg, node.Options{DataDir: data, MeasureRounds: 1, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
		if boot == nil {
			boot = []string{n.Status().Addrs[0]}
		}
	}
	c := client.New(nodes[0].APIAddr(), nil)
	deadline := time.Now().Add(10 * time.Second)
	for {
		cov, err := c.Coverage(context.Background(), m.ID.String())
		if err == nil && cov.Complete && len(cov.Peers) == 3 {
			return m, c
		}
		if time.Now().After(deadline) {
			t.Fatalf("no coverage: %+v %v", cov, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestClientAgainstALiveMesh(t *testing.T) {
	m, c := liveMesh(t)
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil || st.ID == "" || len(st.Serving) != 1 {
		t.Fatalf("status: %+v %v", st, err)
	}

	in := shards.RandomInputs(m.Manifest, 1, 1, 3)
	res, err := c.Infer(ctx, m.ID.String(), in)
	if err != nil {
		t.Fatal(err)
	}
	if l := res.Outputs["logits"]; l == nil || fmt.Sprint(l.Shape) != "[1 3 256]" || len(res.Route) != 3 {
		t.Fatalf("infer: %v over %v", l, res.Route)
	}

	req := node.GenerateAPIRequest{Model: m.ID.String(), Prompt: "Go client", MaxTokens: 12}
	whole, err := c.Generate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var streamed []int64
	var summary node.GenerateResponse
	for tok, err := range c.GenerateStream(ctx, req, &summary) {
		if err != nil {
			t.Fatal(err)
		}
		streamed = append(streamed, tok.Token)
	}
	if fmt.Sprint(streamed) != fmt.Sprint(whole.Tokens) || len(streamed) != 12 {
		t.Fatalf("streamed %v, whole %v", streamed, whole.Tokens)
	}
	if len(summary.Route) != 3 {
		t.Fatalf("stream summary: %+v", summary)
	}

	// Typed errors.
	_, err = c.Infer(ctx, "not-a-model", in)
	var apiErr *client.Error
	if !errors.As(err, &apiErr) || apiErr.Status != 400 || !errors.Is(err, client.ErrBadRequest) {
		t.Fatalf("bad model ID: %v", err)
	}
	_, err = c.Generate(ctx, node.GenerateAPIRequest{Model: "bagaaierarzu5a4zqyjoxw3ya63bxa6lj2zoxwxaysqmsydcae6lkcckh32wa", Prompt: "x", MaxTokens: 2})
	if !errors.As(err, &apiErr) || apiErr.Status != 404 || !errors.Is(err, client.ErrUnknownModel) {
		t.Fatalf("model nobody has: %v", err)
	}
}

// Batch jobs: submitted, polled to completion, equal to the local run; a
// job can be cancelled; an unknown job is a 404.
func TestClientJobs(t *testing.T) {
	m, c := liveMesh(t)
	ctx := context.Background()
	in := shards.RandomInputs(m.Manifest, 3, 10, 4) // 10 rows
	job, err := c.SubmitJob(ctx, node.JobRequest{Model: m.ID.String(), Inputs: in, MicroBatch: 3})
	if err != nil {
		t.Fatal(err)
	}
	if job.State != "running" || job.Total != 4 {
		t.Fatalf("submitted: %+v", job)
	}
	deadline := time.Now().Add(30 * time.Second)
	for job.State == "running" {
		if time.Now().After(deadline) {
			t.Fatalf("job still running: %+v", job)
		}
		time.Sleep(50 * time.Millisecond)
		if job, err = c.Job(ctx, job.ID); err != nil {
			t.Fatal(err)
		}
	}
	if job.State != "done" || job.Done != 4 || job.Outputs["logits"] == nil {
		t.Fatalf("finished: state %s, %d/%d, error %q", job.State, job.Done, job.Total, job.Error)
	}
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	local, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	want, err := local.Run(in)
	if err != nil {
		t.Fatal(err)
	}
	if d, err := protocol.MaxAbsDiff(want["logits"], job.Outputs["logits"]); err != nil || d > 1e-5 {
		t.Fatalf("job outputs differ from the local run by %v (%v)", d, err)
	}

	big := shards.RandomInputs(m.Manifest, 4, 64, 8)
	running, err := c.SubmitJob(ctx, node.JobRequest{Model: m.ID.String(), Inputs: big, MicroBatch: 1})
	if err != nil {
		t.Fatal(err)
	}
	cancelled, err := c.CancelJob(ctx, running.ID)
	if err != nil || (cancelled.State != "cancelled" && cancelled.State != "done") {
		t.Fatalf("cancel: %+v %v", cancelled, err)
	}
	if _, err := c.Job(ctx, "nope"); !errors.As(err, new(*client.Error)) {
		t.Fatalf("unknown job: %v", err)
	}
}
