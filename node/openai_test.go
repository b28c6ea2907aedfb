package node

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/shards"
)

// post sends body (a string is sent as is) to the API of n.
func post(t *testing.T, n *Node, path string, body any) *http.Response {
	t.Helper()
	b, ok := body.(string)
	if !ok {
		j, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		b = string(j)
	}
	resp, err := http.Post("http://"+n.APIAddr()+path, "application/json", strings.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// postJSON posts body and decodes a 200 answer into out.
func postJSON(t *testing.T, n *Node, path string, body, out any) {
	t.Helper()
	resp := post(t, n, path, body)
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: %s: %s", path, resp.Status, b)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("%s: %v in %s", path, err, b)
	}
}

type sseEvent struct {
	name, data string
}

// readSSE reads every event of a stream.
func readSSE(t *testing.T, resp *http.Response) []sseEvent {
	t.Helper()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != http.StatusOK || ct != "text/event-stream" {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("stream: %s, %s: %s", resp.Status, ct, b)
	}
	var out []sseEvent
	var ev sseEvent
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			out = append(out, ev)
			ev = sseEvent{}
		case strings.HasPrefix(line, "event: "):
			ev.name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.data = strings.TrimPrefix(line, "data: ")
		default:
			t.Fatalf("stream: unexpected line %q", line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// tokenString is the text of byte tokens, as JSON carries it (each byte
// outside UTF-8 becomes U+FFFD).
func tokenString(toks []int64) string {
	j, _ := json.Marshal(string(bytesOf(toks)))
	var s string
	json.Unmarshal(j, &s)
	return s
}

// streamGenerate runs a streamed /v1/generate: the tokens of its events
// and its final answer, whose text the events' texts add up to (a token
// that ends inside a UTF-8 character has no text of its own: the
// character comes with the token that completes it).
func streamGenerate(t *testing.T, n *Node, req map[string]any) ([]int64, GenerateResponse) {
	t.Helper()
	req["stream"] = true
	events := readSSE(t, post(t, n, "/v1/generate", req))
	if len(events) < 2 || events[len(events)-1].data != "[DONE]" {
		t.Fatalf("stream does not end with [DONE]: %+v", events)
	}
	var toks []int64
	var text strings.Builder
	for _, ev := range events[:len(events)-2] {
		var tok struct {
			Token *int64  `json:"token"`
			Text  *string `json:"text"`
		}
		if err := json.Unmarshal([]byte(ev.data), &tok); err != nil || ev.name != "" || tok.Token == nil || tok.Text == nil {
			t.Fatalf("token event %+v: %v", ev, err)
		}
		toks = append(toks, *tok.Token)
		text.WriteString(*tok.Text)
	}
	var final GenerateResponse
	if err := json.Unmarshal([]byte(events[len(events)-2].data), &final); err != nil {
		t.Fatal(err)
	}
	if text.String() != final.Text {
		t.Fatalf("the events' texts make %q, the final text is %q", text.String(), final.Text)
	}
	return toks, final
}

func TestGenerateStreamingStopAndBadRequests(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	rq := tm.requester

	var whole GenerateResponse
	postJSON(t, rq, "/v1/generate", map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 24}, &whole)
	if len(whole.Tokens) != 24 {
		t.Fatalf("generated %d tokens, want 24", len(whole.Tokens))
	}
	toks, final := streamGenerate(t, rq, map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 24})
	if !slices.Equal(toks, whole.Tokens) || !slices.Equal(final.Tokens, whole.Tokens) || final.Text != whole.Text {
		t.Fatalf("streamed %v (final %v), not streamed %v", toks, final.Tokens, whole.Tokens)
	}
	if len(final.Route) != 2 || final.Text != tokenString(whole.Tokens) {
		t.Fatalf("final event %+v", final)
	}
	t.Logf("24 tokens streamed one event each, equal to the whole answer %q", whole.Text)

	// A generation that ends inside a character: the bytes the stream held
	// back still go out (as the replacement character JSON makes of them).
	if lead := slices.IndexFunc(whole.Tokens, func(x int64) bool { return x >= 0xc2 && x <= 0xf4 }); lead >= 0 {
		_, cut := streamGenerate(t, rq, map[string]any{"model": model, "prompt": "the mesh", "max_tokens": lead + 1})
		if !strings.HasSuffix(cut.Text, "\uFFFD") {
			t.Fatalf("cut after a lead byte: %q", cut.Text)
		}
	} else {
		t.Logf("no UTF-8 lead byte among %v", whole.Tokens)
	}

	// A stop sequence: two ASCII bytes of the greedy output.
	i := slices.IndexFunc(whole.Tokens[3:len(whole.Tokens)-1], func(x int64) bool { return x < 0x80 }) + 3
	if i < 3 || whole.Tokens[i+1] >= 0x80 {
		i = slices.IndexFunc(whole.Tokens[3:], func(x int64) bool { return x < 0x80 }) + 3
	}
	if i < 3 {
		t.Fatalf("no ASCII in %v to stop at", whole.Tokens)
	}
	stop := tokenString(whole.Tokens[i:min(i+2, len(whole.Tokens))])
	if whole.Tokens[min(i+1, len(whole.Tokens)-1)] >= 0x80 {
		stop = stop[:1]
	}
	cut := strings.Index(string(bytesOf(whole.Tokens)), stop)
	wantToks := whole.Tokens[:cut]
	var stopped GenerateResponse
	postJSON(t, rq, "/v1/generate", map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 24, "stop": []string{"never", stop}}, &stopped)
	if !slices.Equal(stopped.Tokens, wantToks) || stopped.Text != tokenString(wantToks) {
		t.Fatalf("stop %q: got %v, want %v", stop, stopped.Tokens, wantToks)
	}
	toks, final = streamGenerate(t, rq, map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 24, "stop": []string{stop}})
	if !slices.Equal(toks, wantToks) || !slices.Equal(final.Tokens, wantToks) || final.Text != tokenString(wantToks) {
		t.Fatalf("streamed with stop %q: %v (final %v), want %v", stop, toks, final.Tokens, wantToks)
	}
	var comp Completion
	postJSON(t, rq, "/v1/completions", map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 24, "temperature": 0, "stop": stop}, &comp)
	if comp.Choices[0].Text == nil || *comp.Choices[0].Text != tokenString(wantToks) || *comp.Choices[0].FinishReason != "stop" {
		t.Fatalf("completion with stop %q: %+v", stop, comp.Choices[0])
	}
	t.Logf("stop %q ends the text after %d tokens, streamed or not", stop, cut)

	// Sampling with top_p and a seed is reproducible.
	samp := map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}
	var s1, s2 GenerateResponse
	postJSON(t, rq, "/v1/generate", samp, &s1)
	postJSON(t, rq, "/v1/generate", samp, &s2)
	if !slices.Equal(s1.Tokens, s2.Tokens) || len(s1.Tokens) != 12 {
		t.Fatalf("seeded top_p sampling: %v then %v", s1.Tokens, s2.Tokens)
	}

	// GET /v1/models: a server knows the model it serves; the requester,
	// which serves and stores nothing, knows it from the mesh. Both see it
	// whole, as a text model of 10 blocks served by 2 peers.
	for _, c := range []struct {
		n    *Node
		want []string
	}{{tm.servers[0], []string{model}}, {rq, []string{model}}} {
		resp, err := http.Get("http://" + c.n.APIAddr() + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		var list struct {
			Object string        `json:"object"`
			Data   []OpenAIModel `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&list)
		resp.Body.Close()
		var ids []string
		for _, m := range list.Data {
			ids = append(ids, m.ID)
			if m.Object != "model" || m.OwnedBy != "infermesh" || m.Mesh == nil {
				t.Fatalf("model %+v", m)
			}
			if mm := *m.Mesh; !mm.Text || mm.Blocks != 10 || !mm.Complete || len(mm.Uncovered) != 0 || mm.Servers != 2 || mm.Name == "" {
				t.Fatalf("model %s as the mesh has it: %+v", m.ID, mm)
			}
		}
		if err != nil || list.Object != "list" || list.Data == nil || !slices.Equal(ids, c.want) {
			t.Fatalf("GET /v1/models: %+v %v, want %v", list, err, c.want)
		}
	}

	unknown := shards.ManifestCID([]byte(`{"nothing":1}`)).String()
	chat := func(extra map[string]any) map[string]any {
		req := map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}
		for k, v := range extra {
			req[k] = v
		}
		return req
	}
	for _, c := range []struct {
		name   string
		path   string
		body   any
		status int
		code   string
	}{
		{"n=2", "/v1/chat/completions", chat(map[string]any{"n": 2}), 400, "bad_request"},
		{"n=2 completions", "/v1/completions", map[string]any{"model": model, "prompt": "x", "n": 2}, 400, "bad_request"},
		{"unknown model", "/v1/chat/completions", chat(map[string]any{"model": unknown}), 404, "model_not_found"},
		{"not a CID", "/v1/completions", map[string]any{"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"},
		{"unknown model generate", "/v1/generate", map[string]any{"model": unknown, "prompt": "x", "stream": true}, 404, "model_not_found"},
		{"negative max_tokens", "/v1/completions", map[string]any{"model": model, "prompt": "x", "max_tokens": -1}, 400, "bad_request"},
		{"zero max_tokens", "/v1/chat/completions", chat(map[string]any{"max_tokens": 0}), 400, "bad_request"},
		{"negative max_tokens generate", "/v1/generate", map[string]any{"model": model, "prompt": "x", "max_tokens": -3}, 400, "bad_request"},
		{"bad JSON chat", "/v1/chat/completions", `{"model": `, 400, "bad_request"},
		{"bad JSON completions", "/v1/completions", `[1,2`, 400, "bad_request"},
		{"bad JSON generate", "/v1/generate", `{"stream": tru}`, 400, "bad_request"},
		{"temperature 5", "/v1/completions", map[string]any{"model": model, "prompt": "x", "temperature": 5}, 400, "bad_request"},
		{"top_p 2", "/v1/chat/completions", chat(map[string]any{"top_p": 2}), 400, "bad_request"},
		{"stop a number", "/v1/chat/completions", chat(map[string]any{"stop": 3}), 400, "bad_request"},
		{"no messages", "/v1/chat/completions", map[string]any{"model": model, "messages": []any{}}, 400, "bad_request"},
		{"image part", "/v1/chat/completions", chat(map[string]any{"messages": []map[string]any{{"role": "user", "content": []map[string]string{{"type": "image_url"}}}}}), 400, "bad_request"},
		{"empty prompt", "/v1/completions", map[string]any{"model": model, "prompt": ""}, 400, "bad_request"},
		{"two prompts", "/v1/completions", map[string]any{"model": model, "prompt": []string{"a", "b"}}, 400, "bad_request"},
		{"token outside vocab", "/v1/completions", map[string]any{"model": model, "prompt": []int{1, 300}}, 400, "bad_request"},
		{"prompt past context", "/v1/completions", map[string]any{"model": model, "prompt": strings.Repeat("x", 200)}, 400, "context_length_exceeded"},
		// /v1/infer: tensors in JSON.
		{"infer wrong dtype", "/v1/infer", inferBody(model, `"input_ids":{"dtype":"float32","shape":[1,1],"data":[1]}`), 400, "bad_request"},
		{"infer shape mismatch", "/v1/infer", inferBody(model, `"input_ids":{"dtype":"int64","shape":[1,3],"data":[1,2]}`), 400, "bad_request"},
		{"infer negative dim", "/v1/infer", inferBody(model, `"input_ids":{"dtype":"int64","shape":[-1,1],"data":[]}`), 400, "bad_request"},
		{"infer missing input", "/v1/infer", inferBody(model, `"position_ids":{"dtype":"int64","shape":[1,1],"data":[0]}`), 400, "bad_request"},
		{"infer unknown model", "/v1/infer", `{"model":"` + unknown + `","inputs":{}}`, 404, "model_not_found"},
		{"infer huge body", "/v1/infer", `{"model":"` + model + `","inputs":{"x":{"dtype":"float32","shape":[1],"data":[` + strings.Repeat("0,", 33<<20) + `0]}}}`, 413, "bad_request"},
	} {
		start := time.Now()
		resp := post(t, rq, c.path, c.body)
		var e struct {
			Error struct{ Code, Message, Type string } `json:"error"`
		}
		err := json.NewDecoder(resp.Body).Decode(&e)
		openAI := strings.Contains(c.path, "completions") // OpenAI's error shape has a type too
		if resp.StatusCode != c.status || err != nil || e.Error.Code != c.code || e.Error.Message == "" ||
			(openAI && e.Error.Type != "invalid_request_error") {
			t.Errorf("%s: %s %+v (%v); want %d %s", c.name, resp.Status, e, err, c.status, c.code)
		}
		t.Logf("%s: %d %s: %s (%s)", c.name, resp.StatusCode, e.Error.Code, e.Error.Message, time.Since(start).Round(time.Millisecond))
	}
	// The node still serves.
	postJSON(t, rq, "/v1/generate", map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 24}, &whole)
}

func bytesOf(toks []int64) []byte {
	b := make([]byte, len(toks))
	for i, t := range toks {
		b[i] = byte(t)
	}
	return b
}

// openAIClient is the official openai npm package, installed once under
// the repository's .cache/npm-openai.
func openAIClient(t *testing.T) string {
	t.Helper()
	return filepath.Join(npmInstall(t, "npm-openai", "openai@4"), "openai", "index.mjs")
}

// npmInstall installs npm packages once into the repository's .cache/NAME
// and returns its node_modules folder. It skips the test only when npm
// cannot reach the registry.
func npmInstall(t *testing.T, name string, pkgs ...string) string {
	t.Helper()
	root, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(root)
		if parent == root {
			t.Fatal("no go.mod above the test")
		}
		root = parent
	}
	dir := filepath.Join(root, ".cache", name)
	modules := filepath.Join(dir, "node_modules")
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err == nil {
		return modules
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), name+"-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	if err := os.WriteFile(filepath.Join(tmp, "package.json"), []byte(`{"private": true}`), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("npm", append([]string{"install", "--no-audit", "--no-fund"}, pkgs...)...)
	cmd.Dir = tmp
	out, err := cmd.CombinedOutput()
	if err != nil {
		for _, s := range []string{"ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "network"} {
			if strings.Contains(string(out), s) {
				t.Skipf("npm cannot reach the registry to install %s: %s", strings.Join(pkgs, " "), out)
			}
		}
		t.Fatalf("npm install %s: %v\n%s", strings.Join(pkgs, " "), err, out)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(dir) // an older install without .complete
	if err := os.Rename(tmp, dir); err != nil {
		if _, serr := os.Stat(filepath.Join(dir, ".complete")); serr != nil { // not installed by a concurrent run either
			t.Fatal(err)
		}
	}
	return modules
}

const openAIScript = `
import OpenAI from %q;
const [base, serverBase, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base, apiKey: "none", maxRetries: 0 });
const messages = [{ role: "system", content: "You are a mesh." }, { role: "user", content: "Say hello." }];
const out = {};

const chat = await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0 });
out.chat = { id: chat.id, object: chat.object, model: chat.model, role: chat.choices[0].message.role,
  text: chat.choices[0].message.content, finish: chat.choices[0].finish_reason, usage: chat.usage };

const stream = await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0,
  stream: true, stream_options: { include_usage: true } });
