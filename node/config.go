package node

import (
	"encoding/json"

	"errors"
	"fmt"
	"github.com/ipfs/go-cid"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/infermesh/infermesh/mesh"
)

// Files in a node's data directory.
const (
	ConfigFile   = "config.json"  // the node's Config
	IdentityFile = "identity.key" // its libp2p Ed25519 private key
	APIFile      = "api"          // the API address of the running node, for `infermesh peers`
)

// DefaultDataDir is where a node keeps its state: ~/.infermesh.
func DefaultDataDir() string {
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".infermesh")
	}
	return ".infermesh"
}

// Config is a node's configuration, stored as DATA/config.json; every field
// is also a flag of `infermesh node`. Zero values mean the default named on
// each field.
type Config struct {
	// Listen are QUIC multiaddrs (default /ip4/0.0.0.0/udp/4001/quic-v1 and
	// the IPv6 equivalent).
	Listen []string `json:"listen"`
	// Bootstrap are peers to join through, as multiaddrs ending in /p2p/ID.
	Bootstrap []string `json:"bootstrap"`
	// MDNS finds peers on the LAN (default on; NoMDNS turns it off).
	NoMDNS bool `json:"no_mdns"`
	// NoNAT turns off port mapping, the AutoNAT service and hole punching.
	NoNAT bool `json:"no_nat"`
	// DHTMode is auto (default: server once reachable), server or client.
	DHTMode string `json:"dht_mode"`
	// API is the local HTTP API's address (default 127.0.0.1:8700).
	API string `json:"api"`
	// APIReadTimeout bounds the time a client has to send a request, headers
	// and body (default 30s): a caller trickling its body is cut off.
	// Answers, streamed ones included, are not bounded.
	APIReadTimeout Duration `json:"api_read_timeout,omitempty"`
	// APIIdleTimeout is how long a kept-alive API connection may wait for
	// its next request (default 2m).
	APIIdleTimeout Duration `json:"api_idle_timeout,omitempty"`
	// PublishDirs are the directories POST /v1/publish may read models from,
	// with everything below them, besides DATA/models and the directories of
	// Serve, which are always allowed.
	PublishDirs []string `json:"publish_dirs,omitempty"`
	// APIToken, when set, is required of every API request as
	// "Authorization: Bearer TOKEN". An API on anything but loopback must
	// have one.
	APIToken string `json:"api_token,omitempty"`
	// Serve lists local blocked models to serve, as DIR or DIR:START-END
	// (blocks START to END inclusive).
	Serve []string `json:"serve"`
	// Models lists models to serve without having them locally, as CID or
	// CID:START-END: the node fetches the manifest and blocks from peers.
	// Without a range it picks the blocks the mesh is shortest of, and
	// moves when the mesh drifts.
	Models []string `json:"models"`
	// MaxBlocks caps how many blocks of a model the node serves (0: as many
	// as MaxMemory holds).
	MaxBlocks int `json:"max_blocks"`
	// MaxMemory caps the bytes of blocks the node loads per model (0: a
	// quarter of the machine's memory).
	MaxMemory int64 `json:"max_memory"`
	// MaxDisk caps the bytes of the node's own block store (DATA/blocks:
	// fetched, pulled and published blocks; not the --serve folders), as
	// "20GB", "512MiB" or bytes (0: no cap). To fetch past it the node
	// evicts blocks it neither serves nor is loading, least recently used
	// first, and only those enough other nodes hold (see disk.go); a fetch
	// that cannot fit fails, and --model spans are chosen to fit.
	MaxDisk ByteSize `json:"max_disk,omitempty"`
	// Rebalance is how often a node that chose its own blocks checks
	// whether moving would help the mesh (default 2m, with jitter).
	Rebalance Duration `json:"rebalance"`
	// Replicas is how many nodes should hold each block of a --model whose
	// span the node chooses: it gives a copy to blocks fewer nodes hold
	// before widening well-held spans, so that one node leaving loses
	// nothing (0: 2; 1: only see that every block is served). Nodes of one
	// mesh should use the same value.
	Replicas int `json:"replicas,omitempty"`
	// HandoffWait bounds how long a node stopping gracefully waits for
	// peers to take the blocks that only it serves (0: it leaves at once,
	// logging which blocks are lost; 30s is a good value). It waits that
	// long only while peers are taking them: with no sign of that within
	// 5 s, it leaves.
	HandoffWait Duration `json:"handoff_wait,omitempty"`
	// RecordTTL is how long a capacity record is valid (default 5m).
	RecordTTL Duration `json:"record_ttl"`
	// ViewRefresh is how often the view re-reads models (default 5s).
	ViewRefresh Duration `json:"view_refresh"`
	// MaxInFlight is how many steps this node computes at once (default:
	// its CPUs, at least 2); past it, steps wait their turn, shared fairly
	// among the peers sending them, and past 4x that get busy and go
	// elsewhere.
	MaxInFlight int `json:"max_in_flight"`
	// MaxSessions bounds open generation sessions (default 256).
	MaxSessions int `json:"max_sessions"`
	// Threads is onnxruntime's intra-op threads per session (0 = per core).
	Threads int `json:"threads"`
	// Provider is the execution provider, cpu (default) or cuda.
	Provider string `json:"provider"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `json:"log_level"`
}

// DefaultAPI is the local API's default address.
const DefaultAPI = "127.0.0.1:8700"

// Defaults of the fields whose zero means a default.
const (
	// DefaultAPIReadTimeout bounds reading one API request, headers and
	// body: a 64 MiB body over loopback takes well under a second.
	DefaultAPIReadTimeout = 30 * time.Second
	// DefaultAPIIdleTimeout is how long an idle kept-alive API connection
	// is held.
	DefaultAPIIdleTimeout = 2 * time.Minute
)

// Duration is a time.Duration written in JSON as "5m", "30s".
type Duration time.Duration

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// String implements flag.Value.
func (d *Duration) String() string { return time.Duration(*d).String() }

// Set implements flag.Value.
func (d *Duration) Set(s string) error { return d.UnmarshalText([]byte(s)) }

// DefaultConfig is what `infermesh node init` writes.
func DefaultConfig() Config {
	return Config{Listen: mesh.DefaultListenAddrs, API: DefaultAPI, DHTMode: "auto", Provider: "cpu", LogLevel: "info",
		RecordTTL: Duration(mesh.DefaultRecordTTL), ViewRefresh: Duration(mesh.DefaultViewRefresh),
		Rebalance: Duration(defaultRebalance)}
}

// LoadConfig reads DATA/config.json.
func LoadConfig(dataDir string) (Config, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, ConfigFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Config{}, fmt.Errorf("no node in %s: run `infermesh node init --data %s` first", dataDir, dataDir)
	}
	if err != nil {
		return Config{}, err
	}
	cfg := DefaultConfig()
	if err := json.Unmarshal(b, &cfg); err != nil {
		return Config{}, fmt.Errorf("%s: %w", filepath.Join(dataDir, ConfigFile), err)
	}
	return cfg, cfg.Validate()
}

// Validate checks the fields that can be checked without starting.
func (c *Config) Validate() error {
	switch c.DHTMode {
	case "", "auto", "server", "client":
	default:
		return fmt.Errorf("dht mode %q: want auto, server or client", c.DHTMode)
	}
	for _, s := range c.Serve {
		if _, _, _, err := ParseServe(s); err != nil {
			return err
		}
	}
	for _, s := range c.Models {
		if _, _, _, err := ParseModel(s); err != nil {
			return err
		}
	}
	if c.API != "" {
		host, _, err := net.SplitHostPort(c.API)
		if err != nil {
			return fmt.Errorf("api address %q: %w", c.API, err)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) && c.APIToken == "" {
			// Beyond this machine, only callers holding the token.
			return fmt.Errorf("api address %q is not loopback: set an api token (--api-token) so that only your apps can use it", c.API)
		}
	}
	if c.MaxDisk < 0 {
		return fmt.Errorf("max_disk %d: must not be negative", c.MaxDisk)
	}
	if c.Replicas < 0 {
		return fmt.Errorf("replicas %d: must not be negative", c.Replicas)
	}
	if time.Duration(c.RecordTTL) < 0 || time.Duration(c.ViewRefresh) < 0 {
		return errors.New("record_ttl and view_refresh must not be negative")
	}
	if time.Duration(c.APIReadTimeout) < 0 || time.Duration(c.APIIdleTimeout) < 0 {
		return errors.New("api_read_timeout and api_idle_timeout must not be negative")
	}
	for _, d := range c.PublishDirs {
		if d == "" {
			return errors.New("publish_dirs: an empty directory")
		}
	}
	return nil
}

// Init creates a data directory: a default config (with overrides applied
// by the caller) and a new identity. It refuses to overwrite an identity.
func Init(dataDir string, cfg Config) (string, error) {
	if err := cfg.Validate(); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return "", err
	}
	id, err := createIdentity(filepath.Join(dataDir, IdentityFile))
	if err != nil {
		return id, err
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", err
	}
	return id, os.WriteFile(filepath.Join(dataDir, ConfigFile), append(b, '\n'), 0o644)
}

// ParseServe parses a --serve value: DIR, or DIR:START-END with START and
// END inclusive block indexes. end is -1 for "to the last block".
func ParseServe(s string) (dir string, start, end int, err error) {
	dir, rng, found := strings.Cut(s, ":")
	if dir == "" {
		return "", 0, 0, fmt.Errorf("--serve %q: no directory", s)
	}
	if !found {
		return dir, 0, -1, nil
	}
	a, b, ok := strings.Cut(rng, "-")
	start, err1 := strconv.Atoi(a)
	last, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || start < 0 || last < start {
		return "", 0, 0, fmt.Errorf("--serve %q: want DIR or DIR:START-END, e.g. models/gpt:0-4", s)
	}
	return dir, start, last + 1, nil
}

// ParseModel parses a --model value: CID, or CID:START-END with START and
// END inclusive block indexes. end is -1 when the node is to choose.
func ParseModel(s string) (id cid.Cid, start, end int, err error) {
	idStr, rng, found := strings.Cut(s, ":")
	id, err = cid.Decode(idStr)
	if err != nil || id.Prefix().Codec != 0x0200 {
		return cid.Undef, 0, 0, fmt.Errorf("--model %q: want a model ID (bagaai...), optionally with :START-END", s)
	}
	if !found {
		return id, 0, -1, nil
	}
	a, b, ok := strings.Cut(rng, "-")
	start, err1 := strconv.Atoi(a)
	last, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || start < 0 || last < start {
		return cid.Undef, 0, 0, fmt.Errorf("--model %q: want CID or CID:START-END, e.g. bagaai...:0-4", s)
	}
	return id, start, last + 1, nil
}
