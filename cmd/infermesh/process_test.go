package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"

	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildBinary compiles infermesh into a temporary folder: the process tests
// run the binary a user runs.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "infermesh")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func runBin(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("infermesh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

type nodeProc struct {
	cmd  *exec.Cmd
	data string
	log  string
	done chan error
}

// startNodeProc initialises a data dir and starts `infermesh node` on
// loopback (QUIC and API on port 0, no mDNS or NAT traversal).
func startNodeProc(t *testing.T, bin string, extra ...string) *nodeProc {
	t.Helper()
	data := t.TempDir()
	runBin(t, bin, "node", "init", "--data", data, "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0",
		"--no-mdns", "--no-nat", "--dht-mode", "server", "--view-refresh", "500ms", "--threads", "1")
	return runNodeProc(t, bin, data, extra...)
}

// runNodeProc starts `infermesh node` on an initialised data dir (again,
// after a stop: each run logs to a file of its own, DATA/node.log, then
// DATA/node.2.log...) and waits for its API.
func runNodeProc(t *testing.T, bin, data string, extra ...string) *nodeProc {
	t.Helper()
	p := &nodeProc{data: data, log: filepath.Join(data, "node.log"), done: make(chan error, 1)}
	for run := 2; run < 100; run++ {
		if _, err := os.Stat(p.log); os.IsNotExist(err) {
			break
		}
		p.log = filepath.Join(data, fmt.Sprintf("node.%d.log", run))
	}
	logf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(bin, append([]string{"node", "--data", data}, extra...)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("log of node in %s (%s):\n%s", data, filepath.Base(p.log), b)
		}
	})
	// The node writes its API address once it is up.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(data, "api")); err == nil {
			return p
		}
		select {
		case err := <-p.done:
			b, _ := os.ReadFile(p.log)
			t.Fatalf("node exited early: %v\n%s", err, b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("node did not start within 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *nodeProc) addr(t *testing.T) string {
	t.Helper()
	api, err := os.ReadFile(filepath.Join(p.data, "api"))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + strings.TrimSpace(string(api)) + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct{ Addrs []string }
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || len(st.Addrs) == 0 {
		t.Fatalf("status: %v %v", st, err)
	}
	return st.Addrs[0]
}

// stop sends SIGTERM and waits for a clean exit.
func (p *nodeProc) stop(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		if err != nil {
			t.Errorf("node in %s exited with %v after SIGTERM", p.data, err)
		}
		p.done <- err // for the cleanup
	case <-time.After(15 * time.Second):
		t.Errorf("node in %s still running 15 s after SIGTERM", p.data)
	}
}

// Acceptance 2 of issue 3: three `infermesh node` processes on loopback,
// one as bootstrap; `infermesh peers --model CID` from each shows every
// span.
func TestNodeProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildBinary(t)
	model, id := buildGPT(t, bin, 4)

	boot := startNodeProc(t, bin, "--serve", model+":0-1")
	b := boot.addr(t)
	nodes := []*nodeProc{boot,
		startNodeProc(t, bin, "--serve", model+":2-3", "--bootstrap", b),
		startNodeProc(t, bin, "--serve", model+":4-5", "--bootstrap", b)}
	want := map[[2]int]bool{{0, 2}: true, {2, 4}: true, {4, 6}: true}

	ctx := context.Background()
	for i, n := range nodes {
		var last string
		deadline := time.Now().Add(20 * time.Second)
		for {
			out, err := exec.CommandContext(ctx, bin, "peers", "--data", n.data, "--model", id, "--json").CombinedOutput()
			last = string(out)
			if err == nil && showsSpans(out, want) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d: peers never showed all spans; last output:\n%s", i, last)
			}
			time.Sleep(200 * time.Millisecond)
		}
		table := runBin(t, bin, "peers", "--data", n.data, "--model", id)
		if !strings.Contains(table, "6 blocks, 3 peers, complete") {
			t.Fatalf("node %d: peers table:\n%s", i, table)
		}
		t.Logf("node %d:\n%s", i, table)
	}

	// Requests through the mesh from the CLI, via the bootstrap node (which
	// serves blocks 0-1 itself): generation equals the local run.
	gen := runBin(t, bin, "generate", "--data", boot.data, "--model", id, "--prompt", "Hi mesh", "--tokens", "12")
	local := runBin(t, bin, "shard", "generate", model, "--prompt", "Hi mesh", "--tokens", "12")
	if first, want := strings.SplitN(gen, "\n", 2)[0], "Hi mesh"+strings.SplitN(local, "\n", 2)[0]; first != want {
		t.Fatalf("mesh generated %q, local run %q", first, local)
	}
	if !strings.Contains(gen, "hop 2") || !strings.Contains(gen, "tokens/s") {
		t.Fatalf("generate printed no route or timings:\n%s", gen)
	}
	in := filepath.Join(t.TempDir(), "in.json")
	os.WriteFile(in, []byte(`{"input_ids":{"dtype":"int64","shape":[1,2],"data":[72,105]},
		"position_ids":{"dtype":"int64","shape":[1,2],"data":[0,1]},
		"attention_mask":{"dtype":"int64","shape":[1,2],"data":[1,1]}}`), 0o644)
	if out := runBin(t, bin, "infer", "--data", nodes[1].data, "--model", id, "--input", in, "--quiet"); !strings.Contains(out, "logits: float32[1 2 256]") ||
		!strings.Contains(out, "route (3 hops") {
		t.Fatalf("infer:\n%s", out)
	}

	// Acceptance 4: a SIGKILLed node (record TTL 6 s) disappears from every
	// view within its record's expiry plus a refresh.
	const ttl = 6 * time.Second
	doomed := startNodeProc(t, bin, "--serve", model, "--bootstrap", b, "--record-ttl", ttl.String())
	withDoomed := map[[2]int]bool{{0, 2}: true, {2, 4}: true, {4, 6}: true, {0, 6}: true}
	for i, n := range nodes {
		waitPeers(t, bin, n, id, withDoomed, 20*time.Second, fmt.Sprintf("node %d sees the fourth node", i))
	}
	killed := time.Now()
	doomed.cmd.Process.Signal(syscall.SIGKILL)
	for i, n := range nodes {
		waitPeers(t, bin, n, id, want, ttl+500*time.Millisecond+6*time.Second, fmt.Sprintf("node %d drops the killed node", i))
		t.Logf("node %d dropped the SIGKILLed node %s after the kill", i, time.Since(killed).Round(100*time.Millisecond))
	}

	for _, n := range nodes {
		n.stop(t)
	}
}

