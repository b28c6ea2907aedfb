package node

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ByteSize is a size in bytes, written as plain bytes ("1048576") or with a
// unit: decimal kB, MB, GB, TB, PB (and K, M, G, T, P) or binary KiB, MiB,
// GiB, TiB, PiB; units are case-insensitive, a space before them and a
// fraction ("1.5GB") are allowed. In JSON it is such a string or a number
// of bytes. Config fields of this type say what zero means.
type ByteSize int64

// byteUnits are the units ParseByteSize accepts, by lower-case name.
var byteUnits = map[string]int64{
	"": 1, "b": 1,
	"k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12, "p": 1e15, "pb": 1e15,
	"ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
	"ti": 1 << 40, "tib": 1 << 40, "pi": 1 << 50, "pib": 1 << 50,
}

// ParseByteSize parses a size: "20GB", "512MiB", "1.5 GiB", "1048576".
// Negative sizes, unknown units and sizes past int64 are errors.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	num, unit := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	mult, ok := byteUnits[unit]
	if num == "" || !ok {
		return 0, fmt.Errorf("size %q: want bytes or a number with a unit, e.g. 20GB, 512MiB, 1048576", s)
	}
	if !strings.Contains(num, ".") {
		v, err := strconv.ParseInt(num, 10, 64)
		if err != nil || v > math.MaxInt64/mult {
			return 0, fmt.Errorf("size %q: too large", s)
		}
		return ByteSize(v * mult), nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	v := math.Round(f * float64(mult))
	if v >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return ByteSize(v), nil
}

// String writes the size in the largest unit that holds it exactly, binary
// units first ("512MiB", "20GB"), else in bytes ("1000001").
func (b ByteSize) String() string {
	if b <= 0 {
		return strconv.FormatInt(int64(b), 10)
	}
	for _, u := range []struct {
		name string
		size int64
	}{{"PiB", 1 << 50}, {"PB", 1e15}, {"TiB", 1 << 40}, {"TB", 1e12}, {"GiB", 1 << 30}, {"GB", 1e9},
		{"MiB", 1 << 20}, {"MB", 1e6}, {"KiB", 1 << 10}, {"kB", 1e3}} {
		if int64(b)%u.size == 0 {
			return strconv.FormatInt(int64(b)/u.size, 10) + u.name
		}
	}
	return strconv.FormatInt(int64(b), 10)
}

// Set implements flag.Value.
func (b *ByteSize) Set(s string) error {
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// MarshalJSON writes the size as String does, quoted.
func (b ByteSize) MarshalJSON() ([]byte, error) { return json.Marshal(b.String()) }

// UnmarshalJSON reads a string ParseByteSize accepts, or a number of bytes.
func (b *ByteSize) UnmarshalJSON(data []byte) error {
	data = bytes.TrimSpace(data)
	if len(data) > 0 && data[0] == '"' {
		var s string
		if err := json.Unmarshal(data, &s); err != nil {
			return err
		}
		return b.Set(s)
	}
	var n int64
	if err := json.Unmarshal(data, &n); err != nil {
		return fmt.Errorf("size %s: want a number of bytes or a string such as \"20GB\"", data)
	}
	if n < 0 {
		return fmt.Errorf("size %d: must not be negative", n)
	}
	*b = ByteSize(n)
	return nil
}

// humanBytes writes a byte count for people: "1.5 GB", "312.0 kB", "17 B".
func humanBytes(n int64) string {
	f, units := float64(n), []string{"B", "kB", "MB", "GB", "TB", "PB"}
	i := 0
	for math.Abs(f) >= 1000 && i < len(units)-1 {
		f /= 1000
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.1f %s", f, units[i])
}
