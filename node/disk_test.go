package node

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/protocol"
)

func TestParseByteSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want ByteSize
		bad  bool
	}{
		{"0", 0, false},
		{"1048576", 1 << 20, false},
		{"20GB", 20e9, false},
		{"20gb", 20e9, false},
		{"20G", 20e9, false},
		{"512MiB", 512 << 20, false},
		{"512 MiB", 512 << 20, false},
		{" 1.5GiB ", 3 << 29, false},
		{"1.5 kB", 1500, false},
		{"3TiB", 3 << 40, false},
		{"7B", 7, false},
		{"8EiB", 0, true},
		{"9223372036854775807", 1<<63 - 1, false},
		{"9223372036854775808", 0, true},
		{"10000PB", 0, true},
		{"-1GB", 0, true},
		{"-5", 0, true},
		{"", 0, true},
		{"GB", 0, true},
		{"12 parsecs", 0, true},
		{"1.2.3MB", 0, true},
	} {
		got, err := ParseByteSize(c.in)
		if (err != nil) != c.bad || got != c.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d (error: %v)", c.in, got, err, c.want, c.bad)
		}
	}
	for _, c := range []struct {
		in   ByteSize
		want string
	}{{0, "0"}, {512 << 20, "512MiB"}, {20e9, "20GB"}, {1500, "1500"}, {2000, "2kB"}, {1000001, "1000001"}, {3 << 40, "3TiB"}} {
		if got := c.in.String(); got != c.want {
			t.Errorf("ByteSize(%d).String() = %q, want %q", int64(c.in), got, c.want)
		}
		if back, err := ParseByteSize(c.in.String()); err != nil || back != c.in {
			t.Errorf("ParseByteSize(%q) = %d, %v: does not round-trip %d", c.in.String(), back, err, int64(c.in))
		}
	}
}

// In config.json max_disk is a string with a unit or a number of bytes.
func TestByteSizeJSON(t *testing.T) {
	for in, want := range map[string]ByteSize{
		`{"max_disk":"20GB"}`: 20e9, `{"max_disk":1048576}`: 1 << 20, `{"max_disk":"0"}`: 0, `{}`: 0,
	} {
		var c Config
		if err := json.Unmarshal([]byte(in), &c); err != nil || c.MaxDisk != want {
			t.Errorf("%s: max_disk %d, %v; want %d", in, c.MaxDisk, err, want)
		}
	}
	for _, in := range []string{`{"max_disk":-1}`, `{"max_disk":"lots"}`, `{"max_disk":1.5}`, `{"max_disk":true}`} {
		var c Config
		if err := json.Unmarshal([]byte(in), &c); err == nil {
			t.Errorf("%s accepted as %d", in, c.MaxDisk)
		}
	}
	b, err := json.Marshal(Config{MaxDisk: 512 << 20})
	if err != nil || !strings.Contains(string(b), `"max_disk":"512MiB"`) {
		t.Fatalf("marshalled: %s %v", b, err)
	}
	if b, _ := json.Marshal(Config{}); strings.Contains(string(b), "max_disk") {
		t.Fatalf("no cap is written: %s", b)
	}
	c := Config{MaxDisk: -1}
	if err := c.Validate(); err == nil {
		t.Fatal("a negative max_disk validated")
	}
	// node init writes it; the node reads it back.
	dir := t.TempDir()
	cfg := DefaultConfig()
	cfg.MaxDisk = 20e9
	if _, err := Init(dir, cfg); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, ConfigFile))
	if got, err := LoadConfig(dir); err != nil || got.MaxDisk != 20e9 || !strings.Contains(string(raw), `"max_disk": "20GB"`) {
		t.Fatalf("config round trip: max_disk %d, %v:\n%s", got.MaxDisk, err, raw)
	}
}

