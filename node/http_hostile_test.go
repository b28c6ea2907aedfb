package node

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// apiCall sends a request to n's API with the given headers (Host is set
// as the request's Host) and returns the status, the error code of a JSON
// error answer, and the body.
func apiCall(t *testing.T, n *Node, method, path string, headers map[string]string, body string) (int, string, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, "http://"+n.APIAddr()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e struct {
		Error struct{ Code string } `json:"error"`
	}
	json.Unmarshal(b, &e)
	return resp.StatusCode, e.Error.Code, string(b)
}

// startNodeWith starts a node like startTestNode, its config changed by
// change, and waits until it sees model's blocks covered if model is set.
func startNodeWith(t *testing.T, boot []string, model string, change func(*Config)) *Node {
	t.Helper()
	dir := t.TempDir()
	cfg := DefaultConfig()
	cfg.Listen, cfg.API = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, "127.0.0.1:0"
	cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
	cfg.Bootstrap, cfg.Threads = boot, 1
	cfg.RecordTTL, cfg.ViewRefresh = Duration(time.Minute), Duration(500*time.Millisecond)
	change(&cfg)
	if _, err := Init(dir, cfg); err != nil {
		t.Fatal(err)
	}
	n, err := New(context.Background(), cfg, Options{DataDir: dir, MeasureRounds: 2, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	for deadline := time.Now().Add(15 * time.Second); model != ""; time.Sleep(50 * time.Millisecond) {
		if cov, err := n.Coverage(context.Background(), model); err == nil && cov.Complete {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the node never saw the model covered")
		}
	}
	return n
}

// Finding 5 of issue 12: a page elsewhere cannot make the API generate,
// pull or publish (its POSTs carry its Origin), nor read it through a name
// re-pointed at 127.0.0.1 (DNS rebinding: a foreign Host); programs that
// send no Origin, and the API's own pages, keep working. Finding 8: publish
// reads only from the directories the operator allowed.
func TestAPIRefusesCrossSiteRequests(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	n, model := tm.requester, tm.model.ID.String()
	own := "http://" + n.APIAddr()
	_, port, _ := net.SplitHostPort(n.APIAddr())
	bodies := map[string]string{
		"/v1/generate": fmt.Sprintf(`{"model": %q, "prompt": "hi", "max_tokens": 4}`, model),
		"/v1/pull":     fmt.Sprintf(`{"model": %q}`, model),
		"/v1/publish":  fmt.Sprintf(`{"dir": %q}`, tm.model.Dir),
	}
	for path, body := range bodies {
		for _, h := range []map[string]string{
			{"Origin": "http://evil.example", "Content-Type": "text/plain"},
			{"Origin": "http://evil.example", "Content-Type": "application/json"},
			{"Origin": "null", "Content-Type": "text/plain"},
			{"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"},
			{"Host": "evil.example:" + port, "Content-Type": "application/json"},
			{"Host": "evil.example", "Content-Type": "application/json"},
		} {
			if status, code, b := apiCall(t, n, "POST", path, h, body); status != http.StatusForbidden || !strings.HasPrefix(code, "forbidden_") {
				t.Errorf("POST %s with %v: %d %s, want 403", path, h, status, b)
			}
		}
		// A form or text POST, what a page can send without a preflight.
		for _, ct := range []string{"text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""} {
			if status, code, b := apiCall(t, n, "POST", path, map[string]string{"Content-Type": ct}, body); status != http.StatusUnsupportedMediaType || code != "unsupported_media_type" {
				t.Errorf("POST %s as %q: %d %s, want 415", path, ct, status, b)
			}
		}
	}
	if status, _, b := apiCall(t, n, "GET", "/v1/status", map[string]string{"Host": "rebound.evil.example:" + port}, ""); status != http.StatusForbidden {
		t.Errorf("GET /v1/status with a foreign Host: %d %s", status, b)
	}
	// Nothing of the refused pulls and publishes happened.
	if has, _ := n.own.Has(tm.model.ID); has {
		t.Fatal("a refused pull or publish stored the model's manifest")
	}

	// Without an Origin (curl, the SDKs), or with the API's own (the
	// dashboard), under any of its names.
	for _, h := range []map[string]string{
		{"Content-Type": "application/json"},
		{"Content-Type": "application/json; charset=utf-8", "Origin": own},
		{"Content-Type": "application/json", "Host": "localhost:" + port, "Origin": "http://localhost:" + port},
	} {
		if status, _, b := apiCall(t, n, "POST", "/v1/generate", h, bodies["/v1/generate"]); status != http.StatusOK {
			t.Errorf("generate with %v: %d %s", h, status, b)
		}
	}
	for _, path := range []string{"/", "/v1/status", "/dashboard/app.js"} {
		if status, _, b := apiCall(t, n, "GET", path, map[string]string{"Origin": own}, ""); status != http.StatusOK {
			t.Errorf("GET %s from the dashboard: %d %s", path, status, b)
		}
	}
	status, _, b := apiCall(t, n, "POST", "/v1/pull", map[string]string{"Content-Type": "application/json"}, bodies["/v1/pull"])
	if status != http.StatusOK || !strings.Contains(b, `"result"`) {
		t.Fatalf("pull: %d %s", status, b)
	}

	// Publish: only from DATA/models, the served directories and
	// --publish-dir ones; the answer does not tell whether a path exists.
	var refusals []string
	for _, dir := range []string{"/etc", "/nonexistent/secret", tm.model.Dir, tm.model.Dir + "/../gpt-other", n.opts.DataDir} {
		status, code, b := apiCall(t, n, "POST", "/v1/publish", map[string]string{"Content-Type": "application/json"}, fmt.Sprintf(`{"dir": %q}`, dir))
		if status != http.StatusForbidden || code != "forbidden_dir" {
			t.Errorf("publish %s: %d %s, want 403", dir, status, b)
		}
		refusals = append(refusals, strings.ReplaceAll(b, dir, "DIR"))
	}
	if refusals[0] != refusals[1] {
		t.Errorf("the refusals of an existing and a missing path differ:\n%s\n%s", refusals[0], refusals[1])
	}
	server := tm.servers[0] // it serves the model's directory: `infermesh shard publish` of it works
	var tr TransferResponse
	postJSON(t, server, "/v1/publish", PublishRequest{Dir: tm.model.Dir}, &tr)
	if tr.Model != model {
		t.Fatalf("publish of the served directory: %+v", tr)
	}
	// An API with a token answers to any name (a rebound page has no
	// token), but still only to its own pages.
	tokened := startNodeWith(t, nil, "", func(c *Config) { c.APIToken = "s3cret" })
	_, tport, _ := net.SplitHostPort(tokened.APIAddr())
	for _, c := range []struct {
		h    map[string]string
		want int
	}{
		{map[string]string{"Host": "mybox.lan:" + tport, "Authorization": "Bearer s3cret"}, 200},
		{map[string]string{"Host": "mybox.lan:" + tport, "Origin": "http://mybox.lan:" + tport, "Authorization": "Bearer s3cret"}, 200},
		{map[string]string{"Host": "evil.example:" + tport, "Origin": "http://evil.example:" + tport}, 401},
		{map[string]string{"Origin": "http://evil.example", "Authorization": "Bearer s3cret"}, 403},
	} {
		if status, _, b := apiCall(t, tokened, "GET", "/v1/status", c.h, ""); status != c.want {
			t.Errorf("GET /v1/status of a node with a token, %v: %d %s, want %d", c.h, status, b, c.want)
		}
	}

	// A directory given with --publish-dir, and what is under it.
	allowed := startNodeWith(t, nil, "", func(c *Config) { c.PublishDirs = []string{tm.model.Dir + "/.."} })
	postJSON(t, allowed, "/v1/publish", PublishRequest{Dir: tm.model.Dir}, &tr)
	if tr.Model != model {
		t.Fatalf("publish under --publish-dir: %+v", tr)
	}
}

// Finding 6 of issue 12: a prompt far longer than the model's context is
// refused before it is tokenized, costing neither memory nor time.
func TestAPIRefusesHugePrompts(t *testing.T) {
	tm := startTestMesh(t, "0-9")
	n, model := tm.requester, tm.model.ID.String()
	// One small request first, so that the codec and connections exist
	// before the heap is measured.
	var ok Completion
	postJSON(t, n, "/v1/completions", map[string]any{"model": model, "prompt": "hi", "max_tokens": 1}, &ok)

	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	huge := strings.Repeat("a", 50<<20)
	for path, body := range map[string]any{
		"/v1/completions":      map[string]any{"model": model, "prompt": huge},
		"/v1/chat/completions": map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": huge}}},
		"/v1/generate":         map[string]any{"model": model, "prompt": huge},
		"/v1/tokenize":         map[string]any{"model": model, "content": huge},
	} {
		// Not post: its cleanup would hold the request, and the prompt.
		j, _ := json.Marshal(body)
		start := time.Now()
		status, code, b := apiCall(t, n, "POST", path, map[string]string{"Content-Type": "application/json"}, string(j))
		if status != http.StatusBadRequest || code != "context_length_exceeded" {
			t.Errorf("%s with a 50 MB prompt: %d %.200s", path, status, b)
		}
		if d := time.Since(start); d > 15*time.Second { // reading 16 MiB under -race on a busy machine
			t.Errorf("%s: refusing a 50 MB prompt took %v", path, d)
		}
	}
	huge = ""
	if after := heap(); after > before+40<<20 {
		t.Errorf("the heap grew from %d MiB to %d MiB", before>>20, after>>20)
	}

	// Within the body limit but past the context (128 tokens, so 4 KiB of
	// text): refused by its length, before tokenizing.
	long := strings.Repeat("b", 100<<10)
	msgs := make([]map[string]string, 200)
	for i := range msgs {
		msgs[i] = map[string]string{"role": "user", "content": ""}
	}
	for path, body := range map[string]any{
		"/v1/completions":      map[string]any{"model": model, "prompt": []string{long}},
		"/v1/chat/completions": map[string]any{"model": model, "messages": msgs},
		"/v1/generate":         map[string]any{"model": model, "prompt": long},
		"/v1/tokenize":         map[string]any{"model": model, "content": long},
	} {
		resp := post(t, n, path, body)
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "context_length_exceeded") || !strings.Contains(string(b), "bytes") {
			t.Errorf("%s with a 100 KB prompt: %s %.300s", path, resp.Status, b)
		}
	}
	// A prompt the byte bound lets through is still counted in tokens.
	resp := post(t, n, "/v1/completions", map[string]any{"model": model, "prompt": strings.Repeat("c", 1000)})
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "has 1000 tokens") {
		t.Errorf("a 1000-token prompt: %s %s", resp.Status, b)
	}
}

