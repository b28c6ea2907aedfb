package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/cmd/infermesh/cli"
)

// Issue 12, finding 11.3: a DATA/api left by a crashed node gets a message
// that says so, not a raw "connection refused", and a non-zero exit.
func TestCLIStaleAPIFile(t *testing.T) {
	data := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nobody listens there any more, as after a crash
	if err := os.WriteFile(filepath.Join(data, "api"), []byte(addr+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"peers"}, {"shard", "pull", "bafkqaaa"}} {
		var out, errb bytes.Buffer
		code := cli.Run(append(args, "--data", data), &out, &errb)
		want := fmt.Sprintf("no infermesh node is running at %s (read from %s; it may have crashed): start one with `infermesh node`",
			addr, filepath.Join(data, "api"))
		if code == 0 || !strings.Contains(errb.String(), want) {
			t.Errorf("infermesh %s: exit %d, stderr %q; want a non-zero exit and %q", strings.Join(args, " "), code, errb.String(), want)
		}
	}
}

// Issue 12, finding 11.1, as an operator meets it: `infermesh node` on a
// data directory a running node holds fails at once, naming its pid; once
// that node stops, it starts.
func TestNodeProcessDataDirInUse(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildBinary(t)
	first := startNodeProc(t, bin)
	started := time.Now()
	out, err := exec.Command(bin, "node", "--data", first.data).CombinedOutput()
	want := fmt.Sprintf("%s is in use by another infermesh node (pid %d)", first.data, first.cmd.Process.Pid)
	if err == nil || !strings.Contains(string(out), want) {
		t.Fatalf("second node: %v\n%s\nwant a failure saying %q", err, out, want)
	}
	if d := time.Since(started); d > 5*time.Second {
		t.Errorf("the second node took %s to fail", d)
	}
	first.stop(t)
	if _, err := os.Stat(filepath.Join(first.data, "api")); !os.IsNotExist(err) {
		t.Errorf("DATA/api left after a clean shutdown: %v", err)
	}
	// The data directory is free again.
	second := exec.Command(bin, "node", "--data", first.data)
	var log bytes.Buffer
	second.Stdout, second.Stderr = &log, &log
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { second.Process.Kill(); second.Wait() }()
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(filepath.Join(first.data, "api")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node did not start on the freed data directory")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Issue 12, finding 11.6: two nodes in DHT mode auto with --no-nat on
// loopback: `shard publish` on one and `shard pull` on the other work at
// once (they stayed DHT clients and found no provider), and the mode shows
// in GET /v1/status and in the start-up log.
func TestProcessPublishPullDHTAuto(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildBinary(t)
	model := filepath.Join(t.TempDir(), "gpt")
	runBin(t, bin, "shard", "build", "gpt", "--layers", "2", "--dim", "64", "--heads", "2", "--ctx", "64", "--out", model)
	a := startNodeProc(t, bin, "--dht-mode", "auto", "--publish-dir", filepath.Dir(model))
	b := startNodeProc(t, bin, "--dht-mode", "auto", "--bootstrap", a.addr(t))
	for _, p := range []*nodeProc{a, b} {
		api, _ := os.ReadFile(filepath.Join(p.data, "api"))
		resp, err := http.Get("http://" + strings.TrimSpace(string(api)) + "/v1/status")
		if err != nil {
			t.Fatal(err)
		}
		var st struct {
			DHTMode string `json:"dht_mode"`
		}
		json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		if st.DHTMode != "server" {
			t.Errorf("node in %s: status dht_mode %q, want server", p.data, st.DHTMode)
		}
		if log, _ := os.ReadFile(p.log); !bytes.Contains(log, []byte("dht_mode=server")) {
			t.Errorf("node in %s: the start-up log does not say dht_mode=server:\n%s", p.data, log)
		}
	}
	out := runBin(t, bin, "shard", "publish", model, "--data", a.data)
	f := strings.Fields(out)
	if len(f) < 3 || f[0] != "published" {
		t.Fatalf("publish: %s", out)
	}
	id := f[2]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	began := time.Now()
	pulled, err := exec.CommandContext(ctx, bin, "shard", "pull", id, "--data", b.data).CombinedOutput()
	if err != nil {
		t.Fatalf("pull after %s: %v\n%s", time.Since(began).Round(time.Millisecond), err, pulled)
	}
	t.Logf("pulled in %s: %s", time.Since(began).Round(time.Millisecond), pulled)
}
