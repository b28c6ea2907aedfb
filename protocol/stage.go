package protocol

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"time"
	"unsafe"
)

// StageProtocol is the stream protocol on which requests travel from the
// requester down the route, hop to hop, and progress, results and errors
// come back to the requester. SPEC.md lays out the frames.
const StageProtocol = "/infermesh/stage/1.0.0"

// Kind is a stage message's type.
type Kind byte

// Stage message kinds.
const (
	// KindRequest carries a step's inputs to a hop; the hop runs its span
	// and forwards its outputs to the next hop, or to the requester as a
	// KindResult when it is the last.
	KindRequest Kind = 1
	// KindProgress is a hop's copy of what it forwarded, sent to the
	// requester: the requester keeps it as the next hop's input history
	// (to rebuild a lost hop's state) and as a sign of life.
	KindProgress Kind = 2
	// KindResult is the last hop's outputs, sent to the requester.
	KindResult Kind = 3
	// KindError reports a failure at a hop, sent to the requester.
	KindError Kind = 4
	// KindClose ends a session at a hop (and is forwarded down the route).
	KindClose Kind = 5
)

func (k Kind) String() string {
	switch k {
	case KindRequest:
		return "request"
	case KindProgress:
		return "progress"
	case KindResult:
		return "result"
	case KindError:
		return "error"
	case KindClose:
		return "close"
	}
	return fmt.Sprintf("kind(%d)", byte(k))
}

// Limits of stage messages. A frame over a limit is refused before anything
// is allocated for it.
const (
	MaxFrameBytes   = MaxTensorBytes + MaxHeaderBytes + 5
	MaxHeaderBytes  = 64 << 10
	MaxFrameTensors = 64
	MaxRouteHops    = 64
)

// Deadlines of stage streams. A receiver may close a stage stream on which
// no frame came for StageStreamIdle (a sender opens a new stream instead of
// writing on one it left unused for half that), and resets one whose
// frame, once begun, brings no byte for StageFrameTimeout.
const (
	StageStreamIdle   = 2 * time.Minute
	StageFrameTimeout = 10 * time.Second
)

// Hop is one step of a route: a peer runs blocks [Start, End).
type Hop struct {
	Peer  string `json:"peer"`
	Start int    `json:"start"`
	End   int    `json:"end"`
}

// TensorMeta describes a tensor of the frame body: its name, type and
// shape, and the type its bytes travel as (Wire: float16 for float32
// tensors sent at half precision, else DType).
type TensorMeta struct {
	Name  string  `json:"name"`
	DType DType   `json:"dtype"`
	Shape []int64 `json:"shape"`
	Wire  DType   `json:"wire"`
}

// Header is a stage message's JSON header. Fields a kind does not use are
// omitted.
type Header struct {
	ID        uint64       `json:"id"`                 // request ID, unique per requester
	Requester string       `json:"requester"`          // peer ID that gets progress, results and errors
	Model     string       `json:"model"`              // model ID
	Session   string       `json:"session,omitempty"`  // session ID; empty for a single pass
	Step      int          `json:"step"`               // step number within the session
	Route     []Hop        `json:"route,omitempty"`    // the hops of this request, in order
	Hop       int          `json:"hop"`                // index in Route of the hop this concerns
	Deadline  int64        `json:"deadline,omitempty"` // Unix milliseconds; 0: none
	FP16      bool         `json:"fp16,omitempty"`     // float32 activations travel as float16
	Code      ErrorCode    `json:"code,omitempty"`     // errors
	Message   string       `json:"message,omitempty"`  // errors
	Micros    int64        `json:"micros,omitempty"`   // progress/result: the hop's compute time
	Load      *HopLoad     `json:"load,omitempty"`     // progress/result: the hop's load as it answered
	Tensors   []TensorMeta `json:"tensors,omitempty"`  // the body's tensors, in order
	Ring      *Ring        `json:"ring,omitempty"`     // a session step of a decode ring
}

