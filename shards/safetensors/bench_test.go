package safetensors

import (
	"fmt"
	"testing"
)

func BenchmarkDecodeFloat32(b *testing.B) {
	for _, dtype := range []string{"F32", "F16", "BF16"} {
		for _, n := range []int{1 << 10, 1 << 20} {
			b.Run(fmt.Sprintf("%s/%d", dtype, n), func(b *testing.B) {
				es, _ := ElemSize(dtype)
				raw := make([]byte, int64(n)*es)
				for i := range raw {
					raw[i] = byte(i * 7)
				}
				b.SetBytes(int64(len(raw)))
				b.ReportAllocs()
				for b.Loop() {
					DecodeFloat32(dtype, raw)
				}
			})
		}
	}
}
