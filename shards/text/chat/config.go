package chat

import (
	"encoding/json"
	"errors"
	"fmt"
)

// ErrNoTemplate is returned (wrapped) by FromConfig when neither the
// tokenizer config nor a chat_template.jinja file holds a chat template, as
// for base models such as Llama 2.
var ErrNoTemplate = errors.New("no chat template")

// FromConfig reads the template from tokenizer_config.json bytes:
// "chat_template" may be a string or a list of {"name", "template"} objects,
// of which the one named "default" is used. chatTemplateJinja (may be nil)
// is the content of a separate chat_template.jinja file, which wins when
// present. It returns ErrNoTemplate (wrapped) when there is none.
func FromConfig(tokenizerConfigJSON, chatTemplateJinja []byte) (*Template, error) {
	if len(chatTemplateJinja) > 0 {
		return Parse(string(chatTemplateJinja))
	}
	var cfg struct {
		ChatTemplate json.RawMessage `json:"chat_template"`
	}
	if err := json.Unmarshal(tokenizerConfigJSON, &cfg); err != nil {
		return nil, fmt.Errorf("tokenizer_config.json: %w", err)
	}
	raw := cfg.ChatTemplate
	if len(raw) == 0 || string(raw) == "null" {
		return nil, fmt.Errorf("tokenizer_config.json: %w", ErrNoTemplate)
	}
	var src string
	if err := json.Unmarshal(raw, &src); err == nil {
		if src == "" {
			return nil, fmt.Errorf("tokenizer_config.json: empty chat_template: %w", ErrNoTemplate)
		}
		return Parse(src)
	}
	var named []struct {
		Name     string `json:"name"`
		Template string `json:"template"`
	}
	if err := json.Unmarshal(raw, &named); err != nil {
		return nil, fmt.Errorf("tokenizer_config.json: chat_template is neither a string nor a list of named templates: %w", err)
	}
	for _, n := range named {
		if n.Name == "default" {
			return Parse(n.Template)
		}
	}
	return nil, fmt.Errorf("tokenizer_config.json: chat_template lists %d templates, none named \"default\": %w", len(named), ErrNoTemplate)
}

// BOSEOS reads bos_token and eos_token from tokenizer_config.json bytes.
// Each may be a string, an object whose "content" is the token (an
// AddedToken), or null; a missing, null or unreadable token is "".
func BOSEOS(tokenizerConfigJSON []byte) (bos, eos string) {
	var cfg struct {
		BOS json.RawMessage `json:"bos_token"`
		EOS json.RawMessage `json:"eos_token"`
	}
	if json.Unmarshal(tokenizerConfigJSON, &cfg) != nil {
		return "", ""
	}
	return tokenString(cfg.BOS), tokenString(cfg.EOS)
}

// tokenString reads a special token written as a string or as an object
// with "content".
func tokenString(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var obj struct {
		Content string `json:"content"`
	}
	if json.Unmarshal(raw, &obj) == nil {
		return obj.Content
	}
	return ""
}
