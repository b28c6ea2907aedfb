package node

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseServe(t *testing.T) {
	for _, c := range []struct {
		in         string
		dir        string
		start, end int
		bad        bool
	}{
		{"models/gpt", "models/gpt", 0, -1, false},
		{"models/gpt:0-4", "models/gpt", 0, 5, false},
		{"m:3-3", "m", 3, 4, false},
		{"m:4-3", "", 0, 0, true},
		{"m:-1-3", "", 0, 0, true},
		{"m:a-b", "", 0, 0, true},
		{":0-1", "", 0, 0, true},
		{"m:5", "", 0, 0, true},
	} {
		dir, s, e, err := ParseServe(c.in)
		if (err != nil) != c.bad || (!c.bad && (dir != c.dir || s != c.start || e != c.end)) {
			t.Errorf("ParseServe(%q) = %q %d %d %v", c.in, dir, s, e, err)
		}
	}
}

func TestInitAndLoadConfig(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadConfig(dir); err == nil || !strings.Contains(err.Error(), "node init") {
		t.Fatalf("LoadConfig of an empty dir: %v", err)
	}
	cfg := DefaultConfig()
	cfg.Serve = []string{"models/gpt:0-3"}
	cfg.RecordTTL = Duration(90 * time.Second)
	id, err := Init(dir, cfg)
	if err != nil || !strings.HasPrefix(id, "12D3KooW") {
		t.Fatalf("Init = %q, %v", id, err)
	}
	got, err := LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Serve[0] != "models/gpt:0-3" || time.Duration(got.RecordTTL) != 90*time.Second || got.API != DefaultAPI {
		t.Fatalf("config round trip: %+v", got)
	}
	// What `infermesh node init` writes says the defaults the README names.
	raw, _ := os.ReadFile(filepath.Join(dir, ConfigFile))
	if !strings.Contains(string(raw), `"rebalance": "2m0s"`) || time.Duration(got.Rebalance) != 2*time.Minute {
		t.Fatalf("init's config: rebalance %v, want 2m:\n%s", got.Rebalance, raw)
	}
	if info, _ := os.Stat(filepath.Join(dir, IdentityFile)); info.Mode().Perm() != 0o600 {
		t.Fatalf("identity mode %v", info.Mode())
	}
	// A second init keeps the identity.
	if id2, err := Init(dir, cfg); err == nil || id2 != id {
		t.Fatalf("second Init = %q, %v; want an error naming %s", id2, err, id)
	}
	os.WriteFile(filepath.Join(dir, ConfigFile), []byte(`{"dht_mode":"sometimes"}`), 0o644)
	if _, err := LoadConfig(dir); err == nil {
		t.Fatal("bad dht_mode accepted")
	}
}

func TestAPI(t *testing.T) {
	n := startTestNode(t, nil)
	t.Cleanup(func() { n.Close() })
	base := "http://" + n.APIAddr()
	get := func(path string, want int, v any) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET %s: %s, want %d", path, resp.Status, want)
		}
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	var st Status
	get("/v1/status", 200, &st)
	if st.ID != n.Mesh().ID().String() || len(st.Addrs) == 0 || len(st.Accelerators) == 0 || st.Accelerators[len(st.Accelerators)-1].Kind != "cpu" {
		t.Fatalf("status: %+v", st)
	}
	var e struct {
		Error struct{ Code, Message string }
	}
	get("/v1/peers?model=not-a-cid", 400, &e)
	if e.Error.Code != "bad_request" || e.Error.Message == "" {
		t.Fatalf("error body: %+v", e)
	}
	var cov Coverage
	get("/v1/peers?model="+testModelID, 200, &cov)
	if cov.Complete || cov.Blocks != 0 || len(cov.Peers) != 0 {
		t.Fatalf("coverage of a model nobody serves: %+v", cov)
	}

	cfg := DefaultConfig()
	cfg.API = "0.0.0.0:0"
	if _, err := New(context.Background(), cfg, Options{DataDir: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Fatalf("non-loopback API: %v", err)
	}
}

