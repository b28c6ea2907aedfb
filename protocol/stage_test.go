package protocol_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"
	"testing"
	"testing/iotest"

	"github.com/infermesh/infermesh/protocol"
)

func TestStageFrameGolden(t *testing.T) {
	m := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 7, Requester: "R", Model: "M", Step: 2,
		Route: []protocol.Hop{{Peer: "A", Start: 0, End: 2}}},
		Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{2}, []float32{1, -2})}}}
	var buf bytes.Buffer
	if err := protocol.WriteMessage(&buf, m); err != nil {
		t.Fatal(err)
	}
	header := `{"id":7,"requester":"R","model":"M","step":2,"route":[{"peer":"A","start":0,"end":2}],"hop":0,"tensors":[{"name":"x","dtype":"float32","shape":[2],"wire":"float32"}]}`
	want := binary.LittleEndian.AppendUint32(nil, uint32(1+2+len(header)+8))
	want = append(want, 1) // kind: request
	want = binary.AppendUvarint(want, uint64(len(header)))
	want = append(want, header...)
	want = append(want, 0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0) // 1.0, -2.0 float32 LE
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("frame bytes changed:\n got %s\nwant %s", hex.EncodeToString(buf.Bytes()), hex.EncodeToString(want))
	}
	got, err := protocol.ReadMessage(bytes.NewReader(want), 0)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kind != protocol.KindRequest || got.Header.ID != 7 || got.Header.Route[0].End != 2 || len(got.Tensors) != 1 {
		t.Fatalf("decoded %+v", got)
	}
	x, _ := protocol.View[float32](got.Tensors[0].Tensor)
	if !slices.Equal(x, []float32{1, -2}) {
		t.Fatalf("x = %v", x)
	}
}

func TestStageRoundTripFP16AndSeveralFrames(t *testing.T) {
	big := make([]float32, 100_000)
	for i := range big {
		big[i] = float32(i%100) / 8
	}
	msgs := []*protocol.Message{
		{Kind: protocol.KindRequest, Header: protocol.Header{ID: 1, FP16: true}, Tensors: []protocol.NamedTensor{
			{Name: "h", Tensor: protocol.NewTensor([]int64{1, 100_000}, big)},
			{Name: "mask", Tensor: protocol.NewTensor([]int64{1, 3}, []int64{1, 1, 0})},
		}},
		{Kind: protocol.KindError, Header: protocol.Header{ID: 1, Code: protocol.CodeBusy, Message: "full", Hop: 2}},
		{Kind: protocol.KindClose, Header: protocol.Header{Session: "s"}},
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		if err := protocol.WriteMessage(&buf, m); err != nil {
			t.Fatal(err)
		}
	}
	if buf.Len() > 100_000*2+1000 {
		t.Fatalf("fp16 frame is %d bytes: not halved", buf.Len())
	}
	for i, want := range msgs {
		got, err := protocol.ReadMessage(&buf, 0)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got.Kind != want.Kind || got.Header.ID != want.Header.ID || len(got.Tensors) != len(want.Tensors) {
			t.Fatalf("frame %d: %+v", i, got)
		}
		for j, tw := range want.Tensors {
			if d, err := protocol.MaxAbsDiff(tw.Tensor, got.Tensors[j].Tensor); err != nil || d != 0 {
				t.Fatalf("frame %d tensor %s: diff %v %v", i, tw.Name, d, err)
			}
		}
	}
	if _, err := protocol.ReadMessage(&buf, 0); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
}

