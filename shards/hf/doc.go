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
// Weights are stored as float32 or float16, or (Options.Quantize) the
// projections, the head and the embedding table quantized to 8 or 4 bits
// per weight with a float32 scale per 32 or 128, run by onnxruntime's
// com.microsoft MatMulNBits and GatherBlockQuantized.
//
// Import reads a Hugging Face folder; ImportFrom reads any Source (the
// weights, by Hugging Face names) with a Config built by hand, which is
// how another format (GGUF) plugs in.
//
// Files:
//
//   - config.go reads and checks config.json (ReadConfig, Config.Check) and
//     computes the rotary frequencies;
//   - source.go defines Source and QuantizedSource, what an import reads
//     weights from, and the safetensors Source;
//   - quant.go is the block quantization: its layout, the quantizers (the
//     scales chosen as llama.cpp's Q8_0 and Q4_0 quantizers do, the 4-bit
//     one with a search), and which tensors get which bits;
//   - graph.go extends shards/internal/onnxgraph's builder with weights
//     that are references to source tensors, streamed in later, and the
//     RMSNorm, linear (Gemm, or MatMulNBits when quantized) and SiLU
//     layers;
//   - decoder.go emits the embedding, decoder-layer and head graphs;
//   - stream.go writes a block file by streaming its weights from the
//     source into the block store while hashing them, converting to
//     float32 or float16, or quantizing, chunk by chunk (values beyond
//     float16's range are an error naming the tensor);
//   - import.go drives the import (Import, ImportFrom) and writes the
//     manifest.
//
// The blocks follow the conventions of the GPT test model of shards/build:
// model inputs input_ids, position_ids and attention_mask (int64), the
// hidden state h{i} (float32 [batch, seq, hidden]) between blocks, per-layer
// KV-cache state pairs past_key_i/present_key_i and
// past_value_i/present_value_i of shape [batch, kv_heads, past, head_dim],
// and float32 logits [batch, seq, vocab].
package hf
