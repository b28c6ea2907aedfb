package build

import (
	"errors"
	"fmt"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards"
)

// MLPConfig sizes a residual MLP chain. Zero fields take the defaults.
type MLPConfig struct {
	// Layers is the number of blocks, one hidden layer each; 0 means 4.
	Layers int
	// Dim is the width of the input, every hidden layer and the output;
	// 0 means 256.
	Dim int
	// Seed draws the weights: the same config and seed give byte-identical
	// files.
	Seed int64
}

func (c MLPConfig) withDefaults() (MLPConfig, error) {
	if c.Layers == 0 {
		c.Layers = 4
	}
	if c.Dim == 0 {
		c.Dim = 256
	}
	if c.Layers < 0 || c.Dim < 0 {
		return c, errors.New("mlp: layers and dim must be positive")
	}
	return c, nil
}

// MLP writes a residual MLP into dir: model input x float32 [batch, dim],
// output y of the same shape, and Layers blocks each computing
//
//	h' = h + tanh(LayerNorm(h)·W + b)
//
// It also writes the same model unsplit as dir/full.onnx.
func MLP(cfg MLPConfig, dir string) (*shards.Model, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	hidden := func(i int) shards.TensorSpec {
		name := fmt.Sprintf("h%d", i)
		switch i {
		case 0:
			name = "x"
		case c.Layers:
			name = "y"
		}
		return tensor(name, protocol.Float32, "batch", c.Dim)
	}
	layers := make([]layer, c.Layers)
	for i := range layers {
		x, y := hidden(i), hidden(i+1)
		layers[i] = layer{
			scope: fmt.Sprintf("layer%d", i),
			block: shards.BlockSpec{Inputs: []shards.TensorSpec{x}, Outputs: []shards.TensorSpec{y}},
			emit: func(g *graph) {
				a := g.Op("Tanh", in(g.linear("fc", g.layerNorm("ln", x.Name, c.Dim), c.Dim, c.Dim, 1)))
				g.OpTo(y.Name, "Add", in(x.Name, a))
			},
		}
	}
	m := &shards.Manifest{
		Name:    fmt.Sprintf("mlp-l%d-d%d-seed%d", c.Layers, c.Dim, c.Seed),
		Kind:    "mlp",
		Inputs:  []shards.TensorSpec{hidden(0)},
		Outputs: []shards.TensorSpec{hidden(c.Layers)},
	}
	return write(dir, m, c.Seed, layers)
}