func TestReadMessageRefuses(t *testing.T) {
	var good bytes.Buffer
	protocol.WriteMessage(&good, &protocol.Message{Kind: protocol.KindResult, Header: protocol.Header{ID: 3},
		Tensors: []protocol.NamedTensor{{Name: "y", Tensor: protocol.NewTensor([]int64{4}, []int32{1, 2, 3, 4})}}})
	g := good.Bytes()
	frame := func(kind byte, header string, body []byte) []byte {
		b := binary.LittleEndian.AppendUint32(nil, uint32(1+len(binary.AppendUvarint(nil, uint64(len(header))))+len(header)+len(body)))
		b = append(b, kind)
		b = binary.AppendUvarint(b, uint64(len(header)))
		return append(append(b, header...), body...)
	}
	cases := map[string][]byte{
		"truncated body":   g[:len(g)-3],
		"truncated header": g[:12],
		"huge length":      append(binary.LittleEndian.AppendUint32(nil, 0xffffffff), g[4:]...),
		"unknown kind":     frame(9, `{"id":1}`, nil),
		"unknown field":    frame(1, `{"id":1,"evil":true}`, nil),
		"not json":         frame(1, `{{{`, nil),
		"body too long":    frame(3, `{"id":1,"tensors":[{"name":"y","dtype":"int32","shape":[1],"wire":"int32"}]}`, make([]byte, 8)),
		"body too short":   frame(3, `{"id":1,"tensors":[{"name":"y","dtype":"int32","shape":[4],"wire":"int32"}]}`, make([]byte, 8)),
		"negative dim":     frame(3, `{"id":1,"tensors":[{"name":"y","dtype":"int32","shape":[-4],"wire":"int32"}]}`, nil),
		"overflowing dims": frame(3, `{"id":1,"tensors":[{"name":"y","dtype":"int32","shape":[4294967296,4294967296],"wire":"int32"}]}`, nil),
		"bad wire type":    frame(3, `{"id":1,"tensors":[{"name":"y","dtype":"int64","shape":[1],"wire":"float16"}]}`, make([]byte, 2)),
	}
	for name, b := range cases {
		_, err := protocol.ReadMessage(bytes.NewReader(b), 1<<20)
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := protocol.ReadMessage(bytes.NewReader(g), 10); !errors.Is(err, protocol.ErrBadFrame) {
		t.Errorf("frame over the caller's limit: %v", err)
	}
}

func TestRemoteErrorIs(t *testing.T) {
	var err error = &protocol.RemoteError{Code: protocol.CodeBusy, Message: "full", Hop: 1, Peer: "12D3KooWabcdefgh"}
	if !errors.Is(err, protocol.ErrBusy) || errors.Is(err, protocol.ErrDeadline) {
		t.Fatalf("errors.Is on %v", err)
	}
}

func FuzzReadMessage(f *testing.F) {
	var b bytes.Buffer
	protocol.WriteMessage(&b, &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 1, FP16: true},
		Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{2}, []float32{1, 2})}}})
	f.Add(b.Bytes())
	f.Add([]byte{1, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := protocol.ReadMessage(bytes.NewReader(data), 1<<20)
		if err != nil {
			return
		}
		for _, nt := range m.Tensors {
			if err := nt.Validate(); err != nil {
				t.Fatalf("decoded an invalid tensor: %v", err)
			}
		}
		var out bytes.Buffer
		if err := protocol.WriteMessage(&out, m); err != nil {
			t.Fatalf("re-encoding: %v", err)
		}
	})
}

// hugeHeader is a frame's start declaring one float32 tensor of the given
// bytes, with none of the body.
func hugeHeader(t testing.TB, bytes int64) []byte {
	t.Helper()
	hdr := fmt.Sprintf(`{"id":1,"requester":"","model":"","step":0,"hop":0,"tensors":[{"name":"x","dtype":"float32","shape":[%d],"wire":"float32"}]}`, bytes/4)
	b := binary.LittleEndian.AppendUint32(nil, uint32(1+len(binary.AppendUvarint(nil, uint64(len(hdr))))+len(hdr)+int(bytes)))
	b = append(b, byte(protocol.KindRequest))
	b = binary.AppendUvarint(b, uint64(len(hdr)))
	return append(b, hdr...)
}

