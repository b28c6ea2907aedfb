package node

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/hf"
	"github.com/infermesh/infermesh/shards/hf/checkpoint"
	"github.com/infermesh/infermesh/shards/text"
	"github.com/infermesh/infermesh/shards/text/texttest"
)

// importLlama writes a random-weight checkpoint of the Llama architecture
// with the real Llama 3 tokenizer (so its vocabulary: 128256 tokens),
// imports it and returns the model.
func importLlama(t testing.TB, layers int) *shards.Model {
	t.Helper()
	tokJSON, tokCfg := texttest.Files(t, "llama3")
	src := filepath.Join(t.TempDir(), "Llama-tiny")
	cfg := checkpoint.Tiny("LlamaForCausalLM")
	cfg.Layers, cfg.Vocab, cfg.DType = layers, 128256, "bfloat16"
	cfg.BOS, cfg.EOS, cfg.ExtraEOS = 128000, 128001, []int64{128009}
	if err := checkpoint.Write(src, cfg, tokJSON, tokCfg); err != nil {
		t.Fatal(err)
	}
	m, err := hf.Import(src, filepath.Join(t.TempDir(), "model"), hf.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

const realChatScript = `
import OpenAI from %q;
import { TokenizerLoader } from %q;
import { readFileSync } from "node:fs";
const [base, model, tokJSON, tokCfg] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base, apiKey: "none", maxRetries: 0 });
const messages = [
  { role: "system", content: "You are a helpful assistant on a peer-to-peer mesh." },
  { role: "user", content: "Héllo! What is 2+2? Answer in 日本語 too 🙂" },
];
const tok = TokenizerLoader.fromPreTrained({
  tokenizerJSON: JSON.parse(readFileSync(tokJSON, "utf8")),
  tokenizerConfig: JSON.parse(readFileSync(tokCfg, "utf8")),
});
const out = { reference: Array.from(tok.apply_chat_template(messages, { tokenize: true, add_generation_prompt: true, return_tensor: false })) };

const chat = await client.chat.completions.create({ model, messages, max_tokens: 20, temperature: 0 });
out.chat = { text: chat.choices[0].message.content, finish: chat.choices[0].finish_reason, usage: chat.usage };

const stream = await client.chat.completions.create({ model, messages, max_tokens: 20, temperature: 0,
  stream: true, stream_options: { include_usage: true } });
const s = { text: "", chunks: 0, finish: null, usage: null };
for await (const chunk of stream) {
  s.chunks++;
  if (chunk.usage) s.usage = chunk.usage;
  for (const c of chunk.choices) {
    if (c.delta.content) s.text += c.delta.content;
    if (c.finish_reason) s.finish = c.finish_reason;
  }
}
out.stream = s;
console.log(JSON.stringify(out));
`

// Acceptance 3 of issue 11: an imported Llama-architecture checkpoint with
// the real Llama 3 tokenizer, split over 3 nodes, answers the official
// openai npm client's chat completion, streamed and not, with exactly the
// tokens of a local greedy run from the reference tokenizer's prompt, and
// usage equal to the reference's counts.
func TestImportedLlamaChatThroughMesh(t *testing.T) {
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node is not installed: this test runs the official openai npm package with it")
	}
	modules := npmInstall(t, "npm-openai-lenml", "openai@4", "@lenml/tokenizers@3.7.2")
	m := importLlama(t, 4) // 6 blocks: embed, 4 layers, head
	tm := startMeshOf(t, m, "0-1", "2-3", "4-5")

	dir := t.TempDir()
	script := filepath.Join(dir, "chat.mjs")
	if err := os.WriteFile(script, fmt.Appendf(nil, realChatScript,
		"file://"+filepath.Join(modules, "openai", "index.mjs"),
		"file://"+filepath.Join(modules, "@lenml", "tokenizers", "dist", "main.mjs")), 0o644); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, name := range []string{"tokenizer.json", "tokenizer_config.json"} {
		b, err := m.File(name)
		if err != nil {
			t.Fatal(err)
		}
		files[name] = filepath.Join(dir, name)
		if err := os.WriteFile(files[name], b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("node", script, "http://"+tm.requester.APIAddr()+"/v1", m.ID.String(), files["tokenizer.json"], files["tokenizer_config.json"])
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("openai client: %v\n%s\n%s", err, stdout, stderr.String())
	}
	type usage struct{ Prompt_tokens, Completion_tokens, Total_tokens int }
	var got struct {
		Reference []int64
		Chat      struct {
			Text, Finish string
			Usage        usage
		}
		Stream struct {
			Text, Finish string
			Chunks       int
			Usage        usage
		}
	}
	if err := json.Unmarshal(stdout, &got); err != nil {
		t.Fatalf("%v: %s", err, stdout)
	}
	t.Logf("reference prompt: %d tokens; chat: %+v", len(got.Reference), got.Chat)

	// The local greedy run, from the reference tokenizer's prompt, stops at
	// the model's eos tokens as the mesh does.
	want, finish := localGenerateUntil(t, m, got.Reference, 20)
	tokJSON, _ := os.ReadFile(files["tokenizer.json"])
	tokCfg, _ := os.ReadFile(files["tokenizer_config.json"])
	tok, err := text.Load(tokJSON, tokCfg)
	if err != nil {
		t.Fatal(err)
	}
	wantText, err := tok.Decode(want, true)
	if err != nil {
		t.Fatal(err)
	}
	wantUsage := usage{len(got.Reference), len(want), len(got.Reference) + len(want)}
	if finish == "stop" { // the eos token counts as generated
		wantUsage.Completion_tokens++
		wantUsage.Total_tokens++
	}
	if got.Chat.Text != wantText || got.Chat.Finish != finish || got.Chat.Usage != wantUsage {
		t.Errorf("chat: %q, %s, %+v; want %q, %s, %+v (tokens %v)", got.Chat.Text, got.Chat.Finish, got.Chat.Usage, wantText, finish, wantUsage, want)
	}
	if got.Stream.Text != wantText || got.Stream.Finish != finish || got.Stream.Usage != wantUsage || got.Stream.Chunks < 3 {
		t.Errorf("streamed chat: %+v; want %q, %s, %+v", got.Stream, wantText, finish, wantUsage)
	}

	// The API's own tokenizer agrees with the reference on the prompt.
	var tr TokenizeResponse
	postJSON(t, tm.requester, "/v1/tokenize", map[string]any{"model": m.ID.String(), "messages": []map[string]string{
		{"role": "system", "content": "You are a helpful assistant on a peer-to-peer mesh."},
		{"role": "user", "content": "Héllo! What is 2+2? Answer in 日本語 too 🙂"}}}, &tr)
	if !slices.Equal(tr.Tokens, got.Reference) {
		t.Errorf("/v1/tokenize of the chat: %v\nreference: %v", tr.Tokens, got.Reference)
	}
	var dr DetokenizeResponse
	postJSON(t, tm.requester, "/v1/detokenize", map[string]any{"model": m.ID.String(), "tokens": want}, &dr)
	if dr.Content != wantText {
		t.Errorf("/v1/detokenize: %q, want %q", dr.Content, wantText)
	}
}

// localGenerateUntil decodes greedily through the blocks in this process,
// up to n tokens or an eos token (left out), and says how it ended.
func localGenerateUntil(t *testing.T, m *shards.Model, prompt []int64, n int) ([]int64, string) {
	t.Helper()
	return localGenerateWith(t, m, prompt, n, shards.Sampling{})
}

// localGenerateWith is localGenerateUntil with a sampler.
func localGenerateWith(t *testing.T, m *shards.Model, prompt []int64, n int, s shards.Sampling) ([]int64, string) {
	t.Helper()
	sess := localSpan(t, m).NewSession()
	defer sess.Close()
	dec, err := shards.NewDecoder(m.Manifest.Decoder, sess, prompt, s)
	if err != nil {
		t.Fatal(err)
	}
	var out []int64
	for range n {
		tok, err := dec.Next()
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(m.Manifest.Decoder.EOS, tok) {
			return out, "stop"
		}
		out = append(out, tok)
	}
	return out, "length"
}

// A chat template that refuses a conversation answers 400 with the
// template's own message; /v1/models describes an imported model;
// /v1/tokenize speaks its tokenizer.
func TestImportedModelAPI(t *testing.T) {
	tokJSON, tokCfg := texttest.Files(t, "llama3")
	var cfgMap map[string]any
	if err := json.Unmarshal(tokCfg, &cfgMap); err != nil {
		t.Fatal(err)
	}
	cfgMap["chat_template"] = `{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}` +
		`{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}` +
		`{{ bos_token + '[' + m['role'] + '] ' + m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}`
	tokCfg, _ = json.Marshal(cfgMap)
	src := filepath.Join(t.TempDir(), "Strict-tiny")
	cfg := checkpoint.Tiny("LlamaForCausalLM")
	cfg.Vocab, cfg.BOS, cfg.EOS, cfg.ExtraEOS = 128256, 128000, 128001, nil
	if err := checkpoint.Write(src, cfg, tokJSON, tokCfg); err != nil {
		t.Fatal(err)
	}
	m, err := hf.Import(src, filepath.Join(t.TempDir(), "model"), hf.Options{})
	if err != nil {
		t.Fatal(err)
	}
	tm := startMeshOf(t, m, fmt.Sprintf("0-%d", len(m.Manifest.Blocks)-1))
	model := m.ID.String()

	resp := post(t, tm.requester, "/v1/chat/completions", map[string]any{"model": model, "max_tokens": 4,
		"messages": []map[string]string{{"role": "user", "content": "a"}, {"role": "user", "content": "b"}}})
	var e struct {
		Error struct{ Code, Message string }
	}
	json.NewDecoder(resp.Body).Decode(&e)
	if resp.StatusCode != http.StatusBadRequest || e.Error.Code != "template_refused" ||
		!strings.Contains(e.Error.Message, "Conversation roles must alternate") {
		t.Fatalf("refused conversation: %s %+v", resp.Status, e)
	}
	var ok Completion
	postJSON(t, tm.requester, "/v1/chat/completions", map[string]any{"model": model, "max_tokens": 4, "temperature": 0,
		"messages": []map[string]string{{"role": "user", "content": "a"}}}, &ok)
	var tr TokenizeResponse
	postJSON(t, tm.requester, "/v1/tokenize", map[string]any{"model": model,
		"messages": []map[string]string{{"role": "user", "content": "a"}}}, &tr)
	if ok.Usage == nil || ok.Usage.PromptTokens != len(tr.Tokens) || tr.Tokens[0] != 128000 {
		t.Fatalf("chat usage %+v; the rendered prompt has tokens %v", ok.Usage, tr.Tokens)
	}

	postJSON(t, tm.requester, "/v1/tokenize", map[string]any{"model": model, "content": "Hello world", "with_pieces": true}, &tr)
	if !slices.Equal(tr.Pieces, []string{"Hello", " world"}) {
		t.Fatalf("tokenize: %+v", tr)
	}
	resp = post(t, tm.requester, "/v1/detokenize", map[string]any{"model": model, "tokens": []int64{1, 128256}})
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("detokenize of a token outside the vocabulary: %s", resp.Status)
	}

	var models struct{ Data []OpenAIModel }
	r, err := http.Get("http://" + tm.requester.APIAddr() + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	if err := json.NewDecoder(r.Body).Decode(&models); err != nil {
		t.Fatal(err)
	}
	var found *MeshModel
	for _, md := range models.Data {
		if md.ID == model {
			found = md.Mesh
		}
	}
	if found == nil || found.Architecture != "LlamaForCausalLM" || found.DType != "float32" || found.Parameters <= 0 ||
		found.ContextLength != cfg.MaxPositions || found.Tokenizer != "hf" || !found.Text {
		t.Fatalf("/v1/models entry: %+v", found)
	}
}
