// Package vocab turns a GGUF file's tokenizer metadata (the
// tokenizer.ggml.* keys and tokenizer.chat_template, gathered in a [Vocab]
// by whoever reads the file) into the Hugging Face tokenizer.json and
// tokenizer_config.json that shards/text loads, so that an imported GGUF
// model tokenizes as llama.cpp tokenizes it. It reads no file itself.
//
// [Convert] supports two tokenizer models:
//
//   - "gpt2", byte-level BPE (Llama 3, Qwen2, Qwen3, GPT-2, SmolLM): a
//     BPE model with the file's vocabulary and merges; the split regexes
//     that tokenizer.ggml.pre names, as Split pre-tokenizers (behavior
//     Isolated, one after the other, as llama.cpp applies its list), then
//     the ByteLevel mapping; a ByteLevel decoder. The supported names are
//     those [Supported] lists: "llama-bpe" (and its aliases "llama3",
//     "llama-v3": Llama 3's regex, whole-token words not merged, BOS added
//     by default), "qwen2" (Qwen2's and Qwen3's regex after an NFC
//     normalizer, as their tokenizer.json has), "gpt-2", "smollm",
//     "starcoder" (digits split first) and "default" (llama.cpp's fallback
//     regex list, also taken when the key is absent). Any other name is
//     refused: the regexes differ per family and a wrong one tokenizes
//     wrongly without failing.
//   - "llama", SentencePiece BPE with byte fallback (Llama 2, Mistral v0.1,
//     TinyLlama): laid out as Llama 2's own tokenizer.json (normalizer
//     Prepend ▁ when add_space_prefix holds, then Replace " " with ▁; BPE
//     with byte_fallback and fuse_unk; decoder Replace ▁, ByteFallback,
//     Fuse, Strip). GGUF keeps SentencePiece scores rather than merges;
//     merges are derived from them as Hugging Face's converters do: each
//     split of a normal token into two tokens, ranked by the token's score
//     (ties in id order), which is the order SentencePiece merges in.
//
// Other models ("bert", "t5", "rwkv", ...) are refused by name
// ([ErrUnsupported]); inconsistent metadata is refused as [ErrMalformed].
//
// Token types map as the GGUF converter wrote them: control and unknown
// tokens become special added tokens, user-defined ones non-special added
// tokens (both matched whole, before the model, as llama.cpp does), all
// tokens are in the BPE vocabulary under their GGUF ids. Absent keys take
// llama.cpp's defaults (see [Vocab]). tokenizer_config.json gets
// bos/eos/unk/pad tokens, add_bos_token, add_eos_token,
// clean_up_tokenization_spaces as llama.cpp sets it per pre-tokenizer, and
// the chat template(s).
//
// What a GGUF file cannot carry is not recovered: the converter marks as
// control the added tokens that look special ("<|fim_prefix|>" in Qwen3,
// not special in its tokenizer.json), so decoding with special tokens
// skipped drops them; a model's own post-processor is replaced by what
// add_bos_token and add_eos_token say.
//
// Files:
//
//   - vocab.go: Vocab, Convert, Supported, the checks;
//   - gpt2.go: the byte-level BPE conversion and the pre-tokenizer table;
//   - llama.go: the SentencePiece conversion and the merges from scores;
//   - json.go: the tokenizer.json and tokenizer_config.json writers.
package vocab