// Finding 7 of issue 12: connections that trickle their request are closed
// within the read timeout, while a stream that outlasts it is not cut.
func TestAPIClosesSlowConnections(t *testing.T) {
	const readTimeout = 2 * time.Second
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	n := startNodeWith(t, []string{tm.requester.Status().Addrs[0]}, model, func(c *Config) {
		c.APIReadTimeout, c.APIIdleTimeout = Duration(readTimeout), Duration(readTimeout)
	})

	const conns = 50
	start := time.Now()
	var wg sync.WaitGroup
	held := make(chan string, conns)
	for i := range conns {
		wg.Go(func() {
			c, err := net.Dial("tcp", n.APIAddr())
			if err != nil {
				held <- err.Error()
				return
			}
			defer c.Close()
			// A third trickle their headers, a third their body, a third
			// what follows a whole JSON body.
			head := "POST /v1/generate HTTP/1.1\r\nHost: " + n.APIAddr() + "\r\n"
			switch i % 3 {
			case 1:
				head += "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
			case 2:
				head += "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"" + model + "\", \"max_tokens\": 1}"
			}
			if _, err := io.WriteString(c, head); err != nil {
				held <- err.Error()
				return
			}
			closed := make(chan struct{})
			go func() { // a byte every 2 s until the server closes
				defer close(closed)
				for {
					if _, err := io.ReadAll(c); err == nil || !isTimeout(err) {
						return
					}
				}
			}()
			tick := time.NewTicker(readTimeout)
			defer tick.Stop()
			limit := time.After(readTimeout + 5*time.Second)
			for {
				select {
				case <-closed:
					return
				case <-tick.C:
					c.Write([]byte(" "))
				case <-limit:
					held <- fmt.Sprintf("connection %d still open after %v", i, time.Since(start))
					return
				}
			}
		})
	}
	wg.Wait()
	close(held)
	for msg := range held {
		t.Error(msg)
	}

	// A stream longer than the read timeout runs to its end.
	const short = 100 * time.Millisecond
	quick := startNodeWith(t, []string{tm.requester.Status().Addrs[0]}, model, func(c *Config) { c.APIReadTimeout = Duration(short) })
	for _, path := range []string{"/v1/generate", "/v1/completions"} {
		t0 := time.Now()
		// Greedy: a sampled stream may end at an eos token before it is long.
		resp := post(t, quick, path, map[string]any{"model": model, "prompt": "once", "max_tokens": 120, "stream": true, "temperature": 0})
		events := readSSE(t, resp)
		if last := events[len(events)-1]; last.data != "[DONE]" || len(events) < 100 {
			t.Fatalf("%s: the stream ended with %+v after %d events and %v", path, last, len(events), time.Since(t0))
		}
		if d := time.Since(t0); d < short {
			t.Logf("%s: the stream took %v only, less than the read timeout", path, d)
		}
	}
	// And an idle kept-alive connection is let go.
	c, err := net.Dial("tcp", n.APIAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /v1/status HTTP/1.1\r\nHost: %s\r\n\r\n", n.APIAddr())
	r := bufio.NewReader(c)
	if st, err := http.ReadResponse(r, nil); err != nil || st.StatusCode != http.StatusOK {
		t.Fatalf("status on a raw connection: %v", err)
	} else {
		io.Copy(io.Discard, st.Body)
	}
	c.SetReadDeadline(time.Now().Add(readTimeout + 3*time.Second))
	if _, err := r.ReadByte(); err == nil || isTimeout(err) {
		t.Fatalf("an idle connection was held: %v", err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
