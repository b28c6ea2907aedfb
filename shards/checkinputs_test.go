package shards

import (
	"strings"
	"testing"

	"github.com/infermesh/infermesh/protocol"
)

func TestCheckInputs(t *testing.T) {
	dim := func(v any) Dim {
		if s, ok := v.(string); ok {
			return Dim{Param: s}
		}
		return Dim{Size: int64(v.(int))}
	}
	spec := func(name string, dt protocol.DType, dims ...any) TensorSpec {
		s := TensorSpec{Name: name, DType: dt}
		for _, d := range dims {
			s.Shape = append(s.Shape, dim(d))
		}
		return s
	}
	ints := func(shape ...int64) *protocol.Tensor {
		return protocol.NewTensor(shape, make([]int64, protocol.NumElements(shape)))
	}
	floats := func(shape ...int64) *protocol.Tensor {
		return protocol.NewTensor(shape, make([]float32, protocol.NumElements(shape)))
	}
	man := &Manifest{
		Inputs: []TensorSpec{
			spec("input_ids", protocol.Int64, "batch", "seq"),
			spec("position_ids", protocol.Int64, "batch", "seq"),
			spec("attention_mask", protocol.Int64, "batch", "total"),
			spec("x", protocol.Float32, "?", 4),
		},
		Decoder: &DecoderSpec{InputIDs: "input_ids", PositionIDs: "position_ids", AttentionMask: "attention_mask"},
	}
	for _, tc := range []struct {
		name string
		in   map[string]*protocol.Tensor
		past int64
		want string // "" = accepted; else a piece of the error
	}{
		{"good pass", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 5), "attention_mask": ints(2, 5), "x": floats(7, 4)}, 0, ""},
		{"good step", map[string]*protocol.Tensor{"input_ids": ints(2, 1), "position_ids": ints(2, 1), "attention_mask": ints(2, 6), "x": floats(1, 4)}, 5, ""},
		{"mask one longer", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 5), "attention_mask": ints(2, 6), "x": floats(1, 4)}, 0, `"attention_mask" covers 6 positions, want 5`},
		{"mask misses the past", map[string]*protocol.Tensor{"input_ids": ints(1, 1), "position_ids": ints(1, 1), "attention_mask": ints(1, 1), "x": floats(1, 4)}, 3, "want 4"},
		{"seq disagrees", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 4), "attention_mask": ints(2, 5), "x": floats(1, 4)}, 0, `dimension "seq" disagrees`},
		{"batch disagrees", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 5), "attention_mask": ints(3, 5), "x": floats(1, 4)}, 0, `dimension "batch" disagrees`},
		{"fixed size", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 5), "attention_mask": ints(2, 5), "x": floats(1, 3)}, 0, "want dimension 1 = 4"},
		{"dtype", map[string]*protocol.Tensor{"input_ids": floats(2, 5), "position_ids": ints(2, 5), "attention_mask": ints(2, 5), "x": floats(1, 4)}, 0, `tensor "input_ids"`},
		{"rank", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 5, 1), "attention_mask": ints(2, 5), "x": floats(1, 4)}, 0, `tensor "position_ids"`},
		{"missing", map[string]*protocol.Tensor{"input_ids": ints(2, 5), "position_ids": ints(2, 5), "x": floats(1, 4)}, 0, `missing tensor "attention_mask"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := man.CheckStep(tc.in, tc.past)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && err == nil:
				t.Fatalf("accepted, want an error with %q", tc.want)
			case tc.want != "" && !strings.Contains(err.Error(), tc.want):
				t.Fatalf("error %q, want one with %q", err, tc.want)
			}
		})
	}
	// Symbolic dimensions agree without a decoder too.
	plain := &Manifest{Inputs: man.Inputs[:2]}
	if err := CheckInputs(plain.Inputs, map[string]*protocol.Tensor{"input_ids": ints(1, 2), "position_ids": ints(1, 3)}); err == nil {
		t.Fatal("seq 2 and 3 accepted")
	}
	if err := plain.CheckStep(map[string]*protocol.Tensor{"input_ids": ints(1, 2), "position_ids": ints(1, 2)}, 0); err != nil {
		t.Fatal(err)
	}
}
