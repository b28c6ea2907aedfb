package build

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/shards"
)

// A layer is what a model definition writes once and the assembler emits
// twice: as a block graph of its own, and inside the whole-model graph. The
// two files therefore cannot drift apart.
type layer struct {
	// scope prefixes the names of the layer's nodes, intermediate tensors
	// and weights ("embed", "layer3", "head"); weights are drawn from it.
	scope string
	// block is the block's spec without CID and size: its graph's inputs
	// and outputs, and its state pairs.
	block shards.BlockSpec
	// emit adds the layer's nodes and weights to g. It reads the tensors
	// named in block.Inputs and writes those in block.Outputs.
	emit func(g *graph)
}

// write builds one ONNX file per layer and one for the whole model, then
// writes the blocked model into dir (manifest.json and blocks/) and the
// whole one as dir/full.onnx. m has everything but Blocks, which write fills
// from layers.
func write(dir string, m *shards.Manifest, seed int64, layers []layer) (*shards.Model, error) {
	m.Format = shards.ManifestFormat
	m.Blocks = make([]shards.BlockSpec, len(layers))
	blocks := make([][]byte, len(layers))
	for i, l := range layers {
		m.Blocks[i] = l.block
		g := newGraph(fmt.Sprintf("%s/block%d", m.Name, i), seed)
		b, err := g.emit(l.block.Inputs, l.block.Outputs, layers[i:i+1])
		if err != nil {
			return nil, fmt.Errorf("build %s block %d: %w", m.Name, i, err)
		}
		blocks[i] = b
	}
	// The whole model's inputs and outputs are exactly those the runtime
	// expects of full.onnx: Manifest.Whole's.
	w := m.Whole(cid.Undef, 0).Blocks[0]
	whole, err := newGraph(m.Name, seed).emit(w.Inputs, w.Outputs, layers)
	if err != nil {
		return nil, fmt.Errorf("build %s: %w", m.Name, err)
	}
	model, err := shards.WriteModel(dir, m, blocks)
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(filepath.Join(dir, shards.WholeFile), whole); err != nil {
		return nil, err
	}
	return model, nil
}

// emit declares the graph's inputs and outputs around the given layers'
// nodes and encodes the model.
func (g *graph) emit(inputs, outputs []shards.TensorSpec, layers []layer) ([]byte, error) {
	for _, t := range inputs {
		g.Input(t)
	}
	for _, l := range layers {
		g.Scope = l.scope
		l.emit(g)
	}
	g.Scope = ""
	for _, t := range outputs {
		g.Output(t)
	}
	return g.Encode(producer)
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