const s = { text: "", chunks: 0, objects: [], role: null, finish: null, usage: null };
for await (const chunk of stream) {
  s.chunks++;
  if (!s.objects.includes(chunk.object)) s.objects.push(chunk.object);
  if (chunk.usage) s.usage = chunk.usage;
  for (const c of chunk.choices) {
    if (c.delta.role) s.role = c.delta.role;
    if (c.delta.content) s.text += c.delta.content;
    if (c.finish_reason) s.finish = c.finish_reason;
  }
}
out.chatStream = s;

const comp = await client.completions.create({ model, prompt: "the mesh", max_tokens: 10, temperature: 0 });
out.completion = { object: comp.object, text: comp.choices[0].text, finish: comp.choices[0].finish_reason, usage: comp.usage };

const cs = await client.completions.create({ model, prompt: "the mesh", max_tokens: 10, temperature: 0, stream: true });
out.completionStream = { text: "", chunks: 0 };
for await (const chunk of cs) { out.completionStream.chunks++; out.completionStream.text += chunk.choices[0]?.text ?? ""; }

try {
  await client.chat.completions.create({ model, messages, n: 2 });
  out.badRequest = "no error";
} catch (e) {
  out.badRequest = { status: e.status, type: e.type, code: e.code, message: e.message };
}