// Issue 12: a header declaring a 250 MiB tensor followed by nothing (or
// by a little) must not make the reader set 250 MiB aside: memory grows
// with the bytes that arrived.
func TestReadMessageAllocatesOnlyWhatArrives(t *testing.T) {
	const declared = 250 << 20
	for _, sent := range []int{0, 1 << 20} {
		frame := append(hugeHeader(t, declared), make([]byte, sent)...)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := protocol.ReadMessage(bytes.NewReader(frame), protocol.MaxFrameBytes)
		runtime.ReadMemStats(&after)
		if !errors.Is(err, protocol.ErrBadFrame) {
			t.Fatalf("%d bytes of a 250 MiB body: %v, want ErrBadFrame", sent, err)
		}
		alloc := after.TotalAlloc - before.TotalAlloc
		t.Logf("%d bytes of a 250 MiB body sent: %d KiB allocated", sent, alloc>>10)
		if limit := uint64(4*sent + 1<<20); alloc > limit {
			t.Errorf("%d bytes of a 250 MiB body sent: %d bytes allocated, want at most %d", sent, alloc, limit)
		}
	}
}

// A large tensor that does arrive whole still reads correctly through
// the growing buffer, from a reader that returns a few bytes at a time.
func TestReadMessageGrowsToLargeTensors(t *testing.T) {
	vals := make([]float32, 3<<20/4+3)
	for i := range vals {
		vals[i] = float32(i)
	}
	var b bytes.Buffer
	in := &protocol.Message{Kind: protocol.KindResult, Header: protocol.Header{ID: 9},
		Tensors: []protocol.NamedTensor{{Name: "y", Tensor: protocol.NewTensor([]int64{int64(len(vals))}, vals)}}}
	if err := protocol.WriteMessage(&b, in); err != nil {
		t.Fatal(err)
	}
	m, err := protocol.ReadMessage(iotest.HalfReader(&b), 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.Tensors[0].Data, in.Tensors[0].Data) {
		t.Fatal("tensor bytes differ")
	}
}

// A frame its Check refuses is read whole and dropped: the caller gets its
// header and ErrRefused, and the next frame reads normally.
func TestReadMessageCheckRefuses(t *testing.T) {
	var b bytes.Buffer
	for id := range uint64(2) {
		protocol.WriteMessage(&b, &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: id + 1},
			Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{1024}, make([]float32, 1024))}}})
	}
	errNo := errors.New("not this one")
	opts := protocol.ReadOptions{Check: func(k protocol.Kind, h *protocol.Header) error {
		if h.ID == 1 {
			return errNo
		}
		return nil
	}}
	m, err := protocol.ReadMessageWith(&b, opts)
	if !errors.Is(err, protocol.ErrRefused) || !errors.Is(err, errNo) || m == nil || m.Header.ID != 1 || len(m.Tensors) != 0 {
		t.Fatalf("refused frame: %v, %+v", err, m)
	}
	m, err = protocol.ReadMessageWith(&b, opts)
	if err != nil || m.Header.ID != 2 || len(m.Tensors) != 1 {
		t.Fatalf("frame after a refused one: %v", err)
	}
	// A refused frame cut short is a broken stream, not a refusal.
	var c bytes.Buffer
	protocol.WriteMessage(&c, &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 1},
		Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{1024}, make([]float32, 1024))}}})
	if _, err := protocol.ReadMessageWith(bytes.NewReader(c.Bytes()[:c.Len()-10]), opts); !errors.Is(err, protocol.ErrBadFrame) || errors.Is(err, protocol.ErrRefused) {
		t.Fatalf("truncated refused frame: %v", err)
	}
}

