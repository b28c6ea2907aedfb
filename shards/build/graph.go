package build

import (
	"hash/fnv"
	"math"
	"math/rand/v2"

	"github.com/infermesh/infermesh/protocol"
	"github.com/infermesh/infermesh/shards/internal/onnxgraph"
)

// producer names the tool in every generated file; the IR and opset
// versions are onnxgraph's (IR 8, opset 17).
const producer = "infermesh shard build"

// graph accumulates one ONNX graph. Model code adds nodes and weights to it
// inside a scope (one per layer), so that a layer emitted into its own block
// graph and into the whole-model graph gets the same node, tensor and
// weight names — and, weights being drawn from a generator seeded by seed
// and the weight's name, the same weights.
type graph struct {
	*onnxgraph.Graph
	seed int64
}

func newGraph(name string, seed int64) *graph {
	return &graph{Graph: onnxgraph.New(name), seed: seed}
}

// Shorthands for the onnxgraph helpers model code calls most.
var (
	in        = onnxgraph.In
	attrInt   = onnxgraph.AttrInt
	attrInts  = onnxgraph.AttrInts
	attrFloat = onnxgraph.AttrFloat
	tensor    = onnxgraph.Tensor
)

// dist says how a weight's values are drawn: uniformly with the given mean
// and standard deviation. Uniform rather than normal because it needs no
// transcendental functions, whose last bits may differ between platforms:
// the same seed gives the same bytes, hence the same CIDs, everywhere.
type dist struct {
	mean, std float64
}

// centered draws around zero; around draws around mean.
func centered(std float64) dist     { return dist{std: std} }
func around(mean, std float64) dist { return dist{mean: mean, std: std} }

func (d dist) draw(r *rand.Rand) float32 {
	u := 2*r.Float64() - 1 // exact: uniform on [-1, 1)
	// The explicit conversion rounds the product, so that no platform
	// fuses it with the addition.
	return float32(float64(d.std*math.Sqrt(3)*u) + d.mean)
}

// weight adds a float32 initializer named scope/name with values drawn from
// a PCG generator (math/rand/v2) seeded by the graph's seed and that full
// name, so a weight depends only on the seed and its name, never on the
// order of construction.
func (g *graph) weight(name string, shape []int64, how dist) string {
	full := g.Scope + "/" + name
	h := fnv.New64a()
	h.Write([]byte(full))
	r := rand.New(rand.NewPCG(uint64(g.seed), h.Sum64()))
	v := make([]float32, protocol.NumElements(shape))
	for i := range v {
		v[i] = how.draw(r)
	}
	return g.Initializer(full, protocol.NewTensor(shape, v))
}
