package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/infermesh/infermesh/node"
	"github.com/infermesh/infermesh/node/client"
)

func runNode(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && args[0] == "init" {
		return nodeInit(e, args[1:])
	}
	return nodeRun(ctx, e, args)
}

// replaceList is a list flag whose first use replaces the configured list
// (then appends), so a flag overrides the config file rather than adding
// to it.
type replaceList struct {
	list *[]string
	set  bool
}

func (r *replaceList) String() string {
	if r.list == nil {
		return ""
	}
	return strings.Join(*r.list, ",")
}

func (r *replaceList) Set(s string) error {
	if !r.set {
		*r.list, r.set = nil, true
	}
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*r.list = append(*r.list, p)
		}
	}
	return nil
}

// configFlags binds every Config field to a flag, with the config's
// current values as defaults.
func configFlags(fs *flag.FlagSet, c *node.Config) {
	fs.Var(&replaceList{list: &c.Listen}, "listen", "QUIC listen multiaddrs (repeatable or comma list)")
	fs.Var(&replaceList{list: &c.Bootstrap}, "bootstrap", "bootstrap peers, multiaddrs ending in /p2p/ID (repeatable)")
	fs.Var(&replaceList{list: &c.Serve}, "serve", "serve a local blocked model: DIR or DIR:START-END, blocks inclusive (repeatable)")
	fs.Var(&replaceList{list: &c.Models}, "model", "serve a model by ID, fetching its blocks from peers: CID (the node picks the blocks) or CID:START-END (repeatable)")
	fs.IntVar(&c.MaxBlocks, "max-blocks", c.MaxBlocks, "serve at most this many blocks of a --model (0 = as many as --max-memory holds)")
	fs.Int64Var(&c.MaxMemory, "max-memory", c.MaxMemory, "bytes of blocks to load per --model (0 = a quarter of RAM)")
	fs.Var(&c.MaxDisk, "max-disk", "cap on the node's own block store (DATA/blocks), e.g. 20GB, 512MiB or bytes: to fetch past it the node evicts blocks it does not serve that enough other nodes hold, least recently used first (0 = no cap)")
	fs.Var(&c.Rebalance, "rebalance", "how often a node that chose its blocks checks whether moving would help the mesh")
	fs.IntVar(&c.Replicas, "replicas", c.Replicas, "nodes that should hold each block of a --model: the node gives copies to blocks fewer hold before widening others (0 = 2)")
	fs.Var(&c.HandoffWait, "handoff-wait", "on a graceful stop, wait up to this long (e.g. 30s) for peers to take the blocks only this node serves (0 = leave at once, logging which blocks are lost)")
	fs.BoolVar(&c.NoMDNS, "no-mdns", c.NoMDNS, "do not look for peers on the LAN with mDNS")
	fs.BoolVar(&c.NoNAT, "no-nat", c.NoNAT, "no port mapping, AutoNAT service or hole punching")
	fs.StringVar(&c.DHTMode, "dht-mode", c.DHTMode, "DHT mode: auto, server or client")
	fs.StringVar(&c.API, "api", c.API, "local HTTP API address (anything but loopback needs --api-token)")
	fs.StringVar(&c.APIToken, "api-token", c.APIToken, "require this bearer token of every API request")
	fs.Var(&replaceList{list: &c.PublishDirs}, "publish-dir", "a directory POST /v1/publish may read models under, besides DATA/models and the --serve ones (repeatable)")
	fs.Var(&c.APIReadTimeout, "api-read-timeout", "time an API client has to send its request, body included (0 = 30s)")
	fs.Var(&c.APIIdleTimeout, "api-idle-timeout", "how long an idle kept-alive API connection is held (0 = 2m)")
	fs.Var(&c.RecordTTL, "record-ttl", "how long a capacity record is valid")
	fs.Var(&c.ViewRefresh, "view-refresh", "how often the view re-reads models from the DHT")
	fs.IntVar(&c.MaxInFlight, "max-in-flight", c.MaxInFlight, "steps computed at once; past it steps wait, fairly among peers, and past 4x that get busy (0 = the CPUs, at least 2)")
	fs.IntVar(&c.MaxSessions, "max-sessions", c.MaxSessions, "open generation sessions (0 = 256)")
	fs.IntVar(&c.Threads, "threads", c.Threads, "onnxruntime intra-op threads per session (0 = one per core)")
	fs.StringVar(&c.Provider, "provider", c.Provider, "execution provider: cpu or cuda")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn, error")
}

