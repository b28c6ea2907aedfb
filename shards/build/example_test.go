package build_test

import (
	"fmt"
	"log"
	"os"

	"github.com/infermesh/infermesh/shards/build"
)

func ExampleGPT() {
	dir, err := os.MkdirTemp("", "gpt")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	m, err := build.GPT(build.GPTConfig{Layers: 2, Dim: 64, Heads: 4, Seed: 1}, dir)
	if err != nil {
		log.Fatal(err)
	}
	for i, b := range m.Manifest.Blocks {
		fmt.Printf("block %d: %v -> %v, %d state pairs\n", i, names(b.Inputs), names(b.Outputs), len(b.State))
	}
	// Output:
	// block 0: [input_ids position_ids] -> [h0], 0 state pairs
	// block 1: [h0 attention_mask past_key_0 past_value_0] -> [h1 present_key_0 present_value_0], 2 state pairs
	// block 2: [h1 attention_mask past_key_1 past_value_1] -> [h2 present_key_1 present_value_1], 2 state pairs
	// block 3: [h2] -> [logits], 0 state pairs
}

func ExampleMLP() {
	dir, err := os.MkdirTemp("", "mlp")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	m, err := build.MLP(build.MLPConfig{Layers: 3, Dim: 16, Seed: 1}, dir)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(m.Manifest.Name)
	for _, b := range m.Manifest.Blocks {
		fmt.Println(names(b.Inputs), "->", names(b.Outputs), b.Inputs[0].Shape)
	}
	// Output:
	// mlp-l3-d16-seed1
	// [x] -> [h1] [batch 16]
	// [h1] -> [h2] [batch 16]
	// [h2] -> [y] [batch 16]
}