// HopLoad is a hop's load when it sent a progress or result frame: the
// same counts as its capacity record's Load, seconds old instead of up to
// a record refresh old. Requesters fold it into their view of the peer
// (mesh.View) and route around busy hops at once.
type HopLoad struct {
	InFlight int `json:"in_flight"` // requests running
	Queued   int `json:"queued"`    // requests waiting
	// FreeSessions is how many more sessions (each holding its blocks' KV
	// cache) the hop would open now; absent when not said. At 0 a new
	// session there is answered busy.
	FreeSessions *int `json:"free_sessions,omitempty"`
}

// Ring, on a session's request, runs the decode loop inside the route: the
// last hop samples the next token from the step's logits, sends it to the
// requester as a result (one int64 tensor, RingToken) and, unless the ring
// stops, to the first hop as the next step's input, without waiting for
// the requester. On a result, Done says the ring stopped at that token.
type Ring struct {
	Temperature float64 `json:"temperature,omitempty"` // 0: greedy
	TopK        int     `json:"top_k,omitempty"`
	TopP        float64 `json:"top_p,omitempty"`
	Seed        uint64  `json:"seed,omitempty"`
	// Index is the sampler index of the token this step yields (the
	// tokens generated before it); with Seed it is all of the sampler's
	// state.
	Index int `json:"index"`
	// MaxTokens: the ring stops after the token of index MaxTokens-1.
	MaxTokens int `json:"max_tokens"`
	// Eos: the ring stops after any of these tokens.
	Eos []int64 `json:"eos,omitempty"`
	// Forced tokens are taken, in order, instead of sampled ones, for
	// indices Index, Index+1, ...: a requester replaying a generation to
	// rebuild the hops' state after a failover.
	Forced []int64 `json:"forced,omitempty"`
	// Positions is how many positions the session's state holds once
	// this step is done: where the next token goes.
	Positions int `json:"positions"`
	// StepMillis bounds each step: the last hop sets the next step's
	// deadline this far ahead.
	StepMillis int64 `json:"step_millis,omitempty"`
	// HopMicros are the compute times of the hops that ran this step so
	// far, in route order: each hop appends its own as it passes the step
	// on, and the result carries every hop's.
	HopMicros []int64 `json:"hop_micros,omitempty"`
	// Done, on a result, says the ring stopped after this token (eos,
	// MaxTokens, or the model's context full).
	Done bool `json:"done,omitempty"`
}

// WithHop is a copy of r with a hop's compute time appended to HopMicros.
func (r *Ring) WithHop(micros int64) *Ring {
	c := *r
	c.HopMicros = append(append(make([]int64, 0, len(r.HopMicros)+1), r.HopMicros...), micros)
	return &c
}

// RingToken names the one tensor of a ring's result: the sampled token,
// int64 [1].
const RingToken = "token"

// MaxRingForced bounds Ring.Forced: a header is at most MaxHeaderBytes.
const MaxRingForced = 4096

// Message is a stage message: kind, header and tensors (in the order of
// Header.Tensors, which Write fills).
type Message struct {
	Kind    Kind
	Header  Header
	Tensors []NamedTensor
}

// NamedTensor is a tensor with its name.
type NamedTensor struct {
	Name string
	*Tensor
}

// ErrorCode is a typed failure a requester can act on.
type ErrorCode string

// Error codes of KindError messages.
const (
	CodeBusy           ErrorCode = "busy"            // at its limit: try another route now
	CodeUnknownBlock   ErrorCode = "unknown_block"   // the hop does not serve that model or span
	CodeUnknownSession ErrorCode = "unknown_session" // the session expired or never existed at the hop
	CodeBadRequest     ErrorCode = "bad_request"     // malformed request or inputs
	CodeDeadline       ErrorCode = "deadline"        // the deadline passed
	CodeUnreachable    ErrorCode = "unreachable"     // the hop could not reach the next one
	CodeBadOutput      ErrorCode = "bad_output"      // the hop's outputs were malformed (reported by whoever received them)
	CodeInternal       ErrorCode = "internal"        // anything else
)

// RemoteError is a KindError received from a hop. errors.Is matches it
// against the sentinel of its code (ErrBusy, ...).
type RemoteError struct {
	Code    ErrorCode
	Message string
	Hop     int    // index in the route of the hop that failed
	Peer    string // that hop's peer
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("hop %d (%s): %s: %s", e.Hop, shortPeer(e.Peer), e.Code, e.Message)
}

