package cli

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

func runShard(ctx context.Context, e *env, args []string) error {
	return dispatch(ctx, e, "infermesh shard", []command{
		{"build", "generate a test model (mlp or gpt) as blocks plus full.onnx", shardBuild},
		{"split", "cut a whole ONNX model into blocks where few tensors cross", shardSplit},
		{"inspect", "print a model's blocks, CIDs, sizes, inputs and outputs", shardInspect},
		{"run", "run all blocks in sequence on an input and print the outputs", shardRun},
		{"import", "import a Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3) as blocks", shardImport},
		{"checkpoint", "write a random-weight Hugging Face checkpoint to import (tests, demos, benches)", shardCheckpoint},
		{"generate", "decode text through the blocks with the KV cache", shardGenerate},
		{"bench", "time block loads and a decode step, blocks vs full.onnx", shardBench},
		{"publish", "add a local model to the running node's store and announce it to peers", shardPublish},
		{"pull", "fetch a model's blocks from peers into the running node's store", shardPull},
	}, args)
}

// runtimeFlags are the onnxruntime settings every command that runs blocks
// takes.
type runtimeFlags struct {
	threads  int
	provider string
	noSpin   bool
}

func (r *runtimeFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&r.threads, "threads", 0, "onnxruntime intra-op threads per block (0 = one per core)")
	fs.StringVar(&r.provider, "provider", "cpu", "execution provider: cpu or cuda (falls back to cpu)")
	fs.BoolVar(&r.noSpin, "no-spin", false, "stop onnxruntime threads spinning while idle (slower alone, better beside other busy sessions)")
}

func (r *runtimeFlags) open() (*shards.Runtime, error) {
	return shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: r.threads, Provider: r.provider, NoSpin: r.noSpin})
}

// loadAll opens the runtime and loads every block of m as one span.
func (r *runtimeFlags) loadAll(m *shards.Model) (*shards.Runtime, *shards.Span, error) {
	rt, err := r.open()
	if err != nil {
		return nil, nil, err
	}
	span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	return rt, span, err
}

func shardBuild(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard build", "mlp|gpt --out DIR [flags]",
		"Writes a deterministic test model: manifest.json, blocks/ and the same model unsplit as full.onnx.")
	out := fs.String("out", "", "output model directory (required)")
	seed := fs.Int64("seed", 1, "weight seed: the same flags and seed give byte-identical blocks")
	layers := fs.Int("layers", 0, "layers (mlp: blocks; gpt: decoder blocks, plus embedding and head) (default 4)")
	dim := fs.Int("dim", 0, "width (default 256)")
	heads := fs.Int("heads", 0, "gpt: attention heads (default 4)")
	vocab := fs.Int("vocab", 0, "gpt: vocabulary, at least 256 (default 256: bytes)")
	ctxLen := fs.Int("ctx", 0, "gpt: context length (default 256)")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	if *out == "" {
		fs.Usage()
		return errUsage
	}
	start := time.Now()
	var m *shards.Model
	switch pos[0] {
	case "mlp":
		m, err = build.MLP(build.MLPConfig{Layers: *layers, Dim: *dim, Seed: *seed}, *out)
	case "gpt":
		m, err = build.GPT(build.GPTConfig{Layers: *layers, Dim: *dim, Heads: *heads, Vocab: *vocab, Context: *ctxLen, Seed: *seed}, *out)
	default:
		return fmt.Errorf("unknown model kind %q: want mlp or gpt", pos[0])
	}
	if err != nil {
		return err
	}
	e.printf("built %s model %s in %s\n  %d blocks, %s, in %s\n", pos[0], m.ID, time.Since(start).Round(time.Millisecond),
		len(m.Manifest.Blocks), humanBytes(m.Manifest.TotalSize()), m.Dir)
	return nil
}

