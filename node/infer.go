package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// maxSubSpans bounds the sub-spans of served spans kept loaded (a route may
// ask a node for part of what it serves).
const maxSubSpans = 8

type subSpanKey struct {
	model      string
	start, end int
}

type subSpans struct {
	mu    sync.Mutex
	spans map[subSpanKey]*shards.Span
	order []subSpanKey // least recently loaded first
}

// Runner implements mesh.SpanProvider: the served span itself, or a
// sub-span of it loaded on first use (its blocks were verified at start).
func (n *Node) Runner(model string, start, end int) (shards.Runner, error) {
	for _, s := range n.servedSpans() {
		if s.model.ID.String() != model || start < s.start || end > s.end || start >= end {
			continue
		}
		if start == s.start && end == s.end {
			return s.span, nil
		}
		return n.subSpan(s, start, end)
	}
	return nil, fmt.Errorf("%w: model %s blocks %d-%d", mesh.ErrNotServed, model, start, end-1)
}

// MaxContext is the context window of a model this node serves (0 when
// it has none or serves no such model): the stage server refuses steps
// covering more positions.
func (n *Node) MaxContext(model string) int {
	if d := n.Decoder(model); d != nil {
		return d.MaxContext
	}
	return 0
}

// Decoder is the decoder spec of a model this node serves (nil when it has
// none or serves no such model): the last hop of a decode ring reads the
// logits and builds the next step's inputs with it.
func (n *Node) Decoder(model string) *shards.DecoderSpec {
	for _, s := range n.servedSpans() {
		if s.model.ID.String() == model {
			return s.model.Manifest.Decoder
		}
	}
	return nil
}

func (n *Node) subSpan(s *servedSpan, start, end int) (shards.Runner, error) {
	key := subSpanKey{s.model.ID.String(), start, end}
	n.subs.mu.Lock()
	defer n.subs.mu.Unlock()
	if sp, ok := n.subs.spans[key]; ok {
		return sp, nil
	}
	sp, err := n.rt.LoadSpan(s.model, start, end)
	if errors.Is(err, shards.ErrCorrupt) {
		// A block went bad on disk since the span was verified.
		for i := start; i < end; i++ {
			if c, perr := shards.ParseCID(s.model.Manifest.Blocks[i].CID); perr == nil {
				if _, gerr := s.model.Store.Get(c); errors.Is(gerr, shards.ErrCorrupt) {
					n.blockFailed(c)
				}
			}
		}
	}
	if err != nil {
		return nil, err
	}
	if n.subs.spans == nil {
		n.subs.spans = map[subSpanKey]*shards.Span{}
	}
	if len(n.subs.order) >= maxSubSpans {
		// Evicting closes the span; sessions on it fail and fail over.
		old := n.subs.order[0]
		n.subs.order = n.subs.order[1:]
		n.subs.spans[old].Close()
		delete(n.subs.spans, old)
	}
	n.subs.spans[key] = sp
	n.subs.order = append(n.subs.order, key)
	return sp, nil
}

// Manifest returns the manifest of a model: from a served model, or fetched
// from a peer that serves it (and checked against its CID).
func (n *Node) Manifest(ctx context.Context, model cid.Cid) (man *shards.Manifest, err error) {
	defer func() { // what the model is, in the view: no peer's record can change it
		if err == nil {
			n.mesh.View().SetManifest(model, man)
		}
	}()
	for _, s := range n.servedSpans() {
		if s.model.ID.Equals(model) {
			return s.model.Manifest, nil
		}
	}
	n.manifests.Lock()
	man, ok := n.manifests.m[model.String()]
	n.manifests.Unlock()
	if ok {
		return man, nil
	}
	if b, err := n.store.Get(model); err == nil { // published or pulled here; Get verified it
		return shards.DecodeManifest(b)
	}
	man, err = n.mesh.FetchManifest(ctx, model)
	if err != nil {
		return nil, err
	}
	n.manifests.Lock()
	if n.manifests.m == nil || len(n.manifests.m) >= 256 {
		n.manifests.m = map[string]*shards.Manifest{} // a content-addressed cache: dropping it is always safe
	}
	n.manifests.m[model.String()] = man
	n.manifests.Unlock()
	return man, nil
}