// testModelID is a well-formed model ID that nobody serves.
const testModelID = "bagaaierarzu5a4zqyjoxw3ya63bxa6lj2zoxwxaysqmsydcae6lkcckh32wa"

// GET /metrics: the node's own metrics and libp2p's, on one registry.
func TestMetrics(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	ctx := context.Background()
	if _, err := tm.requester.Generate(ctx, GenerateRequest{Model: tm.model.ID, Prompt: []int64{'m'}, MaxTokens: 5}, nil); err != nil {
		t.Fatal(err)
	}
	for _, url := range []string{"/v1/status", "/v1/peers?model=" + tm.model.ID.String()} {
		resp, err := http.Get("http://" + tm.requester.APIAddr() + url)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	scrape := func(n *Node) string {
		resp, err := http.Get("http://" + n.APIAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	req := scrape(tm.requester)
	for _, want := range []string{
		"infermesh_tokens_generated_total 5",
		"infermesh_mesh_steps_total 5",
		`infermesh_route_hops_bucket{le="2"} 5`,
		`infermesh_api_requests_total{route="GET /v1/status",status="200"} 1`,
		"infermesh_connected_peers",
		"libp2p_", // libp2p's own metrics share the registry
	} {
		if !strings.Contains(req, want) {
			t.Errorf("requester's /metrics lacks %q", want)
		}
	}
	if srv := scrape(tm.servers[0]); !strings.Contains(srv, "infermesh_stage_steps_total 5") || !strings.Contains(srv, "infermesh_served_blocks 5") {
		t.Errorf("server's /metrics lacks its stage steps or served blocks:\n%s", grepLines(srv, "infermesh_"))
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// With an API token, every request needs it; the Go client sends it.
func TestAPIToken(t *testing.T) {
	dir := t.TempDir()
	cfg := DefaultConfig()
	cfg.Listen, cfg.API = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, "127.0.0.1:0"
	cfg.NoMDNS, cfg.NoNAT, cfg.APIToken = true, true, "s3cret"
	if _, err := Init(dir, cfg); err != nil {
		t.Fatal(err)
	}
	n, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	// The dashboard's files are static and served to anyone; the page asks
	// for the token before it reads the API. Its data is not.
	for _, c := range []struct {
		path, auth string
		want       int
	}{{"/v1/status", "", 401}, {"/v1/status", "Bearer wrong", 401}, {"/v1/status", "s3cret", 401},
		{"/v1/status", "Bearer s3cret", 200}, {"/", "", 200}, {"/dashboard/app.js", "", 200},
		{"/dashboard/nothing.js", "", 404}, {"/v1/requests", "", 401}, {"/metrics", "", 401}} {
		req, _ := http.NewRequest(http.MethodGet, "http://"+n.APIAddr()+c.path, nil)
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("GET %s with Authorization %q: %d, want %d", c.path, c.auth, resp.StatusCode, c.want)
		}
	}
	// Beyond loopback, a token is required.
	cfg.API, cfg.APIToken = "0.0.0.0:0", ""
	if err := cfg.Validate(); err == nil {
		t.Fatal("a non-loopback API without a token was accepted")
	}
}

// GET /openapi.json documents every route the API serves.
func TestOpenAPIDocumentsEveryRoute(t *testing.T) {
	n := startTestNode(t, nil)
	t.Cleanup(func() { n.Close() })
	resp, err := http.Get("http://" + n.APIAddr() + "/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct {
		OpenAPI string                                `json:"openapi"`
		Paths   map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil || !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("openapi.json: %v %q", err, doc.OpenAPI)
	}
	for _, r := range n.routes() {
		method, path, _ := strings.Cut(r.pattern, " ")
		path = strings.TrimSuffix(path, "{$}") // "/{$}" is "/" exactly
		if path != "/" && strings.HasSuffix(path, "/") {
			path += "{file}" // a subtree of files
		}
		if _, ok := doc.Paths[path][strings.ToLower(method)]; !ok {
			t.Errorf("%s is served but not documented in openapi.json", r.pattern)
		}
	}
}