// FuzzReadMessageWith decodes arbitrary bytes under a small frame bound and
// a Check that refuses some headers: no panic, no frame over the bound,
// refused frames come back without tensors, accepted ones re-encode, and
// memory set aside stays within a small multiple of the input.
func FuzzReadMessageWith(f *testing.F) {
	var b bytes.Buffer
	protocol.WriteMessage(&b, &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 2, FP16: true},
		Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{2}, []float32{1, 2})}}})
	f.Add(b.Bytes())
	f.Add(hugeHeader(f, 250<<20))
	f.Add([]byte{1, 0, 0, 0, 1})
	const limit = 64 << 10
	f.Fuzz(func(t *testing.T, data []byte) {
		refuse := errors.New("odd id")
		m, err := protocol.ReadMessageWith(bytes.NewReader(data), protocol.ReadOptions{MaxBytes: limit,
			Check: func(_ protocol.Kind, h *protocol.Header) error {
				if h.ID%2 == 1 {
					return refuse
				}
				return nil
			}})
		if errors.Is(err, protocol.ErrRefused) {
			if m == nil || m.Header.ID%2 != 1 || len(m.Tensors) != 0 {
				t.Fatalf("refused frame came back as %+v", m)
			}
			return
		}
		if err != nil {
			return
		}
		size := 0
		for _, nt := range m.Tensors {
			if err := nt.Validate(); err != nil {
				t.Fatalf("decoded an invalid tensor: %v", err)
			}
			size += len(nt.Data)
		}
		if size > 2*limit { // float16 on the wire doubles
			t.Fatalf("%d tensor bytes from a frame bounded at %d", size, limit)
		}
		var out bytes.Buffer
		if err := protocol.WriteMessage(&out, m); err != nil {
			t.Fatalf("re-encoding: %v", err)
		}
	})
}

// FrameHead followed by the body is the frame WriteMessage writes.
func TestFrameHeadMatchesWriteMessage(t *testing.T) {
	m := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{ID: 9, Requester: "r", Model: "m", Route: []protocol.Hop{{Peer: "p", Start: 0, End: 2}}},
		Tensors: []protocol.NamedTensor{{Name: "x", Tensor: protocol.NewTensor([]int64{1, 3}, []float32{1, 2, 3})}}}
	var want bytes.Buffer
	if err := protocol.WriteMessage(&want, m); err != nil {
		t.Fatal(err)
	}
	h := m.Header
	h.Tensors = []protocol.TensorMeta{{Name: "x", DType: protocol.Float32, Shape: []int64{1, 3}, Wire: protocol.Float32}}
	head, err := protocol.FrameHead(protocol.KindRequest, &h, 12)
	if err != nil {
		t.Fatal(err)
	}
	got := append(head, m.Tensors[0].Data...)
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("FrameHead + body:\n%q\nWriteMessage:\n%q", got, want.Bytes())
	}
}

// BenchmarkRingStepFrame: the CPU cost of writing and of reading back one
// decode-ring step's frame (a route of three hops, the ring header, a
// 1x1x256 float32 activation), without any transport.
//
// go test -run '^$' -bench RingStepFrame -benchmem ./protocol/
func BenchmarkRingStepFrame(b *testing.B) {
	p := "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
	msg := &protocol.Message{Kind: protocol.KindRequest, Header: protocol.Header{
		ID: 1 << 62, Requester: p, Model: "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
		Session: "0123456789abcdef0123456789abcdef", Step: 10, Hop: 1, Deadline: 1_800_000_000_000,
		Route: []protocol.Hop{{Peer: p, Start: 0, End: 3}, {Peer: p, Start: 3, End: 6}, {Peer: p, Start: 6, End: 10}},
		Ring:  &protocol.Ring{Index: 5, MaxTokens: 32, Positions: 12, StepMillis: 30000, HopMicros: []int64{512}},
	}, Tensors: []protocol.NamedTensor{{Name: "hidden", Tensor: &protocol.Tensor{DType: protocol.Float32, Shape: []int64{1, 1, 256}, Data: make([]byte, 1024)}}}}
	var buf bytes.Buffer
	b.Run("write", func(b *testing.B) {
		for b.Loop() {
			buf.Reset()
			if err := protocol.WriteMessage(&buf, msg); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(buf.Len()), "frame_bytes")
	})
	frame := buf.Bytes()
	b.Run("read", func(b *testing.B) {
		for b.Loop() {
			if _, err := protocol.ReadMessage(bytes.NewReader(frame), 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}