// The eviction choice: only blocks not needed here whose copies the mesh
// keeps, well-held ones before those no peer has room for, least recently
// used first, just enough of them; nothing at all when that is not enough.
func TestChooseEvictions(t *testing.T) {
	t0 := time.Unix(1e9, 0)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	items := []diskItem{
		{CID: "served", Size: 100, Used: at(0), Needed: true, Holders: 5},
		{CID: "old-held", Size: 100, Used: at(1), Holders: 2},
		{CID: "new-held", Size: 100, Used: at(5), Holders: 3},
		{CID: "mid-held", Size: 100, Used: at(3), Holders: 2},
		{CID: "last-copy", Size: 100, Used: at(0), Holders: 0, Room: true},
		{CID: "one-other", Size: 100, Used: at(0), Holders: 1, Room: true},
		{CID: "no-room", Size: 100, Used: at(0), Holders: 1, Room: false},
		{CID: "unknown", Size: 100, Used: at(0), Holders: -1},
	}
	ids := func(evs []diskEviction) []string {
		var out []string
		for _, e := range evs {
			out = append(out, e.CID)
		}
		return out
	}
	// 800 stored, cap 1000.
	for _, c := range []struct {
		need int64
		want []string
	}{
		{200, nil},                  // fits
		{201, []string{"old-held"}}, // one block is enough
		{300, []string{"old-held"}}, // exactly
		{301, []string{"old-held", "mid-held"}},
		{450, []string{"old-held", "mid-held", "new-held"}},
		// no peer has room for it: evicted last, even though used first
		{550, []string{"old-held", "mid-held", "new-held", "no-room"}},
	} {
		evs, err := chooseEvictions(items, 800, c.need, 1000, 2)
		if err != nil || !slices.Equal(ids(evs), c.want) {
			t.Errorf("need %d: evict %v, %v; want %v", c.need, ids(evs), err, c.want)
		}
		for _, e := range evs {
			if e.Lost != (e.CID == "no-room") || e.Why == "" {
				t.Errorf("need %d: %s lost %v, why %q", c.need, e.CID, e.Lost, e.Why)
			}
		}
	}
	// More than every evictable block frees: nothing, and why.
	evs, err := chooseEvictions(items, 800, 601, 1000, 2)
	var full *DiskFullError
	if len(evs) != 0 || !errors.As(err, &full) || !errors.Is(err, ErrDiskFull) {
		t.Fatalf("need 601: evict %v, %v; want a DiskFullError", ids(evs), err)
	}
	if full.Max != 1000 || full.Used != 800 || full.Need != 601 || full.Freeable != 400 || full.Needed != 100 || full.Kept != 300 {
		t.Fatalf("DiskFullError %+v", full)
	}
	full.What = "blocks 2-3 of model X"
	for _, want := range []string{"--max-disk 1kB:", "blocks 2-3 of model X", "601 B more", "holding 800 B", "only 400 B"} {
		if !strings.Contains(full.Error(), want) {
			t.Errorf("%q lacks %q", full.Error(), want)
		}
	}
	// With replicas 1, one other holder is enough; the last copy stays.
	evs, err = chooseEvictions(items, 800, 600, 1000, 1)
	if err != nil || !slices.Equal(ids(evs), []string{"no-room", "one-other", "old-held", "mid-held"}) {
		t.Fatalf("replicas 1: evict %v, %v", ids(evs), err)
	}
	// Ties in last use go by CID, so the choice is deterministic.
	tie := []diskItem{{CID: "b", Size: 1, Holders: 2}, {CID: "a", Size: 1, Holders: 2}}
	if evs, _ := chooseEvictions(tie, 2, 1, 2, 2); !slices.Equal(ids(evs), []string{"a"}) {
		t.Fatalf("tie: %v", ids(evs))
	}
}

func TestFitSpan(t *testing.T) {
	for _, c := range []struct {
		sizes  []int64
		kept   []bool
		budget int64
		want   int
	}{
		{[]int64{10, 10, 10, 10}, nil, 25, 2},
		{[]int64{10, 10, 10, 10}, nil, 40, 4},
		{[]int64{10, 10, 10, 10}, nil, 1000, 4},
		{[]int64{10, 10, 10, 10}, nil, 9, 0},
		{[]int64{10, 10, 10, 10}, nil, -5, 0},
		// every run of the length must fit: the big embedding decides
		{[]int64{30, 10, 10, 20}, nil, 35, 1},
		{[]int64{30, 10, 10, 20}, nil, 40, 2},
		{[]int64{30, 10, 10, 20}, nil, 50, 3},
		// a block kept anyway costs nothing more
		{[]int64{30, 10, 10, 20}, nil, 30, 1},
		{[]int64{30, 10, 10, 20}, []bool{true, false, false, false}, 30, 2},
		{[]int64{30, 10, 10, 20}, []bool{true, false, false, true}, 20, 4},
		{nil, nil, 100, 0},
	} {
		if got := fitSpan(c.sizes, c.kept, c.budget); got != c.want {
			t.Errorf("fitSpan(%v, %v, %d) = %d, want %d", c.sizes, c.kept, c.budget, got, c.want)
		}
	}
}

// Holders are the other servers of a block; room is a server without it
// whose free memory holds it, or a connected peer whose record is unread.
func TestHoldersOf(t *testing.T) {
	self, a, b, c := peer.ID("self"), peer.ID("a"), peer.ID("b"), peer.ID("c")
	pv := func(id peer.ID, start, end int, free int64) mesh.PeerView {
		return mesh.PeerView{ID: id, Span: protocol.ServedSpan{Start: start, End: end},
			Record: &protocol.CapacityRecord{Load: protocol.Load{FreeKVBytes: free}}}
	}
	mv := &mesh.ModelView{Blocks: 4, Peers: []mesh.PeerView{pv(self, 0, 4, 1e9), pv(a, 0, 2, 0), pv(b, 1, 3, 50)}}
	for _, x := range []struct {
		block     int
		resident  int64
		connected []peer.ID
		holders   int
		room      bool
	}{
		{0, 100, nil, 1, false}, // a holds it; b has 50 free of 100
		{1, 100, nil, 2, false}, // a and b
		{2, 100, nil, 1, false}, // b; a has no free memory
		{2, 40, nil, 1, false},  // the same for a smaller block
		{3, 40, nil, 0, true},   // b has room for 40
		{3, 100, []peer.ID{self, a, b}, 0, false},
		{3, 100, []peer.ID{c}, 0, true},      // c serves something else: assumed to have room
		{-1, 100, []peer.ID{a, b}, 2, false}, // a file: every server holds it
	} {
		h, r := holdersOf(mv, self, x.connected, x.block, x.resident)
		if h != x.holders || r != x.room {
			t.Errorf("block %d, %d bytes, connected %v: %d holders, room %v; want %d, %v", x.block, x.resident, x.connected, h, r, x.holders, x.room)
		}
	}
	if h, r := holdersOf(&mesh.ModelView{}, self, nil, 0, 1); h != 0 || r {
		t.Errorf("empty view, alone: %d holders, room %v", h, r)
	}
}
