package split

import (
	"errors"
	"fmt"
	"math"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// verifySteps is how many session steps verification runs when the model
// has state, so that state written by one step is read by the next.
const verifySteps = 3

// verify runs the whole model (dir/full.onnx) and the blocks on the sample
// inputs and compares every model output. The blocks run twice: hop by hop,
// each block its own span handing protocol.Tensors to the next as a mesh
// does, and as one span (which the runtime may fuse into one session).
func (s *splitter) verify(model *shards.Model, rep *Report) (err error) {
	man := model.Manifest
	var closers []func() error
	defer func() {
		for _, c := range closers {
			err = errors.Join(err, c())
		}
	}()
	load := func(what string, f func() (*shards.Span, error)) (shards.Session, error) {
		sp, err := f()
		if err != nil {
			return nil, fmt.Errorf("verify: loading %s: %w", what, err)
		}
		sess := sp.NewSession()
		closers = append(closers, sess.Close, sp.Close)
		return sess, nil
	}
	whole, err := load(shards.WholeFile, func() (*shards.Span, error) { return s.rt.LoadWhole(model) })
	if err != nil {
		return err
	}
	all, err := load("the blocks as one span", func() (*shards.Span, error) { return s.rt.LoadSpan(model, 0, len(man.Blocks)) })
	if err != nil {
		return err
	}
	hops := make([]shards.Session, len(man.Blocks))
	for i := range hops {
		if hops[i], err = load(fmt.Sprintf("block %d", i), func() (*shards.Span, error) { return s.rt.LoadSpan(model, i, i+1) }); err != nil {
			return err
		}
	}
	in := shards.Tensors{}
	for _, t := range man.Inputs {
		in[t.Name] = s.samples[t.Name]
	}
	steps := 1
	if len(s.state) > 0 {
		steps = verifySteps
	}
	worst := 0.0
	for step := range steps {
		want, err := whole.Step(in)
		if err != nil && step > 0 {
			// The state changed the sizes the model expects (a KV cache
			// grows): the same sample inputs no longer fit.
			s.notes = append(s.notes, fmt.Sprintf("verified %d of %d session steps: %s refused the same sample inputs at step %d: %v", step, steps, shards.WholeFile, step+1, err))
			break
		}
		if err != nil {
			return fmt.Errorf("verify: running %s (step %d): %w", shards.WholeFile, step, err)
		}
		got := in
		for i, h := range hops {
			if got, err = h.Step(got); err != nil {
				return fmt.Errorf("verify: running block %d alone (step %d): %w", i, step, err)
			}
		}
		fused, err := all.Step(in)
		if err != nil {
			return fmt.Errorf("verify: running the blocks as one span (step %d): %w", step, err)
		}
		for _, run := range []struct {
			how string
			out shards.Tensors
		}{{"block by block", got}, {"as one span", fused}} {
			for _, o := range man.Outputs {
				d, err := protocol.MaxAbsDiff(want[o.Name], run.out[o.Name])
				if err != nil {
					return fmt.Errorf("%w: output %q (%s, step %d): %v", ErrMismatch, o.Name, run.how, step, err)
				}
				worst = max(worst, d)
				tol, err := s.tolerance(want[o.Name])
				if err != nil {
					return fmt.Errorf("verify: output %q: %w", o.Name, err)
				}
				if d > tol {
					rep.Verified, rep.MaxAbsDiff = true, worst
					return fmt.Errorf("%w: output %q (%v, %s, step %d) differs by %g, over the tolerance %g", ErrMismatch, o.Name, want[o.Name].DType, run.how, step, d, tol)
				}
			}
		}
	}
	rep.Verified, rep.MaxAbsDiff = true, worst
	return nil
}

// tolerance is the largest difference accepted in an output whose value in
// the whole model is want: Options.Tolerance when set, else
// OutputTolerance of its element type at its largest finite magnitude.
func (s *splitter) tolerance(want *protocol.Tensor) (float64, error) {
	if s.opts.Tolerance > 0 {
		return s.opts.Tolerance, nil
	}
	maxAbs := 0.0
	if want.DType == protocol.Float16 || want.DType == protocol.BFloat16 {
		v, err := want.Float64s()
		if err != nil {
			return 0, err
		}
		for _, x := range v {
			if !math.IsInf(x, 0) && !math.IsNaN(x) {
				maxAbs = max(maxAbs, math.Abs(x))
			}
		}
	}
	return OutputTolerance(want.DType, maxAbs), nil
}
