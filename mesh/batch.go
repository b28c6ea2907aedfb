package mesh

import (
	"context"
	"fmt"
	"sync"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// InferBatch runs a large batch as micro-batches of at most micro rows,
// all in flight at once, so that while one hop runs micro-batch k the hop
// before it runs k+1 (pipeline parallelism). Every input must have the
// batch as its first dimension, and so must every output; the outputs are
// concatenated back in order. Each micro-batch fails over on its own.
//
// progress, if not nil, is called as micro-batches complete (done of
// total), one call at a time.
func (m *Mesh) InferBatch(ctx context.Context, model cid.Cid, inputs shards.Tensors, micro int, opts InferOptions, progress func(done, total int)) (shards.Tensors, []*StepInfo, error) {
	batch, err := BatchSize(inputs)
	if err != nil {
		return nil, nil, err
	}
	if micro <= 0 || micro >= batch {
		out, info, err := m.Infer(ctx, model, inputs, opts)
		if err == nil && progress != nil {
			progress(1, 1)
		}
		return out, []*StepInfo{info}, err
	}
	n := (batch + micro - 1) / micro
	outs := make([]shards.Tensors, n)
	infos := make([]*StepInfo, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	done := 0
	for i := range n {
		lo, hi := i*micro, min((i+1)*micro, batch)
		part := shards.Tensors{}
		for name, t := range inputs {
			part[name] = sliceRows(t, lo, hi)
		}
		wg.Go(func() {
			outs[i], infos[i], errs[i] = m.Infer(ctx, model, part, opts)
			if progress != nil && errs[i] == nil {
				mu.Lock()
				done++
				progress(done, n)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return nil, infos, fmt.Errorf("micro-batch %d: %w", i, err)
		}
	}
	out := shards.Tensors{}
	for name := range outs[0] {
		parts := make([]*protocol.Tensor, n)
		for i := range outs {
			parts[i] = outs[i][name]
		}
		t, err := concatRows(parts)
		if err != nil {
			return nil, infos, fmt.Errorf("output %q: %w", name, err)
		}
		out[name] = t
	}
	return out, infos, nil
}

// BatchSize is the common first dimension of the inputs.
func BatchSize(inputs shards.Tensors) (int, error) {
	b := -1
	for name, t := range inputs {
		if len(t.Shape) == 0 {
			return 0, fmt.Errorf("input %q is a scalar: no batch dimension", name)
		}
		if b >= 0 && int(t.Shape[0]) != b {
			return 0, fmt.Errorf("inputs disagree on the batch size (%q has %d, others %d)", name, t.Shape[0], b)
		}
		b = int(t.Shape[0])
	}
	if b < 0 {
		return 0, fmt.Errorf("no inputs")
	}
	return b, nil
}

// sliceRows returns rows [lo, hi) of the first dimension, sharing memory.
func sliceRows(t *protocol.Tensor, lo, hi int) *protocol.Tensor {
	row := len(t.Data) / int(t.Shape[0])
	shape := append([]int64{int64(hi - lo)}, t.Shape[1:]...)
	return &protocol.Tensor{DType: t.DType, Shape: shape, Data: t.Data[lo*row : hi*row]}
}

// concatRows joins tensors along the first dimension.
func concatRows(parts []*protocol.Tensor) (*protocol.Tensor, error) {
	if parts[0] == nil || len(parts[0].Shape) == 0 {
		return nil, fmt.Errorf("no batch dimension to join on")
	}
	out := &protocol.Tensor{DType: parts[0].DType, Shape: append([]int64{0}, parts[0].Shape[1:]...)}
	for _, p := range parts {
		if p == nil || p.DType != out.DType || len(p.Shape) != len(out.Shape) || fmt.Sprint(p.Shape[1:]) != fmt.Sprint(out.Shape[1:]) {
			return nil, fmt.Errorf("micro-batch outputs differ in type or shape")
		}
		out.Shape[0] += p.Shape[0]
		out.Data = append(out.Data, p.Data...)
	}
	return out, nil
}
