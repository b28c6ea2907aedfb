package text

import (
	"strings"
	"testing"

	"github.com/infermesh/infermesh/shards/text/texttest"
)

// benchText is about 64 KiB of mixed prose, code and numbers.
var benchText = func() string {
	var b strings.Builder
	strs := corpus()
	for i := 0; b.Len() < 64<<10; i++ {
		b.WriteString(strs[i%len(strs)])
		b.WriteString("\n")
	}
	return b.String()
}()

// BenchmarkEncode measures encoding throughput on each real tokenizer, with
// the word cache warm (steady state) and cold (every call on fresh text).
func BenchmarkEncode(b *testing.B) {
	for _, m := range texttest.Models {
		tj, cj := texttest.Files(b, m)
		tok, err := Load(tj, cj)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(m, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(benchText)))
			for b.Loop() {
				if _, err := tok.Encode(benchText, false); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(m+"/nocache", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(benchText)))
			for b.Loop() {
				tok.model.mu.Lock()
				clear(tok.model.cache)
				tok.model.mu.Unlock()
				if _, err := tok.Encode(benchText, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDecode measures decoding throughput in bytes of text produced.
func BenchmarkDecode(b *testing.B) {
	for _, m := range texttest.Models {
		tj, cj := texttest.Files(b, m)
		tok, err := Load(tj, cj)
		if err != nil {
			b.Fatal(err)
		}
		ids, err := tok.Encode(benchText, false)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(m, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(benchText)))
			for b.Loop() {
				if _, err := tok.Decode(ids, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkLoad measures parsing tokenizer.json.
func BenchmarkLoad(b *testing.B) {
	for _, m := range texttest.Models {
		tj, cj := texttest.Files(b, m)
		b.Run(m, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Load(tj, cj); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkStream measures streaming decode, one Add per token.
func BenchmarkStream(b *testing.B) {
	for _, m := range texttest.Models {
		tj, cj := texttest.Files(b, m)
		tok, err := Load(tj, cj)
		if err != nil {
			b.Fatal(err)
		}
		ids, err := tok.Encode(benchText, false)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(m, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(benchText)))
			for b.Loop() {
				st := tok.NewStream(false)
				for _, id := range ids {
					if _, err := st.Add(id); err != nil {
						b.Fatal(err)
					}
				}
				st.Flush()
			}
		})
	}
}