// Is matches the sentinel error of the code.
func (e *RemoteError) Is(target error) bool {
	s, ok := target.(*sentinel)
	return ok && s.code == e.Code
}

type sentinel struct{ code ErrorCode }

func (s *sentinel) Error() string { return string(s.code) }

// Sentinels for errors.Is on a RemoteError.
var (
	ErrBusy           error = &sentinel{CodeBusy}
	ErrUnknownBlock   error = &sentinel{CodeUnknownBlock}
	ErrUnknownSession error = &sentinel{CodeUnknownSession}
	ErrBadRequest     error = &sentinel{CodeBadRequest}
	ErrDeadline       error = &sentinel{CodeDeadline}
	ErrUnreachable    error = &sentinel{CodeUnreachable}
	ErrBadOutput      error = &sentinel{CodeBadOutput}
	ErrInternal       error = &sentinel{CodeInternal}
)

func shortPeer(p string) string {
	if len(p) > 12 {
		return p[len(p)-8:]
	}
	return p
}

// ErrBadFrame is returned, wrapped, for a frame that cannot be decoded.
var ErrBadFrame = errors.New("bad stage frame")

// FrameHead is the start of a frame of the given kind: its length, kind
// and header h, as WriteMessage writes them, for a body of bodyBytes that
// is not included (h.Tensors must declare it). Tests use it to play peers
// that declare more than they send.
func FrameHead(kind Kind, h *Header, bodyBytes int64) ([]byte, error) {
	hdr, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	b := binary.LittleEndian.AppendUint32(nil, uint32(1+len(binary.AppendUvarint(nil, uint64(len(hdr))))+len(hdr)+int(bodyBytes)))
	b = append(b, byte(kind))
	b = binary.AppendUvarint(b, uint64(len(hdr)))
	return append(b, hdr...), nil
}

