package build_test

import (
	"math/rand/v2"
	"testing"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

func TestMLPBlocksEqualWhole(t *testing.T) {
	cfg := build.MLPConfig{Layers: 8, Dim: 256, Seed: 3}
	m, err := build.MLP(cfg, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if n := len(m.Manifest.Blocks); n != cfg.Layers {
		t.Fatalf("%d blocks, want %d", n, cfg.Layers)
	}
	rt := openRuntime(t)
	r := rand.New(rand.NewPCG(1, 2))
	in := shards.Tensors{"x": protocol.NewTensor([]int64{2, int64(cfg.Dim)}, randomFloats(r, 2*cfg.Dim))}
	want := run(t, loadWhole(t, rt, m), in)
	requireClose(t, "one span of all blocks", run(t, loadSpan(t, rt, m, 0, cfg.Layers), in), want, 1e-5)
	requireClose(t, "one span per block", chainBlocks(t, rt, m, in), want, 1e-5)

	// The output keeps the input's scale: 8 layers are well conditioned.
	y, _ := want["y"].Float64s()
	biggest := 0.0
	for _, v := range y {
		biggest = max(biggest, v, -v)
	}
	if biggest > 20 || biggest < 0.5 {
		t.Fatalf("output max |y| = %g: activations drifted in scale", biggest)
	}
}
