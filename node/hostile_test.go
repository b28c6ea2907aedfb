package node

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// hostile serves its node's spans but misbehaves: it answers garbage
// (outputs cut short) or stalls.
type hostile struct {
	n     *Node
	stall chan struct{} // closed at the end of the test; nil: garbage
}

func (h *hostile) Runner(model string, start, end int) (shards.Runner, error) {
	r, err := h.n.Runner(model, start, end)
	if err != nil {
		return nil, err
	}
	return &hostileRunner{Runner: r, h: h}, nil
}

type hostileRunner struct {
	shards.Runner
	h *hostile
}

func (r *hostileRunner) Run(in shards.Tensors) (shards.Tensors, error) {
	out, err := r.Runner.Run(in)
	return r.h.spoil(out), err
}

func (r *hostileRunner) NewSession() shards.Session {
	return &hostileSession{Session: r.Runner.NewSession(), h: r.h}
}

type hostileSession struct {
	shards.Session
	h *hostile
}

func (s *hostileSession) Step(in shards.Tensors) (shards.Tensors, error) {
	out, err := s.Session.Step(in)
	return s.h.spoil(out), err
}

func (h *hostile) spoil(out shards.Tensors) shards.Tensors {
	if h.stall != nil {
		<-h.stall
		return out
	}
	bad := shards.Tensors{}
	for name, t := range out {
		// Same name and type, a row short: plausible-looking garbage.
		shape := slices.Clone(t.Shape)
		shape[len(shape)-1]--
		bad[name] = &protocol.Tensor{DType: t.DType, Shape: shape, Data: make([]byte, protocol.NumElements(shape)*int64(t.DType.Size()))}
	}
	return bad
}

// Acceptance 2 of issue 4 (second part): a peer that answers garbage, and
// one that stalls, are detected and routed around; generations and single
// passes still equal the local run.
func TestHostilePeersAreRoutedAround(t *testing.T) {
	for _, mode := range []string{"garbage", "stall"} {
		t.Run(mode, func(t *testing.T) {
			// The hostile node serves the whole model; the requester is
			// told to prefer it (Avoid the others), so it tries it first.
			tm := startTestMesh(t, "0-9", "0-4", "5-9")
			m := tm.model
			stall := make(chan struct{})
			defer close(stall)
			bad := tm.servers[0]
			h := &hostile{n: bad}
			if mode == "stall" {
				h.stall = stall
			}
			bad.mesh.Serve(h, mesh.StageConfig{})
			total := 0
			prompt := []int64{'h', 'o', 's', 't', 'i', 'l', 'e'}
			want := localGenerate(t, m, prompt, 12)
			opts := mesh.InferOptions{StepTimeout: time.Second, Avoid: []peer.ID{tm.servers[1].mesh.ID(), tm.servers[2].mesh.ID()}}
			for i := range 3 {
				res, err := tm.requester.Generate(context.Background(), GenerateRequest{Model: m.ID, Prompt: prompt, MaxTokens: 12, Options: opts}, nil)
				if err != nil {
					t.Fatalf("generation %d: %v", i, err)
				}
				if !slices.Equal(res.Tokens, want) {
					t.Fatalf("generation %d: %v, local %v", i, res.Tokens, want)
				}
				failovers := 0
				for _, s := range res.Steps {
					failovers += s.Failovers
				}
				t.Logf("generation %d exact, %d hops re-routed", i, failovers)
				total += failovers
			}
			if total == 0 {
				t.Fatal("the hostile node was never tried: the test proves nothing")
			}
			local := localSpan(t, m)
			in := shards.RandomInputs(m.Manifest, 4, 1, 6)
			wantOut, _ := local.Run(in)
			res, err := tm.requester.Infer(context.Background(), m.ID, in, opts)
			if err != nil {
				t.Fatal(err)
			}
			if d, err := protocol.MaxAbsDiff(wantOut["logits"], res.Outputs["logits"]); err != nil || d > 1e-5 {
				t.Fatalf("single pass differs by %v (%v)", d, err)
			}
			for _, hop := range res.Info.Route {
				if hop.Peer == bad.mesh.ID().String() {
					t.Fatalf("the route still uses the hostile peer: %v", res.Info.Route)
				}
			}
		})
	}
}

// Cancellation travels down the chain: a request cancelled while its first
// hop computes is not forwarded once that hop finishes.
func TestCancelStopsForwarding(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	first, second := tm.servers[0], tm.servers[1]
	release := make(chan struct{})
	first.mesh.Serve(&hostile{n: first, stall: release}, mesh.StageConfig{})
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	_, err := tm.requester.Infer(ctx, tm.model.ID, shards.RandomInputs(tm.model.Manifest, 1, 1, 4), mesh.InferOptions{StepTimeout: time.Minute})
	if err == nil || ctx.Err() == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("cancelled Infer returned %v after %s", err, time.Since(start))
	}
	time.Sleep(300 * time.Millisecond) // the cancel reaches the first hop
	close(release)                     // which finishes its step now
	time.Sleep(500 * time.Millisecond)
	if st := second.mesh.StageStats(); st.Steps != 0 {
		t.Fatalf("the second hop ran %d steps of a cancelled request", st.Steps)
	}
	if st := first.mesh.StageStats(); st.Steps != 1 {
		t.Fatalf("the first hop ran %d steps, want 1", st.Steps)
	}
}