// waitPeers polls `infermesh peers --json` until it shows exactly the
// spans in want.
func waitPeers(t *testing.T, bin string, n *nodeProc, model string, want map[[2]int]bool, within time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		out, err := exec.Command(bin, "peers", "--data", n.data, "--model", model, "--json").CombinedOutput()
		if err == nil && showsSpans(out, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last output:\n%s", what, within, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func showsSpans(out []byte, want map[[2]int]bool) bool {
	var covs []struct {
		Complete bool
		Peers    []struct{ Start, End int }
	}
	if json.Unmarshal(out, &covs) != nil || len(covs) != 1 || !covs[0].Complete || len(covs[0].Peers) != len(want) {
		return false
	}
	for _, p := range covs[0].Peers {
		if !want[[2]int{p.Start, p.End}] {
			return false
		}
	}
	return true
}

// buildGPT builds a small GPT of layers decoder layers (layers+2 blocks)
// with the binary and returns its folder and model ID.
func buildGPT(t *testing.T, bin string, layers int) (dir, id string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "gpt")
	runBin(t, bin, "shard", "build", "gpt", "--layers", strconv.Itoa(layers), "--dim", "64", "--heads", "2", "--ctx", "64", "--out", dir)
	for _, line := range strings.Split(runBin(t, bin, "shard", "inspect", dir), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "model" {
			id = f[1]
		}
	}
	if id == "" {
		t.Fatal("no model ID from shard inspect")
	}
	return dir, id
}
