package node

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// Issue 12: inputs that disagree with the manifest (an attention mask one
// longer than the tokens, symbolic dimensions that disagree across inputs)
// are the caller's fault: /v1/infer and /v1/jobs answer 400 with the reason
// at once, and no hop is contacted, let alone failed over or blamed.
func TestBadInputIsRefusedBeforeAnyHop(t *testing.T) {
	tm := startTestMesh(t, "0-3", "4-6", "7-9")
	m, rq := tm.model, tm.requester
	model := m.ID.String()

	good := shards.RandomInputs(m.Manifest, 1, 1, 5)
	with := func(name string, tensor *protocol.Tensor) map[string]*protocol.Tensor {
		in := map[string]*protocol.Tensor{}
		for k, v := range good {
			in[k] = v
		}
		in[name] = tensor
		return in
	}
	ones := func(shape ...int64) *protocol.Tensor {
		v := make([]int64, protocol.NumElements(shape))
		for i := range v {
			v[i] = 1
		}
		return protocol.NewTensor(shape, v)
	}
	for _, c := range []struct {
		name, path string
		inputs     map[string]*protocol.Tensor
		want       string
	}{
		{"mask one longer", "/v1/infer", with("attention_mask", ones(1, 6)), "attention_mask"},
		{"seq disagrees", "/v1/infer", with("position_ids", ones(1, 4)), `dimension "seq" disagrees`},
		{"batch disagrees", "/v1/infer", with("attention_mask", ones(2, 5)), `dimension "batch" disagrees`},
		{"job mask one longer", "/v1/jobs", with("attention_mask", ones(1, 6)), "attention_mask"},
	} {
		start := time.Now()
		resp := post(t, rq, c.path, map[string]any{"model": model, "inputs": c.inputs})
		took := time.Since(start)
		var e struct {
			Error struct{ Code, Message string } `json:"error"`
		}
		err := json.NewDecoder(resp.Body).Decode(&e)
		if resp.StatusCode != http.StatusBadRequest || err != nil || e.Error.Code != "bad_request" || !strings.Contains(e.Error.Message, c.want) {
			t.Errorf("%s: %s %+v (%v); want 400 bad_request saying %q", c.name, resp.Status, e, err, c.want)
		}
		if took > 2*time.Second {
			t.Errorf("%s: answered in %s; want at once", c.name, took)
		}
		t.Logf("%s: %d %s: %s (%s)", c.name, resp.StatusCode, e.Error.Code, e.Error.Message, took.Round(time.Microsecond))
	}

	// No hop ran a step, none was re-routed.
	for i, s := range tm.servers {
		if st := s.Mesh().StageStats(); st.Steps != 0 {
			t.Errorf("server %d ran %d steps for malformed inputs", i, st.Steps)
		}
	}
	resp, err := http.Get("http://" + rq.APIAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "\ninfermesh_failovers_total 0\n") {
		t.Errorf("the requester failed over for malformed inputs:\n%s", grepLines(string(body), "infermesh_failovers_total"))
	}

	// Well-formed inputs still go through, over every hop.
	res, err := rq.Infer(t.Context(), m.ID, good, mesh.InferOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Info.Failovers != 0 || len(res.Info.Route) != 3 {
		t.Fatalf("good pass: route %v, %d failovers", res.Info.Route, res.Info.Failovers)
	}
}
