package text

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode"

	"github.com/dlclark/regexp2/v2"
	"golang.org/x/text/unicode/norm"
)

// regexTimeout bounds one regex search; patterns from tokenizer.json are
// linear in practice, so hitting it means a pathological pattern.
const regexTimeout = 10 * time.Second

// normalizer rewrites a text section before pre-tokenization.
type normalizer interface {
	normalize(s string) (string, error)
}

type normalizerSeq []normalizer

func (q normalizerSeq) normalize(s string) (string, error) {
	var err error
	for _, n := range q {
		if s, err = n.normalize(s); err != nil {
			return "", err
		}
	}
	return s, nil
}

type unicodeNorm struct{ form norm.Form }

func (u unicodeNorm) normalize(s string) (string, error) { return u.form.String(s), nil }

type lowercase struct{}

func (lowercase) normalize(s string) (string, error) { return strings.ToLower(s), nil }

type prepend struct{ prefix string }

func (p prepend) normalize(s string) (string, error) {
	if s == "" {
		return s, nil
	}
	return p.prefix + s, nil
}

type strip struct{ left, right bool }

func (p strip) normalize(s string) (string, error) {
	if p.left {
		s = strings.TrimLeftFunc(s, unicode.IsSpace)
	}
	if p.right {
		s = strings.TrimRightFunc(s, unicode.IsSpace)
	}
	return s, nil
}

// replace replaces a string or every match of a regex.
type replace struct {
	pattern pattern
	content string
}

func (r replace) normalize(s string) (string, error) {
	if r.pattern.re == nil {
		return strings.ReplaceAll(s, r.pattern.str, r.content), nil
	}
	ms, err := r.pattern.find(s)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	prev := 0
	for _, m := range ms {
		b.WriteString(s[prev:m[0]])
		b.WriteString(r.content)
		prev = m[1]
	}
	b.WriteString(s[prev:])
	return b.String(), nil
}

// pattern is tokenizer.json's {"String": ...} or {"Regex": ...}.
type pattern struct {
	str string
	re  *regexp2.Regexp
}

func (p *pattern) UnmarshalJSON(data []byte) error {
	var raw struct {
		String *string `json:"String"`
		Regex  *string `json:"Regex"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	switch {
	case raw.String != nil:
		if *raw.String == "" {
			return fmt.Errorf("empty String pattern")
		}
		p.str = *raw.String
	case raw.Regex != nil:
		re, err := regexp2.Compile(*raw.Regex, regexp2.None)
		if err != nil {
			return fmt.Errorf("regex %q: %w", *raw.Regex, err)
		}
		re.MatchTimeout = regexTimeout
		p.re = re
	default:
		return fmt.Errorf("pattern %s is neither String nor Regex", data)
	}
	return nil
}

// find returns the byte ranges of the non-empty, non-overlapping matches
// in s. Only a regex running past regexTimeout fails.
func (p *pattern) find(s string) ([][]int, error) {
	if p.re == nil {
		var out [][]int
		for i := 0; ; {
			j := strings.Index(s[i:], p.str)
			if j < 0 {
				return out, nil
			}
			out = append(out, []int{i + j, i + j + len(p.str)})
			i += j + len(p.str)
		}
	}
	m, err := p.re.FindAllStringIndex(s, -1)
	if err != nil {
		return nil, fmt.Errorf("regex %q: %w", p.re.String(), err)
	}
	var out [][]int
	for _, x := range m {
		if x[1] > x[0] {
			out = append(out, x)
		}
	}
	return out, nil
}

func loadNormalizer(raw json.RawMessage) (normalizer, error) {
	typ, present, err := componentType(raw)
	if !present || err != nil {
		return nil, err
	}
	switch typ {
	case "Sequence":
		q, err := loadSequence(raw, "normalizers", loadNormalizer)
		return normalizerSeq(q), err
	case "NFC":
		return unicodeNorm{norm.NFC}, nil
	case "NFD":
		return unicodeNorm{norm.NFD}, nil
	case "NFKC":
		return unicodeNorm{norm.NFKC}, nil
	case "NFKD":
		return unicodeNorm{norm.NFKD}, nil
	case "Lowercase":
		return lowercase{}, nil
	case "Prepend":
		var c struct {
			Prepend string `json:"prepend"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, err
		}
		return prepend{c.Prepend}, nil
	case "Strip":
		var c struct {
			Left  bool `json:"strip_left"`
			Right bool `json:"strip_right"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, err
		}
		return strip{c.Left, c.Right}, nil
	case "Replace":
		var c struct {
			Pattern pattern `json:"pattern"`
			Content string  `json:"content"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			return nil, fmt.Errorf("normalizer Replace: %w", err)
		}
		return replace{c.Pattern, c.Content}, nil
	}
	return nil, fmt.Errorf("%w: normalizer type %q", ErrUnknownComponent, typ)
}
