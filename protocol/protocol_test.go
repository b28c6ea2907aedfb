package protocol_test

import (
	"encoding/json"
	"math"
	"slices"
	"testing"

	"github.com/infermesh/infermesh/protocol"
)

func TestTensorJSONRoundTrip(t *testing.T) {
	cases := []*protocol.Tensor{
		protocol.NewTensor([]int64{2, 2}, []float32{1.5, -2, 0, 3.25}),
		protocol.NewTensor([]int64{3}, []int64{math.MaxInt64, -1, 7}),
		protocol.NewTensor([]int64{2}, []bool{true, false}),
		protocol.NewTensor([]int64{1, 0}, []float32{}),
		protocol.NewTensor(nil, []float64{math.Pi}),
		{DType: protocol.Float16, Shape: []int64{2}, Data: []byte{0x00, 0x3c, 0x00, 0xc0}}, // 1, -2
	}
	for _, in := range cases {
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatalf("%v: %v", in, err)
		}
		var out protocol.Tensor
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		if out.DType != in.DType || !slices.Equal(out.Shape, in.Shape) && len(in.Shape) != 0 || string(out.Data) != string(in.Data) {
			t.Fatalf("%s round-tripped to %v %x, want %v %x", b, &out, out.Data, in, in.Data)
		}
	}
}

func TestTensorJSONRefuses(t *testing.T) {
	for _, s := range []string{
		`{"dtype":"float32","shape":[2],"data":[1]}`,
		`{"dtype":"float32","shape":[-1],"data":[]}`,
		`{"dtype":"nope","shape":[1],"data":[1]}`,
		`{"dtype":"int8","shape":[1],"data":[300]}`,
		`{"dtype":"float32","shape":[2],"b64":"AAAA"}`,
		`{"dtype":"float32","shape":[1],"data":["x"]}`,
		`{"dtype":"float32","shape":[1073741824,1073741824],"data":[]}`,
	} {
		var out protocol.Tensor
		if err := json.Unmarshal([]byte(s), &out); err == nil {
			t.Errorf("%s: accepted", s)
		}
	}
}

func TestFloat16(t *testing.T) {
	for _, f := range []float32{0, 1, -2, 0.5, 65504, 6.1035156e-05, 5.9604645e-08, 3.140625} {
		if got := protocol.Float16ToFloat32(protocol.Float32ToFloat16(f)); got != f {
			t.Errorf("%g -> %g", f, got)
		}
	}
	if h := protocol.Float32ToFloat16(1e6); h != 0x7c00 {
		t.Errorf("1e6 -> %#x, want +inf", h)
	}
}

func FuzzTensorJSON(f *testing.F) {
	f.Add([]byte(`{"dtype":"float32","shape":[2],"data":[1,2]}`))
	f.Add([]byte(`{"dtype":"int64","shape":[1],"b64":"AQAAAAAAAAA="}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var x protocol.Tensor
		if json.Unmarshal(b, &x) != nil {
			return
		}
		if err := x.Validate(); err != nil {
			t.Fatalf("decoded an invalid tensor: %v", err)
		}
	})
}

func TestMaxAbsDiff(t *testing.T) {
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	a := protocol.NewTensor([]int64{4}, []float32{1, nan, inf, 2})
	b := protocol.NewTensor([]int64{4}, []float32{1.5, nan, inf, 2})
	if d, err := protocol.MaxAbsDiff(a, b); err != nil || d != 0.5 {
		t.Fatalf("diff = %v, %v; want 0.5 (NaNs and equal infinities agree)", d, err)
	}
	c := protocol.NewTensor([]int64{4}, []float32{1, 0, inf, 2})
	if d, _ := protocol.MaxAbsDiff(a, c); !math.IsInf(d, 1) {
		t.Fatalf("NaN against a number: %v, want +Inf", d)
	}
	if _, err := protocol.MaxAbsDiff(a, protocol.NewTensor([]int64{2, 2}, []float32{1, 2, 3, 4})); err == nil {
		t.Fatal("different shapes compared")
	}
	if _, err := protocol.MaxAbsDiff(a, protocol.NewTensor([]int64{4}, []float64{1, 2, 3, 4})); err == nil {
		t.Fatal("different dtypes compared")
	}
}
