package gguf

import (
	"fmt"
	"math"
)

// Metadata is a file's key/value pairs in file order, with typed lookups.
// The typed helpers return an error wrapping ErrNoKey for a missing key, and
// one naming both types for a value of another type.
type Metadata struct {
	kvs   []KV
	index map[string]int
}

// KVs returns the pairs in file order. The caller must not modify them.
func (m *Metadata) KVs() []KV { return m.kvs }

// Lookup returns the pair with the given key.
func (m *Metadata) Lookup(key string) (KV, bool) {
	i, ok := m.index[key]
	if !ok {
		return KV{}, false
	}
	return m.kvs[i], true
}

func (m *Metadata) get(key string) (KV, error) {
	kv, ok := m.Lookup(key)
	if !ok {
		return KV{}, fmt.Errorf("%w: %q", ErrNoKey, key)
	}
	return kv, nil
}

func wrongType(kv KV, want string) error {
	got := kv.Type.String()
	if kv.Type == ValueArray {
		got = "array of " + kv.ElemType.String()
	}
	return fmt.Errorf("gguf: metadata %q is %s, want %s", kv.Key, got, want)
}

// String returns a string value.
func (m *Metadata) String(key string) (string, error) {
	kv, err := m.get(key)
	if err != nil {
		return "", err
	}
	s, ok := kv.Value.(string)
	if !ok {
		return "", wrongType(kv, "string")
	}
	return s, nil
}

// Bool returns a bool value.
func (m *Metadata) Bool(key string) (bool, error) {
	kv, err := m.get(key)
	if err != nil {
		return false, err
	}
	b, ok := kv.Value.(bool)
	if !ok {
		return false, wrongType(kv, "bool")
	}
	return b, nil
}

// asInt64 converts any integer value to int64, failing for a uint64 above
// math.MaxInt64.
func asInt64(v any) (int64, bool) {
	switch x := v.(type) {
	case uint8:
		return int64(x), true
	case int8:
		return int64(x), true
	case uint16:
		return int64(x), true
	case int16:
		return int64(x), true
	case uint32:
		return int64(x), true
	case int32:
		return int64(x), true
	case int64:
		return x, true
	case uint64:
		if x > math.MaxInt64 {
			return 0, false
		}
		return int64(x), true
	}
	return 0, false
}

// Int returns an integer value of any integer type, as int64.
func (m *Metadata) Int(key string) (int64, error) {
	kv, err := m.get(key)
	if err != nil {
		return 0, err
	}
	if u, ok := kv.Value.(uint64); ok && u > math.MaxInt64 {
		return 0, fmt.Errorf("gguf: metadata %q: %d overflows int64", key, u)
	}
	n, ok := asInt64(kv.Value)
	if !ok {
		return 0, wrongType(kv, "an integer")
	}
	return n, nil
}

// Uint returns a non-negative integer value of any integer type, as uint64.
func (m *Metadata) Uint(key string) (uint64, error) {
	kv, err := m.get(key)
	if err != nil {
		return 0, err
	}
	if u, ok := kv.Value.(uint64); ok {
		return u, nil
	}
	n, ok := asInt64(kv.Value)
	if !ok {
		return 0, wrongType(kv, "an integer")
	}
	if n < 0 {
		return 0, fmt.Errorf("gguf: metadata %q is negative (%d)", key, n)
	}
	return uint64(n), nil
}

// Float returns a float32 or float64 value, as float64.
func (m *Metadata) Float(key string) (float64, error) {
	kv, err := m.get(key)
	if err != nil {
		return 0, err
	}
	switch x := kv.Value.(type) {
	case float32:
		return float64(x), nil
	case float64:
		return x, nil
	}
	return 0, wrongType(kv, "a float")
}

// Strings returns an array of strings.
func (m *Metadata) Strings(key string) ([]string, error) {
	kv, err := m.get(key)
	if err != nil {
		return nil, err
	}
	s, ok := kv.Value.([]string)
	if !ok {
		return nil, wrongType(kv, "array of string")
	}
	return s, nil
}

// Ints returns an array of any integer type, as int64s.
func (m *Metadata) Ints(key string) ([]int64, error) {
	kv, err := m.get(key)
	if err != nil {
		return nil, err
	}
	var out []int64
	conv := func(n int, at func(int) any) error {
		out = make([]int64, n)
		for i := range out {
			v, ok := asInt64(at(i))
			if !ok {
				return fmt.Errorf("gguf: metadata %q[%d] overflows int64", key, i)
			}
			out[i] = v
		}
		return nil
	}
	switch x := kv.Value.(type) {
	case []uint8:
		err = conv(len(x), func(i int) any { return x[i] })
	case []int8:
		err = conv(len(x), func(i int) any { return x[i] })
	case []uint16:
		err = conv(len(x), func(i int) any { return x[i] })
	case []int16:
		err = conv(len(x), func(i int) any { return x[i] })
	case []uint32:
		err = conv(len(x), func(i int) any { return x[i] })
	case []int32:
		err = conv(len(x), func(i int) any { return x[i] })
	case []uint64:
		err = conv(len(x), func(i int) any { return x[i] })
	case []int64:
		err = conv(len(x), func(i int) any { return x[i] })
	default:
		return nil, wrongType(kv, "array of integers")
	}
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Floats returns an array of float32 or float64, as float64s.
func (m *Metadata) Floats(key string) ([]float64, error) {
	kv, err := m.get(key)
	if err != nil {
		return nil, err
	}
	switch x := kv.Value.(type) {
	case []float32:
		out := make([]float64, len(x))
		for i, v := range x {
			out[i] = float64(v)
		}
		return out, nil
	case []float64:
		return append([]float64(nil), x...), nil
	}
	return nil, wrongType(kv, "array of floats")
}