// dataDirArg finds --data in args before the flags are parsed: the config
// file it names supplies the other flags' defaults.
func dataDirArg(args []string) string {
	for i, a := range args {
		a = strings.TrimLeft(a, "-")
		if v, ok := strings.CutPrefix(a, "data="); ok {
			return v
		}
		if a == "data" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return node.DefaultDataDir()
}

func nodeInit(e *env, args []string) error {
	fs := newFlags(e, "infermesh node init", "[--data DIR] [config flags]",
		"Writes a default config and a new Ed25519 identity into the data directory.")
	data := fs.String("data", node.DefaultDataDir(), "data directory")
	cfg := node.DefaultConfig()
	configFlags(fs, &cfg)
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	id, err := node.Init(*data, cfg)
	if err != nil {
		return err
	}
	e.printf("initialised node %s in %s\nrun it with: infermesh node --data %s\n", id, *data, *data)
	return nil
}

func nodeRun(ctx context.Context, e *env, args []string) error {
	dataDir := dataDirArg(args)
	cfg, err := node.LoadConfig(dataDir)
	if err != nil && !isHelp(args) {
		return err
	}
	fs := newFlags(e, "infermesh node", "[init] [--data DIR] [config flags]",
		"Runs a node: joins the mesh, serves the spans given with --serve, answers the local API.\n"+
			"Flags override the data directory's config.json. `infermesh node init` creates one.")
	fs.String("data", dataDir, "data directory")
	configFlags(fs, &cfg)
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: logLevel(cfg.LogLevel)}))

	// The first SIGINT/SIGTERM stops the node gracefully; a second exits at
	// once.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		select {
		case <-sigs:
		case <-ctx.Done():
			return
		}
		log.Info("stopping; signal again to exit at once")
		cancel()
		select {
		case <-sigs:
			log.Warn("exiting at once")
			os.Exit(130)
		case <-time.After(time.Minute):
		}
	}()

	n, err := node.New(ctx, cfg, node.Options{DataDir: dataDir, Logger: log})
	if err != nil {
		return err
	}
	<-ctx.Done()
	log.Info("leaving the mesh")
	return n.Close()
}

func isHelp(args []string) bool {
	for _, a := range args {
		if a == "-h" || a == "--help" || a == "-help" {
			return true
		}
	}
	return false
}

func logLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}

// apiBase finds a running node's API: --api if given, else the address the
// node wrote into its data directory.
func apiBase(api, dataDir string) (string, error) {
	if api == "" {
		b, err := os.ReadFile(filepath.Join(dataDir, node.APIFile))
		if err != nil {
			return "", fmt.Errorf("no running node found in %s (start one with `infermesh node`, or pass --api ADDR)", dataDir)
		}
		api = strings.TrimSpace(string(b))
	}
	if !strings.Contains(api, "://") {
		api = "http://" + api
	}
	return strings.TrimSuffix(api, "/"), nil
}

