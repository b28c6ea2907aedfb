package gguf

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/infermesh/infermesh/shards/internal/testmodels"
)

// referencePackage is the independent GGUF reader the files are checked
// against.
const referencePackage = "@huggingface/gguf@0.4.6"

// referenceTimeout bounds one node run.
const referenceTimeout = 2 * time.Minute

// refFile is what testdata/reference.js prints for one file.
type refFile struct {
	Version    uint32 `json:"version"`
	DataOffset string `json:"dataOffset"`
	Metadata   map[string]struct {
		Type    ValueType  `json:"type"`
		SubType *ValueType `json:"subType"`
		Value   any        `json:"value"`
	} `json:"metadata"`
	Tensors []struct {
		Name   string   `json:"name"`
		Shape  []string `json:"shape"`
		DType  Type     `json:"dtype"`
		Offset string   `json:"offset"`
	} `json:"tensors"`
}

// jsonValue converts a metadata value to what reference.js prints for it:
// 64-bit integers as decimal strings, other numbers as float64, arrays as
// []any.
func jsonValue(v any) any {
	rv := reflect.ValueOf(v)
	if rv.Kind() == reflect.Slice {
		out := make([]any, rv.Len())
		for i := range out {
			out[i] = jsonValue(rv.Index(i).Interface())
		}
		return out
	}
	switch x := v.(type) {
	case uint64:
		return strconv.FormatUint(x, 10)
	case int64:
		return strconv.FormatInt(x, 10)
	case uint8, int8, uint16, int16, uint32, int32:
		n, _ := asInt64(x)
		return float64(n)
	case float32:
		return float64(x)
	}
	return v
}

// TestReferenceReader writes files with every supported tensor type, some
// unsupported ones as raw bytes and every metadata value type, and checks
// that @huggingface/gguf reads the same metadata and tensor infos as Open.
func TestReferenceReader(t *testing.T) {
	modules := testmodels.InstallT(t, "gguf", referencePackage)
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node not found: the reference test needs node (20 or later)")
	}
	rng := rand.New(rand.NewPCG(11, 12))
	var specs []tensorSpec
	for i, typ := range SupportedTypes {
		cols := int64(typ.BlockSize() * 2)
		x := make([]float32, cols*3)
		for j := range x {
			x[j] = float32(rng.NormFloat64())
		}
		specs = append(specs, tensorSpec{name: fmt.Sprintf("blk.%d.%s.weight", i, typ), typ: typ, dims: []int64{cols, 3}, rows: x})
	}
	for _, typ := range []Type{TypeQ5_0, TypeQ2_K, TypeIQ2_XXS, TypeMXFP4, TypeI32} {
		specs = append(specs, tensorSpec{name: "raw." + typ.String(), typ: typ, dims: []int64{int64(typ.BlockSize()), 1, 2}, raw: make([]byte, 2*typ.BlockBytes())})
	}
	specs = append(specs, tensorSpec{name: "rank4", typ: TypeF16, dims: []int64{2, 3, 4, 5}, rows: make([]float32, 120)})

	f1, p1 := writeTestFile(t, allValueKVs(), specs)
	f2, p2 := writeTestFile(t, []KV{{Key: AlignmentKey, Value: uint32(64)}, {Key: "general.name", Value: "aligned"}}, specs[:3])
	// A version 2 file has the same layout.
	data, err := os.ReadFile(p2)
	if err != nil {
		t.Fatal(err)
	}
	data[4] = 2
	p3 := filepath.Join(t.TempDir(), "v2.gguf")
	if err := os.WriteFile(p3, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f3, err := Open(p3)
	if err != nil {
		t.Fatal(err)
	}
	defer f3.Close()

	script, err := filepath.Abs(filepath.Join("testdata", "reference.js"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), referenceTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", script, p1, p2, p3)
	cmd.Env = append(os.Environ(), "NODE_PATH="+modules)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node reference.js: %v", err)
	}
	var refs []refFile
	if err := json.Unmarshal(out, &refs); err != nil {
		t.Fatalf("reference output: %v", err)
	}
	if len(refs) != 3 {
		t.Fatalf("%d results for 3 files", len(refs))
	}
	for i, f := range []*File{f1, f2, f3} {
		ref := refs[i]
		if ref.Version != f.Version || ref.DataOffset != strconv.FormatInt(f.DataOffset, 10) {
			t.Errorf("file %d: reference version %d data offset %s, ours %d %d", i, ref.Version, ref.DataOffset, f.Version, f.DataOffset)
		}
		kvs := f.Metadata().KVs()
		if len(ref.Metadata) != len(kvs) {
			t.Errorf("file %d: reference has %d keys, ours %d", i, len(ref.Metadata), len(kvs))
		}
		for _, kv := range kvs {
			r, ok := ref.Metadata[kv.Key]
			switch {
			case !ok:
				t.Errorf("file %d: reference lacks %q", i, kv.Key)
			case r.Type != kv.Type:
				t.Errorf("file %d: %q: reference type %s, ours %s", i, kv.Key, r.Type, kv.Type)
			case kv.Type == ValueArray && (r.SubType == nil || *r.SubType != kv.ElemType):
				t.Errorf("file %d: %q: reference element type %v, ours %s", i, kv.Key, r.SubType, kv.ElemType)
			case !reflect.DeepEqual(r.Value, jsonValue(kv.Value)):
				t.Errorf("file %d: %q: reference value %#v, ours %#v", i, kv.Key, r.Value, jsonValue(kv.Value))
			}
		}
		ts := f.Tensors()
		if len(ref.Tensors) != len(ts) {
			t.Fatalf("file %d: reference has %d tensors, ours %d", i, len(ref.Tensors), len(ts))
		}
		for j, ti := range ts {
			r := ref.Tensors[j]
			shape := make([]string, len(ti.Dims))
			for k, d := range ti.Dims {
				shape[k] = strconv.FormatInt(d, 10)
			}
			if r.Name != ti.Name || r.DType != ti.Type || r.Offset != strconv.FormatInt(ti.Offset, 10) || !reflect.DeepEqual(r.Shape, shape) {
				t.Errorf("file %d tensor %d: reference %+v, ours %s %s dims %v offset %d", i, j, r, ti.Name, ti.Type, ti.Dims, ti.Offset)
			}
		}
	}
}