// WriteMessage writes one frame:
//
//	u32 LE length of the rest | u8 kind | uvarint header length | header JSON | tensor bytes...
//
// Tensor bytes are written as they are (no copy into a frame buffer),
// except float32 tensors with Header.FP16 set, which are converted.
func WriteMessage(w io.Writer, m *Message) error {
	h := m.Header
	h.Tensors = make([]TensorMeta, len(m.Tensors))
	bodies := make([][]byte, len(m.Tensors))
	body := 0
	for i, t := range m.Tensors {
		if err := t.Validate(); err != nil {
			return fmt.Errorf("tensor %q: %w", t.Name, err)
		}
		meta := TensorMeta{Name: t.Name, DType: t.DType, Shape: t.Shape, Wire: t.DType}
		data := t.Data
		if h.FP16 && t.DType == Float32 {
			meta.Wire = Float16
			data = toHalf(t.Data)
		}
		if meta.Shape == nil {
			meta.Shape = []int64{}
		}
		h.Tensors[i], bodies[i] = meta, data
		body += len(data)
	}
	if len(m.Tensors) > MaxFrameTensors {
		return fmt.Errorf("%w: %d tensors over %d", ErrBadFrame, len(m.Tensors), MaxFrameTensors)
	}
	hdr, err := json.Marshal(&h)
	if err != nil {
		return err
	}
	if len(hdr) > MaxHeaderBytes {
		return fmt.Errorf("%w: header of %d bytes over %d", ErrBadFrame, len(hdr), MaxHeaderBytes)
	}
	var pre [4 + 1 + binary.MaxVarintLen64]byte
	n := 5 + binary.PutUvarint(pre[5:], uint64(len(hdr)))
	total := n - 4 + len(hdr) + body
	if total > MaxFrameBytes {
		return fmt.Errorf("%w: frame of %d bytes over %d", ErrBadFrame, total, MaxFrameBytes)
	}
	binary.LittleEndian.PutUint32(pre[:4], uint32(total))
	pre[4] = byte(m.Kind)
	if len(bodies) == 0 || body < 64<<10 {
		// Small frames go out in one write: one QUIC stream frame.
		buf := make([]byte, 0, n+len(hdr)+body)
		buf = append(append(buf, pre[:n]...), hdr...)
		for _, b := range bodies {
			buf = append(buf, b...)
		}
		_, err := w.Write(buf)
		return err
	}
	if _, err := w.Write(append(pre[:n:n], hdr...)); err != nil {
		return err
	}
	for _, b := range bodies {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// ReadMessage reads one frame, refusing any over maxBytes (at most
// MaxFrameBytes). It is ReadMessageWith with only that bound.
func ReadMessage(r io.Reader, maxBytes int) (*Message, error) {
	return ReadMessageWith(r, ReadOptions{MaxBytes: maxBytes})
}

// ReadOptions bound what ReadMessageWith accepts.
type ReadOptions struct {
	// MaxBytes bounds the frame (0 or more than MaxFrameBytes:
	// MaxFrameBytes).
	MaxBytes int
	// Check, if set, sees the kind and the decoded, size-checked header
	// before any byte of the body is read. An error refuses the frame: its
	// body is read and thrown away without being kept (the stream stays
	// in step), and ReadMessageWith returns the message with its header
	// and no tensors, and an error wrapping both ErrRefused and Check's.
	Check func(Kind, *Header) error
}

// ErrRefused is returned, wrapped, with a frame whose header
// ReadOptions.Check refused; the frame was read whole and dropped.
var ErrRefused = errors.New("stage frame refused")

// readChunk is what a reader sets aside for a tensor before its first
// byte arrives; after that, a tensor's buffer at most doubles to hold what
// has arrived, so a peer that declares a large tensor and sends nothing
// costs this, not the size it declared.
const readChunk = 64 << 10

// ReadMessageWith reads one frame. Sizes are checked before anything is
// allocated (header and body must be exactly as long as declared, within
// opts.MaxBytes), and tensor memory grows only as bytes arrive: at most
// twice what has been received plus 64 KiB. Tensors are checked against
// their declared shapes; float16-on-the-wire tensors come back as float32.
func ReadMessageWith(r io.Reader, opts ReadOptions) (*Message, error) {
	maxBytes := opts.MaxBytes
	if maxBytes <= 0 || maxBytes > MaxFrameBytes {
		maxBytes = MaxFrameBytes
	}
	var pre [5]byte
	if _, err := io.ReadFull(r, pre[:]); err != nil {
		return nil, err // io.EOF at a frame boundary: the stream ended
	}
	total := int(binary.LittleEndian.Uint32(pre[:4]))
	if total > maxBytes || total < 2 {
		return nil, fmt.Errorf("%w: frame of %d bytes (limit %d)", ErrBadFrame, total, maxBytes)
	}
	m := &Message{Kind: Kind(pre[4])}
	if m.Kind < KindRequest || m.Kind > KindClose {
		return nil, fmt.Errorf("%w: unknown kind %d", ErrBadFrame, pre[4])
	}
	lr := &io.LimitedReader{R: r, N: int64(total - 1)}
	br := bufio.NewReaderSize(lr, 16)
	hlen, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, fmt.Errorf("%w: header length: %v", ErrBadFrame, unexpected(err))
	}
	if rest := uint64(br.Buffered()) + uint64(lr.N); hlen > MaxHeaderBytes || hlen > rest {
		return nil, fmt.Errorf("%w: header of %d bytes (limit %d, frame holds %d)", ErrBadFrame, hlen, MaxHeaderBytes, rest)
	}
	// The bufio reader may hold a few bytes past the varint: read through it.
	hdr := make([]byte, hlen)
	if _, err := io.ReadFull(br, hdr); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrBadFrame, unexpected(err))
	}
	dec := json.NewDecoder(bytes.NewReader(hdr))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m.Header); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrBadFrame, err)
	}
	h := &m.Header
	if len(h.Tensors) > MaxFrameTensors || len(h.Route) > MaxRouteHops {
		return nil, fmt.Errorf("%w: %d tensors, %d hops", ErrBadFrame, len(h.Tensors), len(h.Route))
	}
	// Sizes first: the body must be exactly what the header declares.
	sizes := make([]int64, len(h.Tensors))
	var want int64
	for i, t := range h.Tensors {
		if !t.DType.Valid() || !t.Wire.Valid() || (t.Wire != t.DType && !(t.DType == Float32 && t.Wire == Float16)) {
			return nil, fmt.Errorf("%w: tensor %q of %v sent as %v", ErrBadFrame, t.Name, t.DType, t.Wire)
		}
		if len(t.Shape) > MaxTensorRank {
			return nil, fmt.Errorf("%w: tensor %q of rank %d", ErrBadFrame, t.Name, len(t.Shape))
		}
		n := int64(1)
		for _, d := range t.Shape {
			if d < 0 || (d > 0 && n > MaxTensorBytes/d) {
				return nil, fmt.Errorf("%w: tensor %q shape %v", ErrBadFrame, t.Name, t.Shape)
			}
			n *= d
		}
		sizes[i] = n * int64(t.Wire.Size())
		if sizes[i] > MaxTensorBytes {
			return nil, fmt.Errorf("%w: tensor %q of %d bytes over %d", ErrBadFrame, t.Name, sizes[i], MaxTensorBytes)
		}
		want += sizes[i]
	}
	if rest := int64(br.Buffered()) + lr.N; rest != want {
		return nil, fmt.Errorf("%w: body of %d bytes, header declares %d", ErrBadFrame, rest, want)
	}
	if opts.Check != nil {
		if cerr := opts.Check(m.Kind, h); cerr != nil {
			if _, err := io.Copy(io.Discard, br); err != nil || lr.N > 0 {
				return nil, fmt.Errorf("%w: refused frame's body: %v", ErrBadFrame, unexpected(orEOF(err)))
			}
			return m, fmt.Errorf("%w: %w", ErrRefused, cerr)
		}
	}
	for i, t := range h.Tensors {
		data, err := readGrowing(br, sizes[i])
		if err != nil {
			return nil, fmt.Errorf("%w: tensor %q: %v", ErrBadFrame, t.Name, unexpected(err))
		}
		if t.Wire == Float16 && t.DType == Float32 {
			data = fromHalf(data)
		}
		m.Tensors = append(m.Tensors, NamedTensor{Name: t.Name, Tensor: &Tensor{DType: t.DType, Shape: t.Shape, Data: data}})
	}
	return m, nil
}

