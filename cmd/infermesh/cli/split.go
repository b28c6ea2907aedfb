package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/split"
)

// listFlag collects a flag given several times or as a comma list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

func shardSplit(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard split", "MODEL.onnx (--blocks N | --at TENSOR,...) --out DIR [flags]",
		"Cuts a whole ONNX model into sequential blocks where few tensors cross, writes the blocked model\n"+
			"(manifest.json, blocks/, full.onnx) and checks on seeded random inputs that the blocks chained\n"+
			"equal the whole model.")
	out := fs.String("out", "", "output model directory (required)")
	blocks := fs.Int("blocks", 0, "number of blocks; cuts are chosen where few bytes cross")
	var at, state, dimSizes, dims listFlag
	fs.Var(&at, "at", "cut right after the nodes producing these tensors (comma list)")
	fs.Var(&state, "state", "per-session state pair INPUT=OUTPUT (repeatable), e.g. state=stateN")
	fs.Var(&dimSizes, "dim", "sample size of a symbolic dimension NAME=SIZE (repeatable), e.g. batch=1")
	fs.Var(&dims, "dims", "name an input's dimensions INPUT=D0:D1:... with numbers or names (repeatable), e.g. state=2:batch:128")
	inputFile := fs.String("input", "", "JSON file of sample inputs used as given ({name: {dtype, shape, data}})")
	name := fs.String("name", "", "model name in the manifest (default: the file name)")
	seed := fs.Int64("seed", 1, "seed of the random sample inputs")
	tolerance := fs.Float64("tolerance", 0, "largest abs difference accepted between blocks and whole (0: from each output's dtype, 1e-4 for float32)")
	noVerify := fs.Bool("no-verify", false, "skip the blocks-vs-whole check")
	var rf runtimeFlags
	rf.register(fs)
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	if *out == "" || (*blocks == 0) == (len(at) == 0) {
		fmt.Fprintf(e.stderr, "need --out and exactly one of --blocks and --at\n\n")
		fs.Usage()
		return errUsage
	}
	data, err := os.ReadFile(pos[0])
	if err != nil {
		return err
	}
	opts := split.Options{Blocks: *blocks, At: at, Name: *name, State: state, Seed: *seed,
		Verify: !*noVerify, Tolerance: *tolerance, DimSizes: map[string]int64{}, Dims: map[string][]shards.Dim{}}
	if opts.Name == "" {
		opts.Name = strings.TrimSuffix(filepath.Base(pos[0]), filepath.Ext(pos[0]))
	}
	for _, kv := range dimSizes {
		k, v, ok := strings.Cut(kv, "=")
		n, err := strconv.ParseInt(v, 10, 64)
		if !ok || err != nil || n < 0 {
			return fmt.Errorf("--dim %q: want NAME=SIZE", kv)
		}
		opts.DimSizes[k] = n
	}
	for _, kv := range dims {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("--dims %q: want INPUT=D0:D1 (numbers or names, colon-separated)", kv)
		}
		for _, d := range strings.Split(v, ":") {
			if n, err := strconv.ParseInt(d, 10, 64); err == nil {
				opts.Dims[k] = append(opts.Dims[k], shards.Dim{Size: n})
			} else {
				opts.Dims[k] = append(opts.Dims[k], shards.Dim{Param: d})
			}
		}
	}
	if *inputFile != "" {
		if opts.Inputs, err = readTensors(*inputFile); err != nil {
			return err
		}
	}
	if opts.Runtime, err = rf.open(); err != nil {
		return err
	}
	start := time.Now()
	m, report, err := split.Split(data, *out, opts)
	if report != nil {
		report.WriteText(e.stdout)
	}
	if err != nil {
		return err
	}
	e.printf("model %s written to %s in %s\n", m.ID, m.Dir, time.Since(start).Round(time.Millisecond))
	return nil
}
