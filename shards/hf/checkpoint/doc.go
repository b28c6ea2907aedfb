// Package checkpoint writes random-weight Hugging Face checkpoints in true
// Hugging Face layout, for tests, benchmarks and demos of the importer: no
// real weights are reachable from the machines infermesh is built on.
//
// Write lays a model folder out as transformers' save_pretrained does for
// LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and
// Qwen3ForCausalLM: config.json (sorted keys, the fields each architecture's
// configuration class writes), generation_config.json, the tokenizer files
// when given, and the weights as model.safetensors or as
// model-0000i-of-0000n.safetensors shards with model.safetensors.index.json.
// Tensor names and layouts are transformers' ([out_features, in_features]
// for every projection); within a file tensors are sorted by name, as the
// safetensors library writes them, with {"format": "pt"} metadata.
//
// Weights are seeded Gaussians, each tensor drawn from its own stream (the
// seed and the tensor's name), so the bytes depend only on the config and
// the seed, not on sharding. Scales keep a random model's logits spread by a
// few units, so greedy decoding is not decided by float rounding:
// embeddings std 1, projections std 1/sqrt(fan_in), an untied lm_head std
// 3/sqrt(hidden), norm weights 1 ± 0.1, biases std 0.1. Tensors are
// generated while they are written: memory stays bounded by a small buffer
// whatever the model's size (Llama32_1B's checkpoint is 2.5 GB).
//
// Files:
//   - config.go: Config, its presets (Tiny, Llama32_1B) and config.json.
//   - write.go: Write, the tensor list, sharding and the weight streams.
package checkpoint
