// Package reference runs Hugging Face causal language models in plain
// float64 Go loops: an independent reference for testing the importer
// (shards/hf), which builds ONNX graphs of the same models. It shares no code
// with the importer: it parses config.json itself and reads the weights
// through shards/safetensors.
//
// It implements what transformers' modeling code computes for
// LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and
// Qwen3ForCausalLM at inference, batch 1, no padding:
//
//	h = embed_tokens[ids]
//	per layer:
//	  x = RMSNorm(h) · input_layernorm          RMSNorm(x) = x / sqrt(mean(x²) + eps)
//	  q, k, v = x·Wqᵀ (+bq), x·Wkᵀ (+bk), x·Wvᵀ (+bv)
//	  Qwen3: q, k = RMSNorm per head (over head_dim) · q_norm, k_norm
//	  q, k = RoPE(q, k) at the token's position (rotate_half: the first half
//	         of each head pairs with the second half)
//	  per query head: softmax(q·kᵀ / sqrt(head_dim)) over the cached
//	         positions ≤ its own (and within the sliding window), times v;
//	         KV heads repeated to the query heads (grouped-query attention)
//	  h += o_proj(attn) (+bo)
//	  x = RMSNorm(h) · post_attention_layernorm
//	  h += down(silu(gate(x)) · up(x))
//	logits = RMSNorm(h) · norm, times lm_head (embed_tokens when tied)
//
// RoPE's inverse frequencies are 1/theta^(2i/d); rope_scaling "llama3"
// rescales them as transformers' _compute_llama3_parameters does; other
// rope types are refused. Mistral's sliding_window, and Qwen's when
// use_sliding_window is set (layers from max_window_layers on, or as
// layer_types says), lets a query at position p see keys at positions
// > p - window, as transformers' masks do.
//
// Weights are kept as float32 (exact for F32, F16 and BF16 checkpoints, and
// half the memory of float64); all arithmetic is float64.
//
// Files:
//   - config.go: parsing config.json.
//   - model.go: Load, the weights, RoPE frequencies.
//   - session.go: Session, the forward pass with its KV cache.
package reference
