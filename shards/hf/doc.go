// Package hf imports Hugging Face causal language model checkpoints
// (config.json, safetensors weights, tokenizer files) as infermesh models:
// one ONNX block for the token embedding, one per decoder layer (or per
// Options.LayersPerBlock layers), and one for the final norm and the
// language-model head, plus the tokenizer, its configuration, the generation
// configuration and the chat template as content-addressed files named in
// the manifest.
//
// Supported architectures are LlamaForCausalLM (Llama 2 and 3.x, TinyLlama,
// SmolLM), MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM. Any
// configuration field that changes the math and is not implemented is
// refused by name rather than approximated.
//
// Files:
//
//   - config.go reads and checks config.json (ReadConfig) and computes the
//     rotary frequencies;
//   - graph.go extends shards/internal/onnxgraph's builder with weights
//     that are references to checkpoint tensors, streamed in later, and
//     the RMSNorm, linear and SiLU layers;
//   - decoder.go emits the embedding, decoder-layer and head graphs;
//   - stream.go writes a block file by streaming its weights from the
//     checkpoint into the block store while hashing them, converting
//     bfloat16, float16 and float32 chunk by chunk (bfloat16 values beyond
//     float16's range are an error naming the tensor);
//   - import.go drives the import (Import) and writes the manifest.
//
// The blocks follow the conventions of the GPT test model of shards/build:
// model inputs input_ids, position_ids and attention_mask (int64), the
// hidden state h{i} (float32 [batch, seq, hidden]) between blocks, per-layer
// KV-cache state pairs past_key_i/present_key_i and
// past_value_i/present_value_i of shape [batch, kv_heads, past, head_dim],
// and float32 logits [batch, seq, vocab].
package hf
