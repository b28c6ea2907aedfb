package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// peerSpans is what `infermesh peers --model ID --json` shows of one
// model: whether its blocks are all served, and the spans, [start, end).
func peerSpans(t *testing.T, bin string, n *nodeProc, model string) (complete bool, spans [][2]int) {
	t.Helper()
	out, err := exec.Command(bin, "peers", "--data", n.data, "--model", model, "--json").CombinedOutput()
	var covs []struct {
		Complete bool
		Peers    []struct{ Start, End int }
	}
	if err != nil || json.Unmarshal(out, &covs) != nil || len(covs) != 1 {
		return false, nil
	}
	for _, p := range covs[0].Peers {
		spans = append(spans, [2]int{p.Start, p.End})
	}
	return covs[0].Complete, spans
}

// waitSpans polls peerSpans until ok accepts what it shows.
func waitSpans(t *testing.T, bin string, n *nodeProc, model string, within time.Duration, what string, ok func(complete bool, spans [][2]int) bool) [][2]int {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		complete, spans := peerSpans(t, bin, n, model)
		if ok(complete, spans) {
			return spans
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last: complete %v, spans %v", what, within, complete, spans)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Acceptance of issue 15 (durability), as a new user meets it: one
// operator serves all 8 blocks of a built GPT; two empty nodes join with
// --model ID --max-blocks 5 (room for all 8 between them); the operator
// stops gracefully. Every block is still served, a generation through the
// two joined nodes equals the local run, and nobody logs that rebalancing
// failed. Then one of the two stops: the blocks only it served are lost,
// and it says so, at warn level, on its stderr.
func TestProcessDurabilityOperatorLeaves(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	began := time.Now()
	bin := buildBinary(t)
	model, id := buildGPT(t, bin, 6)
	const blocks = 8

	op := startNodeProc(t, bin, "--serve", model, "--handoff-wait", "20s")
	boot := op.addr(t)
	joined := []*nodeProc{
		startNodeProc(t, bin, "--model", id, "--max-blocks", "5", "--bootstrap", boot, "--handoff-wait", "10s"),
		startNodeProc(t, bin, "--model", id, "--max-blocks", "5", "--bootstrap", boot, "--handoff-wait", "10s"),
	}
	spans := waitSpans(t, bin, op, id, 20*time.Second, "the operator sees both joined nodes", func(complete bool, spans [][2]int) bool {
		return complete && len(spans) == 3
	})
	t.Logf("spans with the operator: %v (%s in)", spans, time.Since(began).Round(time.Millisecond))

	stopped := time.Now()
	op.stop(t)
	t.Logf("the operator stopped in %s", time.Since(stopped).Round(time.Millisecond))
	if log, _ := os.ReadFile(op.log); strings.Contains(string(log), "lost from the mesh") {
		t.Errorf("the operator lost blocks when it left:\n%s", log)
	}
	var left [][2]int
	for i, n := range joined {
		left = waitSpans(t, bin, n, id, 15*time.Second, fmt.Sprintf("joined node %d sees every block served without the operator", i),
			func(complete bool, spans [][2]int) bool { return complete && len(spans) == 2 })
	}
	held := make([]int, blocks)
	for _, s := range left {
		for b := s[0]; b < s[1]; b++ {
			held[b]++
		}
	}
	t.Logf("spans without the operator: %v, copies per block %v", left, held)

	gen := runBin(t, bin, "generate", "--data", joined[0].data, "--model", id, "--prompt", "Hi mesh", "--tokens", "12")
	local := runBin(t, bin, "shard", "generate", model, "--prompt", "Hi mesh", "--tokens", "12")
	if first, want := strings.SplitN(gen, "\n", 2)[0], "Hi mesh"+strings.SplitN(local, "\n", 2)[0]; first != want {
		t.Fatalf("mesh generated %q, local run %q", first, local)
	}
	for i, n := range joined {
		if log, _ := os.ReadFile(n.log); strings.Contains(string(log), "rebalancing failed") {
			t.Errorf("joined node %d: rebalancing failed:\n%s", i, log)
		}
	}

	// The second joined node leaves: some blocks only it serves, and the
	// first cannot take them without dropping blocks only it serves. It
	// waits for a taker (5 s without a sign of one), then says which
	// blocks are lost.
	last := joined[1]
	last.stop(t)
	log, _ := os.ReadFile(last.log)
	var warn string
	for _, line := range strings.Split(string(log), "\n") {
		if strings.Contains(line, "level=WARN") && strings.Contains(line, "lost from the mesh") {
			warn = line
		}
	}
	if warn == "" || !strings.Contains(warn, "blocks=") {
		t.Fatalf("the last server of some blocks left without warning:\n%s", log)
	}
	t.Logf("it warned: %s", warn)
	t.Logf("the test took %s", time.Since(began).Round(time.Millisecond))
}
