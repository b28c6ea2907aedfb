// Package chat renders Hugging Face chat templates (Jinja) into the prompt a
// model was trained on: the template named by a model's
// tokenizer_config.json ("chat_template", a string or a list of named
// templates) or by a separate chat_template.jinja file.
//
// Templates run on github.com/ardanlabs/jinja with the settings
// transformers uses (trim_blocks, lstrip_blocks, no autoescape). Messages
// reach the template as ordered dicts with keys "role" then "content", so
// iteration and tojson keep that order as Python does. A template's
// raise_exception(msg) becomes a *TemplateError carrying msg.
//
// Files: chat.go holds the API (Parse, Render, Options, errors); config.go
// reads tokenizer_config.json.
package chat

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/ardanlabs/jinja"
)

// Message is one turn of a conversation.
type Message struct {
	Role    string // "system", "user", "assistant", "tool" or any other role the template knows
	Content string
}

// Template is a compiled chat template. It is safe for concurrent use.
type Template struct {
	src  string
	tmpl *jinja.Template
}

// Parse compiles a Jinja chat template.
func Parse(src string) (*Template, error) {
	tmpl, err := jinja.Compile(src)
	if err != nil {
		return nil, fmt.Errorf("chat template: %w", err)
	}
	return &Template{src: src, tmpl: tmpl}, nil
}

// Source returns the template text.
func (t *Template) Source() string { return t.src }

// Options are the variables a template sees besides messages.
type Options struct {
	// AddGenerationPrompt sets add_generation_prompt: end the prompt with
	// the header of an assistant turn for the model to complete.
	AddGenerationPrompt bool
	// BOS and EOS set bos_token and eos_token; empty leaves them undefined,
	// as transformers does for a token the tokenizer does not have.
	BOS, EOS string
	// Extra holds other variables (e.g. enable_thinking, tools). A
	// jinja.Value is passed as is; other values are converted with
	// jinja.FromGoValue, which sorts map keys: pass a jinja.Value built
	// with jinja.NewDict and Dict.Set where key order matters (tojson).
	// Extra cannot replace messages, add_generation_prompt, bos_token,
	// eos_token or raise_exception.
	Extra map[string]any
}

// TemplateError is a template's refusal to render a conversation, raised
// with raise_exception(Message), e.g. "Conversation roles must alternate
// user/assistant/user/assistant/...". Message is the template's own text,
// fit to show the client that sent the conversation.
type TemplateError struct {
	Message string
}

func (e *TemplateError) Error() string { return "chat template: " + e.Message }

// Render renders the conversation. A template's raise_exception(msg)
// returns a *TemplateError whose Message is msg; other render failures
// (a type error, an unknown filter) are returned as other errors.
func (t *Template) Render(msgs []Message, opts Options) (string, error) {
	data := make(map[string]jinja.Value, len(opts.Extra)+5)
	for _, k := range slices.Sorted(maps.Keys(opts.Extra)) {
		v := opts.Extra[k]
		if jv, ok := v.(jinja.Value); ok {
			data[k] = jv
		} else {
			data[k] = jinja.FromGoValue(v)
		}
	}
	data["messages"] = messagesValue(msgs)
	data["add_generation_prompt"] = jinja.NewBool(opts.AddGenerationPrompt)
	if opts.BOS != "" {
		data["bos_token"] = jinja.NewString(opts.BOS)
	} else {
		delete(data, "bos_token")
	}
	if opts.EOS != "" {
		data["eos_token"] = jinja.NewString(opts.EOS)
	} else {
		delete(data, "eos_token")
	}
	data["raise_exception"] = raiseException
	out, err := t.tmpl.RenderValues(data)
	if err != nil {
		var te *TemplateError
		if errors.As(err, &te) {
			return "", te
		}
		return "", fmt.Errorf("chat template: render: %w", err)
	}
	return out, nil
}

// messagesValue converts msgs to the list a template iterates over: one dict per
// message with keys "role" then "content", in that order.
func messagesValue(msgs []Message) jinja.Value {
	items := make([]jinja.Value, len(msgs))
	for i, m := range msgs {
		d := jinja.NewDict()
		d.AsDict().Set("role", jinja.NewString(m.Role))
		d.AsDict().Set("content", jinja.NewString(m.Content))
		items[i] = d
	}
	return jinja.NewList(items)
}

// raiseException replaces the library's raise_exception, whose error is a
// plain string, with one that returns a *TemplateError.
var raiseException = jinja.NewCallable("raise_exception", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	msg := "raise_exception called without a message"
	if len(args) > 0 {
		if args[0].IsString() {
			msg = args[0].AsString()
		} else {
			msg = args[0].String()
		}
	}
	return jinja.Undefined(), &TemplateError{Message: msg}
})
