package simulations

// The package's entry points. This file is the contract between the engine
// (engine.go, events.go, network.go, scenario.go), the report writer
// (report*.go) and the CLI (cmd/infermesh/cli/sim.go). LoadScenario,
// ParseScenario, (*Scenario).Set and Scenario itself are in scenario.go.

import (
	"context"
	"fmt"
)

// RunOptions tunes a run without changing its result.
type RunOptions struct {
	// Progress, when set, is called from time to time (and once at the end)
	// with the virtual seconds simulated so far and the scenario's total.
	Progress func(done, total float64)
}

// Run simulates the scenario. Two runs of one scenario give the same
// Result. It returns early with ctx's error when ctx ends.
func Run(ctx context.Context, sc *Scenario, opts RunOptions) (*Result, error) {
	if sc == nil {
		return nil, fmt.Errorf("%w: nil scenario", ErrBadScenario)
	}
	c := sc.Clone()
	if err := c.check(); err != nil {
		return nil, err
	}
	s, err := newSim(ctx, c)
	if err != nil {
		return nil, err
	}
	if err := s.run(opts.Progress); err != nil {
		return nil, err
	}
	return s.collect(), nil
}
