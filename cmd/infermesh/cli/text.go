package cli

import (
	"fmt"
	"strings"
	"unicode"
)

// printableText shows generated text, escaping the control characters a
// random model emits that a terminal would act on.
func printableText(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r == '\n' || r == '\t' || !unicode.IsControl(r) {
			b.WriteRune(r)
		} else {
			fmt.Fprintf(&b, "\\x%02x", r)
		}
	}
	return b.String()
}