func shardInspect(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard inspect", "DIR", "Prints a model's blocks, CIDs, sizes, inputs, outputs and the tensors crossing each cut.")
	asJSON := fs.Bool("json", false, "print the manifest as indented JSON instead")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	m, err := shards.OpenModel(pos[0])
	if err != nil {
		return err
	}
	man := m.Manifest
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(man)
	}
	e.printf("model    %s\nname     %s (%s)\nblocks   %d, %s\ninputs   %s\noutputs  %s\n", m.ID, man.Name, man.Kind,
		len(man.Blocks), humanBytes(man.TotalSize()), specList(man.Inputs), specList(man.Outputs))
	if d := man.Decoder; d != nil {
		e.printf("decoder  tokenizer %s, vocab %d, context %d", d.Tokenizer, d.Vocab, d.MaxContext)
		if len(d.EOS) > 0 {
			e.printf(", eos %v", d.EOS)
		}
		e.printf("\n")
	}
	if i := man.Info; i != nil {
		e.printf("source   %s, %s parameters, weights %s\n", i.Architecture, humanCount(i.Parameters), i.DType)
	}
	for _, f := range man.Files {
		status := "ok"
		if _, err := m.File(f.Name); err != nil {
			status = "BAD: " + err.Error()
		}
		e.printf("file     %-22s %s  %s  %s\n", f.Name, f.CID, humanBytes(f.Size), status)
	}
	e.printf("\n")
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "#\tCID\tSIZE\tSTATUS\tINPUTS\tOUTPUTS\tSTATE\n")
	for i, b := range man.Blocks {
		status := "ok"
		if _, err := m.Block(i); err != nil {
			status = "BAD: " + err.Error()
		}
		state := make([]string, len(b.State))
		for j, p := range b.State {
			state[j] = p.Input + "->" + p.Output
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", i, b.CID, humanBytes(b.Size), status,
			nameList(b.Inputs, b.State, true), nameList(b.Outputs, b.State, false), strings.Join(state, " "))
	}
	tw.Flush()
	e.printf("\ncuts (tensors one hop sends the next):\n")
	for i := 0; i+1 < len(man.Blocks); i++ {
		e.printf("  after block %d: %s\n", i, specList(man.Crossing(i)))
	}
	return nil
}

// nameList lists tensor names, leaving out state (shown in its own column).
func nameList(ts []shards.TensorSpec, state []shards.StatePair, inputs bool) string {
	skip := map[string]bool{}
	for _, p := range state {
		skip[p.Input], skip[p.Output] = inputs, !inputs
	}
	var out []string
	for _, t := range ts {
		if !skip[t.Name] {
			out = append(out, t.Name)
		}
	}
	return strings.Join(out, ",")
}

func specList(ts []shards.TensorSpec) string {
	parts := make([]string, len(ts))
	for i, t := range ts {
		dims := make([]string, len(t.Shape))
		for j, d := range t.Shape {
			dims[j] = d.String()
		}
		parts[i] = fmt.Sprintf("%s %v[%s]", t.Name, t.DType, strings.Join(dims, ","))
	}
	return strings.Join(parts, ", ")
}

func shardRun(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard run", "DIR (--input FILE | --random) [--compare full.onnx]",
		"Runs every block in sequence and prints the outputs as JSON ({name: {dtype, shape, data}}).\n"+
			"The input file has the same form. With --compare, also runs the whole model and prints the max abs difference.")
	input := fs.String("input", "", "JSON file of input tensors ({name: {dtype, shape, data}}); - for stdin")
	random := fs.Bool("random", false, "use seeded random inputs instead of --input")
	seed := fs.Uint64("seed", 1, "seed for --random")
	batch := fs.Int64("batch", 1, "with --random: size of symbolic first dimensions (batch)")
	dimSize := fs.Int64("dim-size", 32, "with --random: size of the other symbolic dimensions")
	compare := fs.String("compare", "", "an unsplit ONNX model to compare against (e.g. DIR/full.onnx)")
	quiet := fs.Bool("quiet", false, "print only shapes and the comparison, not the data")
	var rf runtimeFlags
	rf.register(fs)
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	m, err := shards.OpenModel(pos[0])
	if err != nil {
		return err
	}
	var inputs shards.Tensors
	switch {
	case *random:
		inputs = shards.RandomInputs(m.Manifest, *seed, *batch, *dimSize)
	case *input != "":
		if inputs, err = readTensors(*input); err != nil {
			return err
		}
	default:
		fs.Usage()
		return errUsage
	}
	rt, span, err := rf.loadAll(m)
	if err != nil {
		return err
	}
	defer span.Close()
	start := time.Now()
	out, err := span.Run(inputs)
	if err != nil {
		return err
	}
	took := time.Since(start)
	report := map[string]any{"model": m.ID.String(), "blocks": len(m.Manifest.Blocks), "millis": float64(took.Microseconds()) / 1000}
	if *quiet {
		shapes := map[string]string{}
		for k, v := range out {
			shapes[k] = v.String()
		}
		report["outputs"] = shapes
	} else {
		report["outputs"] = out
	}
	if *compare != "" {
		diff, err := compareWhole(rt, m, *compare, inputs, out)
		if err != nil {
			return err
		}
		report["max_abs_diff"] = diff
	}
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(report)
}