// InferResult is a single pass through the mesh.
type InferResult struct {
	Outputs shards.Tensors
	Info    *mesh.StepInfo
}

// checkOutputs vets a result against the model's declared outputs: a hop
// that answers anything else is routed around.
func checkOutputs(man *shards.Manifest) func(shards.Tensors) error {
	return func(out shards.Tensors) error { return shards.CheckTensors(man.Outputs, out) }
}

// Infer runs one pass of a model through the mesh.
func (n *Node) Infer(ctx context.Context, model cid.Cid, inputs shards.Tensors, opts mesh.InferOptions) (*InferResult, error) {
	man, err := n.Manifest(ctx, model)
	if errors.Is(err, mesh.ErrUnknownModel) {
		return nil, err
	}
	if err == nil {
		// Malformed inputs are the caller's: say so now, before any hop
		// is asked (or blamed). A single pass has no past.
		if err := man.CheckStep(inputs, 0); err != nil {
			return nil, fmt.Errorf("%w: %v", protocol.ErrBadRequest, err)
		}
		if opts.Check == nil {
			opts.Check = checkOutputs(man)
		}
	}
	start := time.Now()
	out, info, err := n.mesh.Infer(ctx, model, inputs, opts)
	var steps []*mesh.StepInfo
	if info != nil {
		steps = []*mesh.StepInfo{info}
	}
	n.record(ctx, "infer", model.String(), start, steps, nil, err)
	if info != nil && n.metrics != nil {
		n.metrics.observeStep(len(info.Route), info.Failovers)
	}
	if err != nil {
		return nil, err
	}
	return &InferResult{Outputs: out, Info: info}, nil
}

// GenerateRequest asks for text from a byte-level decoder model.
type GenerateRequest struct {
	Model     cid.Cid
	Prompt    []int64
	MaxTokens int
	Sampling  shards.Sampling
	Options   mesh.InferOptions
}

// GenerateResult is a finished generation.
type GenerateResult struct {
	Tokens     []int64          // generated tokens (the prompt excluded)
	Steps      []*mesh.StepInfo // one per step
	FirstToken time.Duration    // time to the first generated token
	Total      time.Duration
}

// Generate decodes through the mesh, one session along the route, calling
// emit (if not nil) with each token as it comes. It runs the loop the API's
// generations run (generateText), without stop sequences, for any decoder
// model.
func (n *Node) Generate(ctx context.Context, req GenerateRequest, emit func(tok int64)) (*GenerateResult, error) {
	man, err := n.Manifest(ctx, req.Model)
	if err != nil {
		return nil, err
	}
	if man.Decoder == nil {
		return nil, fmt.Errorf("model %s is not a text-generation model (its manifest has no decoder)", req.Model)
	}
	if req.MaxTokens <= 0 {
		return nil, errors.New("max tokens must be positive")
	}
	var each func(int64, string) error
	if emit != nil {
		each = func(tok int64, _ string) error { emit(tok); return nil }
	}
	res, err := n.generateText(ctx, &textRequest{model: req.Model, man: man, prompt: req.Prompt, maxTokens: req.MaxTokens,
		sampling: req.Sampling, opts: req.Options, kind: "generate"}, each)
	if err != nil {
		return nil, err
	}
	return res.GenerateResult, nil
}

// meshSession adapts a mesh.Session to shards.Session, for shards.Decoder.
type meshSession struct {
	ctx     context.Context
	s       *mesh.Session
	infos   []*mesh.StepInfo
	metrics *metrics // nil: not counted
}

func (m *meshSession) Step(in shards.Tensors) (shards.Tensors, error) {
	out, info, err := m.s.Step(m.ctx, in)
	m.observe(info, err)
	return out, err
}

// observe counts a step (each decoding step yields one token).
func (m *meshSession) observe(info *mesh.StepInfo, err error) {
	if info == nil {
		return
	}
	m.infos = append(m.infos, info)
	if m.metrics != nil {
		m.metrics.observeStep(len(info.Route), info.Failovers)
		if err == nil {
			m.metrics.tokens.Inc()
		}
	}
}

func (m *meshSession) Steps() int   { return len(m.infos) }
func (m *meshSession) Close() error { return m.s.Close() }