const models = await new OpenAI({ baseURL: serverBase, apiKey: "none" }).models.list();
out.models = models.data.map((m) => m.id);
console.log(JSON.stringify(out));
`

// Acceptance 1 of issue 6: the official openai npm package runs chat
// completions and completions, streamed and not, against the node.
func TestOpenAINpmClient(t *testing.T) {
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node is not installed: this test runs the official openai npm package with it")
	}
	entry := openAIClient(t)
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	script := filepath.Join(t.TempDir(), "client.mjs")
	if err := os.WriteFile(script, fmt.Appendf(nil, openAIScript, "file://"+entry), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("node", script, "http://"+tm.requester.APIAddr()+"/v1", "http://"+tm.servers[0].APIAddr()+"/v1", model)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("openai client: %v\n%s\n%s", err, stdout, stderr.String())
	}
	t.Logf("openai client: %s", stdout)
	type usage struct{ Prompt_tokens, Completion_tokens, Total_tokens int }
	var got struct {
		Chat struct {
			ID, Object, Model, Role, Text, Finish string
			Usage                                 usage
		}
		ChatStream struct {
			Text, Role, Finish string
			Chunks             int
			Objects            []string
			Usage              usage
		}
		Completion struct {
			Object, Text, Finish string
			Usage                usage
		}
		CompletionStream struct {
			Text   string
			Chunks int
		}
		BadRequest struct {
			Status              int
			Type, Code, Message string
		}
		Models []string
	}
	if err := json.Unmarshal(stdout, &got); err != nil {
		t.Fatal(err)
	}

	// What /v1/generate answers for the same prompts, greedily.
	// A bytes model's chat layout: "ROLE: CONTENT\n" per message, then the reply's role.
	prompt := "system: You are a mesh.\nuser: Say hello.\nassistant: "
	var chatWant, compWant GenerateResponse
	postJSON(t, tm.requester, "/v1/generate", map[string]any{"model": model, "prompt": prompt, "max_tokens": 12}, &chatWant)
	postJSON(t, tm.requester, "/v1/generate", map[string]any{"model": model, "prompt": "the mesh", "max_tokens": 10}, &compWant)

	wantUsage := usage{len(prompt), 12, len(prompt) + 12}
	c := got.Chat
	if c.Text == "" || c.Text != chatWant.Text || c.Finish != "length" || c.Usage != wantUsage || c.Object != "chat.completion" ||
		c.Role != "assistant" || c.Model != model || !strings.HasPrefix(c.ID, "chatcmpl-") {
		t.Errorf("chat: %+v; want text %q, usage %+v", c, chatWant.Text, wantUsage)
	}
	cs := got.ChatStream
	if cs.Text != chatWant.Text || cs.Role != "assistant" || cs.Finish != "length" || cs.Usage != wantUsage || cs.Chunks < 5 ||
		!slices.Equal(cs.Objects, []string{"chat.completion.chunk"}) {
		t.Errorf("streamed chat: %+v; want text %q, usage %+v", cs, chatWant.Text, wantUsage)
	}
	cp := got.Completion
	if cp.Text == "" || cp.Text != compWant.Text || cp.Finish != "length" || cp.Object != "text_completion" ||
		cp.Usage != (usage{8, 10, 18}) {
		t.Errorf("completion: %+v; want text %q", cp, compWant.Text)
	}
	if got.CompletionStream.Text != compWant.Text || got.CompletionStream.Chunks < 3 {
		t.Errorf("streamed completion: %+v; want text %q", got.CompletionStream, compWant.Text)
	}
	if b := got.BadRequest; b.Status != 400 || b.Type != "invalid_request_error" || b.Code != "bad_request" || b.Message == "" {
		t.Errorf("n=2: %+v", b)
	}
	if !slices.Equal(got.Models, []string{model}) {
		t.Errorf("models: %v, want [%s]", got.Models, model)
	}
}

// goneWriter is a client that goes away after some writes: the request's
// context is cancelled and writes fail.
type goneWriter struct {
	*httptest.ResponseRecorder
	after, writes, late int
	cancel              context.CancelFunc
}

func (g *goneWriter) Write(b []byte) (int, error) {
	if g.writes++; g.writes > g.after {
		g.late++
		return 0, errors.New("client gone")
	}
	if g.writes == g.after {
		g.cancel()
	}
	return g.ResponseRecorder.Write(b)
}

// A client that goes away mid-stream ends the generation (no more writes);
// a failure after the stream started is an error event.
func TestGenerateStreamClientGoneAndErrorEvent(t *testing.T) {
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	for _, path := range []string{"/v1/generate", "/v1/completions", "/v1/chat/completions"} {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		body := fmt.Sprintf(`{"model": %q, "prompt": "the mesh", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": true}`, model)
		if path == "/v1/generate" {
			body = fmt.Sprintf(`{"model": %q, "prompt": "the mesh", "max_tokens": 100, "stream": true}`, model)
		}
		w := &goneWriter{ResponseRecorder: httptest.NewRecorder(), after: 3, cancel: cancel}
		r := httptest.NewRequestWithContext(ctx, "POST", path, strings.NewReader(body))
		start := time.Now()
		switch path {
		case "/v1/generate":
			tm.requester.handleGenerate(w, r)
		case "/v1/completions":
			tm.requester.handleCompletions(w, r)
		default:
			tm.requester.handleChat(w, r)
		}
		if w.late > 1 || w.Code != http.StatusOK {
			t.Fatalf("%s: %d writes after the client went away (status %d): %s", path, w.late, w.Code, w.Body)
		}
		t.Logf("%s: the handler returned %s after the client went away", path, time.Since(start).Round(time.Millisecond))
	}

	// An error after the stream started is an error event.
	rec := httptest.NewRecorder()
	sse := &sseWriter{w: rec}
	if err := sse.event("", map[string]any{"token": 1, "text": "\u0001"}); err != nil {
		t.Fatal(err)
	}
	tm.requester.failText(rec, httptest.NewRequest("POST", "/v1/generate", nil), sse, fmt.Errorf("step 3: %w", mesh.ErrNoRoute))
	lines := strings.Split(strings.TrimSpace(rec.Body.String()), "\n")
	n := len(lines)
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "text/event-stream" || n != 4 || lines[n-2] != "event: error" {
		t.Fatalf("stream that failed: %d %q", rec.Code, lines)
	}
	var e struct {
		Error struct{ Code, Message, Type string } `json:"error"`
	}
	if err := json.Unmarshal([]byte(strings.TrimPrefix(lines[n-1], "data: ")), &e); err != nil || e.Error.Code != "no_route" ||
		e.Error.Type != "server_error" || !strings.Contains(e.Error.Message, "step 3") {
		t.Fatalf("error event %q: %+v %v", lines[n-1], e, err)
	}
}

// inferBody is a /v1/infer request whose inputs are the given JSON members.
func inferBody(model, inputs string) string {
	return `{"model":"` + model + `","inputs":{` + inputs + `}}`
}