// compareWhole runs the unsplit model on the same inputs and returns the
// largest difference over the outputs the blocks produced.
func compareWhole(rt *shards.Runtime, m *shards.Model, path string, inputs, blocksOut shards.Tensors) (float64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	whole, err := rt.LoadBlocks(m.Manifest.Whole(shards.BlockCID(data), int64(len(data))), 0, 1, [][]byte{data})
	if err != nil {
		return 0, fmt.Errorf("--compare %s: %w", path, err)
	}
	defer whole.Close()
	wout, err := whole.Run(inputs)
	if err != nil {
		return 0, fmt.Errorf("--compare %s: %w", path, err)
	}
	worst := 0.0
	for name, t := range blocksOut {
		d, err := protocol.MaxAbsDiff(t, wout[name])
		if err != nil {
			return 0, fmt.Errorf("output %s: %w", name, err)
		}
		worst = max(worst, d)
	}
	return worst, nil
}

func readTensors(path string) (shards.Tensors, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = readAllStdin()
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, err
	}
	var in shards.Tensors
	if err := json.Unmarshal(data, &in); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return in, nil
}

func readAllStdin() ([]byte, error) { return io.ReadAll(os.Stdin) }

func shardGenerate(_ context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard generate", "DIR --prompt TEXT [--tokens N]",
		"Decodes token by token through the blocks, keeping each block's KV cache between steps.")
	prompt := fs.String("prompt", "", "prompt text, tokenized with the model's tokenizer (bytes for built models)")
	chatMsg := fs.Bool("chat", false, "send the prompt as a user message through the model's chat template")
	tokens := fs.Int("tokens", 32, "tokens to generate")
	temp := fs.Float64("temperature", 0, "sampling temperature (0 = greedy)")
	topK := fs.Int("top-k", 0, "sample among the k most likely tokens (0 = all)")
	seed := fs.Uint64("seed", 1, "sampling seed")
	var rf runtimeFlags
	rf.register(fs)
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	if *prompt == "" {
		fs.Usage()
		return errUsage
	}
	m, err := shards.OpenModel(pos[0])
	if err != nil {
		return err
	}
	if m.Manifest.Decoder == nil {
		return fmt.Errorf("model %s is not a text model (its manifest has no decoder)", m.ID)
	}
	codec, err := localCodec(m)
	if err != nil {
		return err
	}
	ids, err := localPrompt(codec, *prompt, *chatMsg)
	if err != nil {
		return err
	}
	_, span, err := rf.loadAll(m)
	if err != nil {
		return err
	}
	defer span.Close()
	sess := span.NewSession()
	defer sess.Close()
	dec, err := shards.NewDecoder(m.Manifest.Decoder, sess, ids, shards.Sampling{Temperature: *temp, TopK: *topK, Seed: *seed})
	if err != nil {
		return err
	}
	stream := codec.Stream()
	start := time.Now()
	var first time.Duration
	n := 0
	for ; n < *tokens; n++ {
		tok, err := dec.Next()
		if err != nil {
			return err
		}
		if n == 0 {
			first = time.Since(start)
		}
		if codec.Stop(tok) {
			n++
			break
		}
		piece, err := stream.Add(tok)
		if err != nil {
			return err
		}
		e.printf("%s", printableText(validUTF8(piece)))
	}
	e.printf("%s", printableText(validUTF8(stream.Flush())))
	total := time.Since(start)
	fmt.Fprintf(e.stderr, "\n%d tokens after a %d-token prompt through %d blocks: first after %s, then %.1f tokens/s\n", n, len(ids),
		len(m.Manifest.Blocks), first.Round(time.Microsecond), float64(n-1)/(total-first).Seconds())
	return nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
