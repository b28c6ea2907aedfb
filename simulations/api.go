package simulations

// The package's entry points. This file is the contract between the engine
// (sim*.go, scenario.go), the report writer (report*.go) and the CLI
// (cmd/infermesh/cli/sim.go); the engine's author replaces the bodies.

import (
	"context"
	"errors"
)

// errUnimplemented marks a contract entry point not written yet.
var errUnimplemented = errors.New("simulations: not implemented yet")

// RunOptions tunes a run without changing its result.
type RunOptions struct {
	// Progress, when set, is called from time to time (and once at the end)
	// with the virtual seconds simulated so far and the scenario's total.
	Progress func(done, total float64)
}

// LoadScenario reads a scenario from a YAML file, fills in defaults and
// checks it.
func LoadScenario(path string) (*Scenario, error) { return nil, errUnimplemented }

// ParseScenario is LoadScenario on bytes already read; name is used when
// the YAML names none.
func ParseScenario(data []byte, name string) (*Scenario, error) { return nil, errUnimplemented }

// Set changes one parameter of a scenario by its YAML path (for example
// "workload.rate" or "churn.leave_per_hour"), the value written as YAML,
// and checks the scenario again. Sweeps use it.
func (s *Scenario) Set(path, value string) error { return errUnimplemented }

// Run simulates the scenario. Two runs of one scenario give the same
// Result. It returns early with ctx's error when ctx ends.
func Run(ctx context.Context, sc *Scenario, opts RunOptions) (*Result, error) {
	return nil, errUnimplemented
}

// Scenario is a simulation's whole input (its YAML form is documented in
// simulations/scenarios/README.md). The engine's author owns its fields.
type Scenario struct {
	Name        string `yaml:"name"`
	Description string `yaml:"description"`
	Seed        int64  `yaml:"seed"`
}
