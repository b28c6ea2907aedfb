// Package cli implements infermesh's subcommands: it turns flags into calls
// of shards, mesh, node and simulations, and prints their results. It holds
// no logic of its own beyond formatting.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/infermesh/infermesh/node"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// command is one subcommand: name, one-line summary, and its entry point.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *env, args []string) error
}

// env is what every command writes to.
type env struct {
	stdout, stderr io.Writer
}

func (e *env) printf(format string, args ...any) { fmt.Fprintf(e.stdout, format, args...) }

// errUsage means the command already printed its usage; exit 2.
var errUsage = errors.New("usage")

func topCommands() []command {
	return []command{
		{"node", "run a mesh node (`node init` creates its data directory)", runNode},
		{"peers", "show who serves each block of a model, as the local node sees it", runPeers},
		{"infer", "run one pass of a model through the mesh (via the local node)", runInfer},
		{"generate", "generate text through the mesh (via the local node)", runGenerate},
		{"shard", "build, split, inspect and run content-addressed model blocks", runShard},
		{"demo", "build a model and run pipelined generation through its blocks", runDemo},
		{"sim", "simulate the mesh at scale: run a scenario, sweep a parameter, compare variants", runSim},
		{"version", "print the version", func(_ context.Context, e *env, _ []string) error {
			e.printf("infermesh %s\n", node.Version)
			return nil
		}},
	}
}

// Run runs the command line args and returns the process exit code.
func Run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	e := &env{stdout: stdout, stderr: stderr}
	err := dispatch(ctx, e, "infermesh", topCommands(), args)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp):
		return 2
	default:
		fmt.Fprintf(stderr, "infermesh: %v\n", err)
		return 1
	}
}

func dispatch(ctx context.Context, e *env, prefix string, cmds []command, args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printCommands(e.stderr, prefix, cmds)
		return errUsage
	}
	for _, c := range cmds {
		if c.name == args[0] {
			return c.run(ctx, e, args[1:])
		}
	}
	fmt.Fprintf(e.stderr, "%s: unknown command %q\n\n", prefix, args[0])
	printCommands(e.stderr, prefix, cmds)
	return errUsage
}

func printCommands(w io.Writer, prefix string, cmds []command) {
	fmt.Fprintf(w, "Usage: %s COMMAND [flags]\n\nCommands:\n", prefix)
	sorted := append([]command(nil), cmds...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].name < sorted[j].name })
	for _, c := range sorted {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun '%s COMMAND --help' for a command's flags.\n", prefix)
}

// newFlags makes a FlagSet whose usage line shows the positional arguments.
func newFlags(e *env, name, positional, summary string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() {
		fmt.Fprintf(e.stderr, "Usage: %s %s\n\n%s\n", name, positional, summary)
		var any bool
		fs.VisitAll(func(*flag.Flag) { any = true })
		if any {
			fmt.Fprintf(e.stderr, "\nFlags:\n")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parse parses flags that may come before or after the positional
// arguments (`shard inspect DIR --json` and `shard inspect --json DIR`
// both work) and checks the positional count.
func parse(fs *flag.FlagSet, args []string, minPos, maxPos int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if len(pos) < minPos || (maxPos >= 0 && len(pos) > maxPos) {
		fs.Usage()
		return nil, errUsage
	}
	return pos, nil
}
