package shards

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	ort "github.com/yalue/onnxruntime_go"
)

// DefaultLibraryPath is where the build put onnxruntime's shared library. The
// Makefile sets it with -ldflags so that a binary built by `make` finds the
// library with nothing else set; ORT_LIB overrides it.
var DefaultLibraryPath = ""

// LibraryEnv names the environment variable that points at onnxruntime's
// shared library.
const LibraryEnv = "ORT_LIB"

// libraryName is the file the Makefile fetches (from the npm package
// onnxruntime-node 1.24.x) into .cache/onnxruntime.
const libraryName = "libonnxruntime.so.1"

// ErrNoRuntime is returned, wrapped with how to fix it, when onnxruntime's
// shared library cannot be found or loaded.
var ErrNoRuntime = errors.New("onnxruntime unavailable")

// RuntimeConfig configures a Runtime. The zero value is CPU with
// onnxruntime's default thread count and the library found as LibraryPath
// says.
type RuntimeConfig struct {
	// LibraryPath is onnxruntime's shared library. Empty means: $ORT_LIB,
	// else DefaultLibraryPath, else beside the executable, else
	// .cache/onnxruntime/ in the current folder or one above it.
	LibraryPath string
	// IntraOpThreads is the threads each block's session uses; 0 lets
	// onnxruntime choose (one per core).
	IntraOpThreads int
	// Provider is the execution provider: "" or "cpu", or "cuda". When CUDA
	// cannot be loaded the runtime falls back to CPU with one warning.
	Provider string
	// SessionPerBlock runs each block of a span in its own onnxruntime
	// session. By default a span's blocks are fused into one graph and run
	// as one session (see fuse.go), which saves a Run and a thread pool per
	// block; this switch exists to measure that.
	SessionPerBlock bool
	// NoSpin stops onnxruntime's worker threads from spinning while they
	// wait for work. Spinning makes one busy session about a third faster
	// on this kind of machine (see BENCHMARKS.md), but several sessions
	// running at once in one process then starve each other's threads. The
	// runtime turns spinning off by itself for spans that run one session
	// per block; set NoSpin when one process runs several spans at once.
	NoSpin bool
	// Logger receives warnings; nil means slog.Default().
	Logger *slog.Logger
}

// Runtime loads blocks into onnxruntime sessions. It is safe for concurrent
// use. onnxruntime's environment is process-wide: the first Runtime opened
// fixes the library path for the life of the process.
type Runtime struct {
	cfg  RuntimeConfig
	log  *slog.Logger
	cuda bool // the CUDA provider was asked for and loads
}

var env struct {
	sync.Mutex
	path string
	err  error
	done bool
}

// OpenRuntime initialises onnxruntime (once per process) and returns a
// Runtime with the given settings.
func OpenRuntime(cfg RuntimeConfig) (*Runtime, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	switch strings.ToLower(cfg.Provider) {
	case "", "cpu", "cuda":
	default:
		return nil, fmt.Errorf("unknown execution provider %q (want cpu or cuda)", cfg.Provider)
	}
	if cfg.IntraOpThreads < 0 {
		return nil, fmt.Errorf("intra-op threads %d < 0", cfg.IntraOpThreads)
	}
	if err := initEnvironment(cfg.LibraryPath); err != nil {
		return nil, err
	}
	rt := &Runtime{cfg: cfg, log: log.With("subsystem", "runtime")}
	if strings.EqualFold(cfg.Provider, "cuda") {
		// Probe once: the npm build of onnxruntime knows CUDA but ships no
		// provider libraries, and then every block would fail the same way.
		probe, err := ort.NewSessionOptions()
		if err == nil {
			err = appendCUDA(probe)
			probe.Destroy()
		}
		rt.cuda = err == nil
		if err != nil {
			rt.log.Warn("CUDA execution provider unavailable; running on CPU", "err", err)
		}
	}
	return rt, nil
}

func initEnvironment(want string) error {
	env.Lock()
	defer env.Unlock()
	if env.done {
		return env.err
	}
	path, err := FindLibrary(want)
	if err == nil {
		ort.SetSharedLibraryPath(path)
		if ierr := ort.InitializeEnvironment(ort.WithLogLevelFatal()); ierr != nil {
			err = fmt.Errorf("%w: cannot load %s (infermesh needs onnxruntime 1.24.x): %v; run `make ort` or set %s to a 1.24 build of libonnxruntime.so",
				ErrNoRuntime, path, ierr, LibraryEnv)
		}
	}
	env.path, env.err, env.done = path, err, true
	return err
}

// FindLibrary returns the onnxruntime library path that OpenRuntime would
// use for the given RuntimeConfig.LibraryPath, or an error saying how to get
// one.
func FindLibrary(configured string) (string, error) {
	var candidates []string
	for _, p := range []string{configured, os.Getenv(LibraryEnv), DefaultLibraryPath} {
		if p != "" {
			// An explicit setting is used as is, so that a wrong one is
			// reported rather than silently replaced by another library.
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("%w: %s not found; run `make ort` or set %s=/path/to/libonnxruntime.so", ErrNoRuntime, p, LibraryEnv)
			}
			return p, nil
		}
	}
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), libraryName))
	}
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; dir = filepath.Dir(dir) {
			candidates = append(candidates, filepath.Join(dir, ".cache", "onnxruntime", libraryName))
			if filepath.Dir(dir) == dir {
				break
			}
		}
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
	}
	return "", fmt.Errorf("%w: %s not found; run `make ort` in the infermesh checkout or set %s=/path/to/libonnxruntime.so", ErrNoRuntime, libraryName, LibraryEnv)
}

// LibraryPath is the library the process loaded, once a Runtime is open.
func LibraryPath() string {
	env.Lock()
	defer env.Unlock()
	return env.path
}

// Version is onnxruntime's version string, once a Runtime is open.
func Version() string { return ort.GetVersion() }

// sessionOptions builds the options of a session of this runtime; spin says
// whether its threads may spin. The caller destroys them.
func (rt *Runtime) sessionOptions(spin bool) (*ort.SessionOptions, error) {
	opts, err := ort.NewSessionOptions()
	if err != nil {
		return nil, err
	}
	if rt.cfg.IntraOpThreads > 0 {
		if err := opts.SetIntraOpNumThreads(rt.cfg.IntraOpThreads); err != nil {
			opts.Destroy()
			return nil, err
		}
	}
	// Blocks run one after another in a pipeline; parallelism across
	// operators inside one block is not worth the thread hand-offs.
	if err := opts.SetInterOpNumThreads(1); err != nil {
		opts.Destroy()
		return nil, err
	}
	if !spin || rt.cfg.NoSpin {
		if err := opts.AddSessionConfigEntry("session.intra_op.allow_spinning", "0"); err != nil {
			opts.Destroy()
			return nil, err
		}
	}
	if rt.cuda {
		if err := appendCUDA(opts); err != nil {
			opts.Destroy()
			return nil, err
		}
	}
	return opts, nil
}

func appendCUDA(opts *ort.SessionOptions) error {
	cuda, err := ort.NewCUDAProviderOptions()
	if err != nil {
		return err
	}
	defer cuda.Destroy()
	return opts.AppendExecutionProviderCUDA(cuda)
}

// Provider reports the execution provider blocks run on: "cuda" or "cpu".
func (rt *Runtime) Provider() string {
	if rt.cuda {
		return "cuda"
	}
	return "cpu"
}