// readGrowing reads exactly n bytes, setting aside at most readChunk
// before the first arrives and then at most doubling the buffer as it
// fills, never past n.
func readGrowing(r io.Reader, n int64) ([]byte, error) {
	buf := make([]byte, 0, min(n, readChunk))
	for int64(len(buf)) < n {
		if len(buf) == cap(buf) {
			grown := make([]byte, len(buf), min(n, 2*int64(cap(buf))))
			copy(grown, buf)
			buf = grown
		}
		k, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+k]
		if err != nil && int64(len(buf)) < n {
			return nil, err
		}
	}
	return buf, nil
}

func orEOF(err error) error {
	if err == nil {
		return io.EOF
	}
	return err
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Map returns the message's tensors by name.
func (m *Message) Map() map[string]*Tensor {
	out := make(map[string]*Tensor, len(m.Tensors))
	for _, t := range m.Tensors {
		out[t.Name] = t.Tensor
	}
	return out
}

// toHalf converts float32 bytes to float16 bytes.
func toHalf(b []byte) []byte {
	n := len(b) / 4
	out := make([]byte, 2*n)
	if n == 0 {
		return out
	}
	src := unsafe.Slice((*uint32)(unsafe.Pointer(&b[0])), n)
	if uintptr(unsafe.Pointer(&b[0]))%4 != 0 {
		for i := range n {
			binary.LittleEndian.PutUint16(out[2*i:], Float32ToFloat16(math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))))
		}
		return out
	}
	for i, v := range src {
		binary.LittleEndian.PutUint16(out[2*i:], Float32ToFloat16(math.Float32frombits(v)))
	}
	return out
}

// fromHalf converts float16 bytes to float32 bytes.
func fromHalf(b []byte) []byte {
	n := len(b) / 2
	out := make([]byte, 4*n)
	for i := range n {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(Float16ToFloat32(binary.LittleEndian.Uint16(b[2*i:]))))
	}
	return out
}