// nodeClient is a client of the local node: at --api, or at the address
// the node wrote into its data directory.
func nodeClient(api, dataDir string) (*client.Client, error) {
	base, err := apiBase(api, dataDir)
	if err != nil {
		return nil, err
	}
	// A refused connection means nobody listens there: most often a node
	// that crashed and left DATA/api behind. Say so, up front and if the
	// node goes away between requests.
	noNode := &noNodeError{addr: strings.TrimPrefix(base, "http://"), from: "--api"}
	if api == "" {
		noNode.from = "read from " + filepath.Join(dataDir, node.APIFile) + "; it may have crashed"
	}
	if u, err := url.Parse(base); err == nil && u.Host != "" {
		conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, noNode
		}
		if err == nil {
			conn.Close()
		}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dialer.DialContext(ctx, network, addr)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, noNode
		}
		return conn, err
	}
	c := client.New(base, &http.Client{Transport: tr})
	if cfg, err := node.LoadConfig(dataDir); err == nil {
		c.Token = cfg.APIToken // the node's own token, from its data directory
	}
	if t := os.Getenv("INFERMESH_API_TOKEN"); t != "" {
		c.Token = t
	}
	return c, nil
}

// noNodeError is a refused connection to the local node's API.
type noNodeError struct {
	addr string
	from string // where the address came from
}

func (e *noNodeError) Error() string {
	return fmt.Sprintf("no infermesh node is running at %s (%s): start one with `infermesh node`", e.addr, e.from)
}

func runPeers(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh peers", "[--model CID] [--data DIR | --api ADDR]",
		"Shows the coverage of a model (or of every model the local node serves): for each block, who\n"+
			"serves it, their throughput, load and estimated RTT. Blocks nobody serves are flagged.")
	model := fs.String("model", "", "model ID (default: the models the local node serves)")
	data := fs.String("data", node.DefaultDataDir(), "data directory of the local node")
	api := fs.String("api", "", "the local node's API address (default: read from the data directory)")
	asJSON := fs.Bool("json", false, "print the API's JSON")
	if _, err := parse(fs, args, 0, 0); err != nil {
		return err
	}
	c, err := nodeClient(*api, *data)
	if err != nil {
		return err
	}
	var covs []node.Coverage
	var connected []string
	if *model != "" {
		cov, err := c.Coverage(ctx, *model)
		if err != nil {
			return err
		}
		covs = []node.Coverage{*cov}
	} else {
		r, err := c.Peers(ctx)
		if err != nil {
			return err
		}
		covs, connected = r.Models, r.Connected
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(covs)
	}
	for _, c := range covs {
		printCoverage(e, c)
	}
	if *model == "" {
		if len(covs) == 0 {
			e.printf("this node serves no model; pass --model CID to see one's coverage\n")
		}
		e.printf("connected to %d peers\n", len(connected))
	}
	return nil
}

func printCoverage(e *env, c node.Coverage) {
	state := "complete"
	if !c.Complete {
		state = "INCOMPLETE"
		if c.Blocks == 0 {
			state = "nobody serves it"
		}
	}
	e.printf("model %s: %d blocks, %d peers, %s\n", c.Model, c.Blocks, len(c.Peers), state)
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  PEER\tBLOCKS\tPASS\tPASSES/S\tLOAD\tRTT\n")
	for _, p := range c.Peers {
		rtt := fmt.Sprintf("%.1f ms", p.RTTMillis)
		if p.RTTMillis < 0 {
			rtt = "?"
		}
		fmt.Fprintf(tw, "  %s\t%d-%d\t%.0f µs\t%.0f\t%d running, %d queued\t%s\n", p.ID, p.Start, p.End-1,
			p.PassMicros, p.Throughput, p.Load.InFlight, p.Load.Queued, rtt)
	}
	tw.Flush()
	e.printf("  block servers:")
	for b, who := range c.ByBlock {
		e.printf(" %d:%d", b, len(who))
	}
	e.printf("\n")
	if len(c.Uncovered) > 0 {
		e.printf("  !! blocks nobody serves: %v\n", c.Uncovered)
	}
	for _, s := range c.Mine {
		e.printf("  this node serves blocks %d-%d: %s\n", s.Start, s.End-1, s.Reason)
	}
}
