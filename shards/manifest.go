package shards

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/ipfs/go-cid"

	"github.com/infermesh/infermesh/protocol"
)

// ManifestFormat is the format tag of every manifest this code writes.
const ManifestFormat = "infermesh/model/1"

// Manifest describes a model as an ordered list of blocks. Tensors flow by
// name: a block's input is either a model input, an output of an earlier
// block, or a per-session state input (see StatePair). FORMAT.md documents
// every field.
type Manifest struct {
	Format string `json:"format"`
	Name   string `json:"name"`
	// Kind says where the model came from: "mlp" or "gpt" (built test models)
	// or "split" (cut from a whole ONNX file). Informational.
	Kind string `json:"kind,omitempty"`
	// Inputs are what a caller supplies for one pass or step, state excluded.
	Inputs []TensorSpec `json:"inputs"`
	// Outputs are what a pass or step returns, state excluded.
	Outputs []TensorSpec `json:"outputs"`
	Blocks  []BlockSpec  `json:"blocks"`
	// Decoder is set for autoregressive text models: which inputs carry
	// tokens, positions and the attention mask, and which output the logits.
	Decoder *DecoderSpec `json:"decoder,omitempty"`
	// Files are content-addressed files that travel with the model (an
	// imported model's tokenizer.json, tokenizer_config.json and
	// generation_config.json), fetched and verified like blocks.
	Files []FileSpec `json:"files,omitempty"`
	// Info describes where the model came from, for people and for
	// GET /v1/models. Informational: nothing routes or computes on it.
	Info *ModelInfo `json:"info,omitempty"`
}

// FileSpec is a file of the model other than a block: its name (unique in
// the manifest, e.g. "tokenizer.json"), CID (raw codec, like a block's) and
// size in bytes.
type FileSpec struct {
	Name string `json:"name"`
	CID  string `json:"cid"`
	Size int64  `json:"size"`
}

// ModelInfo describes an imported model.
type ModelInfo struct {
	// Architecture is the checkpoint's architecture, as Hugging Face names
	// it (e.g. "LlamaForCausalLM").
	Architecture string `json:"architecture,omitempty"`
	// Parameters counts the checkpoint's weights (tied ones once).
	Parameters int64 `json:"parameters,omitempty"`
	// DType is the element type the blocks store their weights in (with
	// Quantization, those left unquantized: norms, biases).
	DType string `json:"dtype,omitempty"`
	// Quantization says how the projections, the head and the embedding
	// are stored when quantized: "q8/32" (8 bits per weight and a float32
	// scale per 32 weights), "q4/32" (4-bit projections; see shards/hf for
	// the embedding and head), "q8/128", "q4/128"; empty when not.
	Quantization string `json:"quantization,omitempty"`
}

// BlockSpec is one block: its CID, size in bytes, its ONNX graph's inputs and
// outputs, and which of them are per-session state.
type BlockSpec struct {
	CID     string       `json:"cid"`
	Size    int64        `json:"size"`
	Inputs  []TensorSpec `json:"inputs"`
	Outputs []TensorSpec `json:"outputs"`
	State   []StatePair  `json:"state,omitempty"`
}

// StatePair names a per-session state tensor (a KV cache, a recurrent
// state): the block reads Input and writes Output; the next step of the same
// session feeds Output back as Input. On a session's first step Input is
// zeros, its symbolic dimensions bound from the step's inputs or else 0 (an
// empty KV cache).
type StatePair struct {
	Input  string `json:"input"`
	Output string `json:"output"`
}

// DecoderSpec tells a generation loop how to drive a decoder model.
type DecoderSpec struct {
	// Tokenizer is "bytes" (token i is byte i) or "hf": the Hugging Face
	// tokenizer.json and tokenizer_config.json among the manifest's Files.
	Tokenizer     string `json:"tokenizer"`
	InputIDs      string `json:"input_ids"`                // int64 [batch, seq]
	PositionIDs   string `json:"position_ids,omitempty"`   // int64 [batch, seq]
	AttentionMask string `json:"attention_mask,omitempty"` // int64 [batch, past+seq], 1 = attend
	Logits        string `json:"logits"`                   // float32 [batch, seq, vocab]
	Vocab         int    `json:"vocab"`
	MaxContext    int    `json:"max_context"`
	// EOS lists the tokens that end a generation (generation_config.json's
	// eos_token_id for an imported model), none for "bytes".
	EOS []int64 `json:"eos,omitempty"`
}

// Tokenizers a DecoderSpec may name.
const (
	TokenizerBytes = "bytes" // token i is byte i
	TokenizerHF    = "hf"    // tokenizer.json + tokenizer_config.json in Files
)

// FileCIDs returns the CIDs of the manifest's files, which travel with any
// span of the model: whoever serves part of it can hand a requester the
// tokenizer.
func (m *Manifest) FileCIDs() []cid.Cid {
	var out []cid.Cid
	for _, f := range m.Files {
		if c, err := ParseCID(f.CID); err == nil { // Validate checked them
			out = append(out, c)
		}
	}
	return out
}

// File returns the manifest's file called name.
func (m *Manifest) File(name string) (FileSpec, bool) {
	for _, f := range m.Files {
		if f.Name == name {
			return f, true
		}
	}
	return FileSpec{}, false
}

// TensorSpec is a named tensor with its element type and shape.
type TensorSpec struct {
	Name  string         `json:"name"`
	DType protocol.DType `json:"dtype"`
	Shape []Dim          `json:"shape"`
}

// Dim is one dimension: a fixed size, or a symbolic name ("batch", "seq")
// bound at run time. It encodes as a JSON number or string.
type Dim struct {
	Size  int64
	Param string
}

// MarshalJSON implements json.Marshaler.
func (d Dim) MarshalJSON() ([]byte, error) {
	if d.Param != "" {
		return json.Marshal(d.Param)
	}
	return []byte(strconv.FormatInt(d.Size, 10)), nil
}

// UnmarshalJSON implements json.Unmarshaler.
func (d *Dim) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		*d = Dim{}
		return json.Unmarshal(b, &d.Param)
	}
	*d = Dim{}
	return json.Unmarshal(b, &d.Size)
}

func (d Dim) String() string {
	if d.Param != "" {
		return d.Param
	}
	return strconv.FormatInt(d.Size, 10)
}

// Encode returns the manifest's canonical encoding: compact JSON, fields in
// schema order, no HTML escaping, no trailing newline. The model ID is the
// CID of these bytes.
func (m *Manifest) Encode() ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(m); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// ID returns the model ID: the CID of the canonical manifest.
func (m *Manifest) ID() (cid.Cid, error) {
	b, err := m.Encode()
	if err != nil {
		return cid.Undef, err
	}
	return ManifestCID(b), nil
}

// ErrBadManifest is returned, wrapped with the reason, for a manifest that
// cannot be parsed or is inconsistent.
var ErrBadManifest = errors.New("bad manifest")

// DecodeManifest parses and validates a manifest. Unknown fields are refused
// so that two nodes never disagree on what a model ID means.
func DecodeManifest(b []byte) (*Manifest, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after the manifest", ErrBadManifest)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Validate checks that the manifest is well formed: known format, valid CIDs,
// and every block input is a model input, a state input of that block, or an
// output of an earlier block; every model output is produced by some block.
func (m *Manifest) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadManifest, fmt.Sprintf(format, args...))
	}
	if m.Format != ManifestFormat {
		return bad("format %q, want %q", m.Format, ManifestFormat)
	}
	if len(m.Blocks) == 0 {
		return bad("no blocks")
	}
	available := map[string]bool{}
	for _, t := range m.Inputs {
		if err := t.validate(); err != nil {
			return bad("model input: %v", err)
		}
		available[t.Name] = true
	}
	for i, b := range m.Blocks {
		c, err := ParseCID(b.CID)
		if err != nil {
			return bad("block %d: %v", i, err)
		}
		if b.CID != c.String() {
			return bad("block %d: CID %q is not in canonical form %s", i, b.CID, c)
		}
		if c.Prefix().Codec != CodecBlock {
			return bad("block %d: CID %s is not a raw block CID", i, c)
		}
		if b.Size <= 0 {
			return bad("block %d: size %d", i, b.Size)
		}
		state := map[string]bool{}
		for _, s := range b.State {
			state[s.Input] = true
			if !hasTensor(b.Inputs, s.Input) || !hasTensor(b.Outputs, s.Output) {
				return bad("block %d: state pair %s -> %s is not among the block's inputs and outputs", i, s.Input, s.Output)
			}
		}
		for _, t := range b.Inputs {
			if err := t.validate(); err != nil {
				return bad("block %d input: %v", i, err)
			}
			if !available[t.Name] && !state[t.Name] {
				return bad("block %d: input %q is neither a model input nor produced by an earlier block", i, t.Name)
			}
		}
		for _, t := range b.Outputs {
			if err := t.validate(); err != nil {
				return bad("block %d output: %v", i, err)
			}
			available[t.Name] = true
		}
	}
	for _, t := range m.Outputs {
		if err := t.validate(); err != nil {
			return bad("model output: %v", err)
		}
		if !available[t.Name] {
			return bad("model output %q is produced by no block", t.Name)
		}
	}
	names := map[string]bool{}
	for _, f := range m.Files {
		c, err := ParseCID(f.CID)
		switch {
		case f.Name == "" || strings.ContainsAny(f.Name, "/\\") || f.Name == "." || f.Name == "..":
			return bad("file name %q: want a plain file name", f.Name)
		case names[f.Name]:
			return bad("file %q listed twice", f.Name)
		case err != nil:
			return bad("file %q: %v", f.Name, err)
		case f.CID != c.String():
			return bad("file %q: CID %q is not in canonical form %s", f.Name, f.CID, c)
		case c.Prefix().Codec != CodecBlock:
			return bad("file %q: CID %s is not a raw CID", f.Name, c)
		case f.Size < 0:
			return bad("file %q: size %d", f.Name, f.Size)
		}
		names[f.Name] = true
	}
	if d := m.Decoder; d != nil {
		switch d.Tokenizer {
		case TokenizerBytes:
		case TokenizerHF:
			if _, ok := m.File("tokenizer.json"); !ok {
				return bad("decoder: tokenizer %q needs a file tokenizer.json", d.Tokenizer)
			}
		default:
			return bad("decoder: unknown tokenizer %q", d.Tokenizer)
		}
		for _, e := range d.EOS {
			if e < 0 || e >= int64(d.Vocab) {
				return bad("decoder: eos token %d outside the vocabulary [0,%d)", e, d.Vocab)
			}
		}
	}
	return nil
}

func (t TensorSpec) validate() error {
	if t.Name == "" {
		return errors.New("tensor without a name")
	}
	if !t.DType.Valid() {
		return fmt.Errorf("tensor %q: unsupported dtype", t.Name)
	}
	if len(t.Shape) > protocol.MaxTensorRank {
		return fmt.Errorf("tensor %q: rank %d over %d", t.Name, len(t.Shape), protocol.MaxTensorRank)
	}
	return nil
}

func hasTensor(ts []TensorSpec, name string) bool {
	for _, t := range ts {
		if t.Name == name {
			return true
		}
	}
	return false
}

// StateInputs returns the names of every state input of blocks [start, end).
func (m *Manifest) StateInputs(start, end int) map[string]bool {
	s := map[string]bool{}
	for _, b := range m.Blocks[start:end] {
		for _, p := range b.State {
			s[p.Input] = true
		}
	}
	return s
}

// Crossing returns the tensors that cross the cut after block i: produced by
// a block at or before i (or model inputs) and read by a block after i or
// returned as a model output. State never crosses a cut: it stays with its
// block. These are what one hop sends the next.
func (m *Manifest) Crossing(i int) []TensorSpec {
	produced := map[string]TensorSpec{}
	for _, t := range m.Inputs {
		produced[t.Name] = t
	}
	for _, b := range m.Blocks[:i+1] {
		for _, t := range b.Outputs {
			produced[t.Name] = t
		}
	}
	stateOut := map[string]bool{}
	for _, b := range m.Blocks {
		for _, p := range b.State {
			stateOut[p.Output] = true
		}
	}
	var out []TensorSpec
	seen := map[string]bool{}
	add := func(name string) {
		if t, ok := produced[name]; ok && !seen[name] && !stateOut[name] {
			seen[name] = true
			out = append(out, t)
		}
	}
	for _, b := range m.Blocks[i+1:] {
		for _, t := range b.Inputs {
			add(t.Name)
		}
	}
	for _, t := range m.Outputs {
		add(t.Name)
	}
	return out
}

// SpanInputs returns what a caller must send into blocks [start, end): the
// tensors crossing the cut before start (model inputs for start 0). State
// inputs are excluded: the span keeps its own.
func (m *Manifest) SpanInputs(start int) []TensorSpec {
	if start == 0 {
		return m.Inputs
	}
	return m.Crossing(start - 1)
}

// SpanOutputs returns what blocks [start, end) hand on: the tensors crossing
// the cut after end-1 (model outputs for the last block).
func (m *Manifest) SpanOutputs(end int) []TensorSpec {
	if end == len(m.Blocks) {
		return m.Outputs
	}
	return m.Crossing(end - 1)
}

// TotalSize is the sum of the blocks' sizes in bytes.
func (m *Manifest) TotalSize() int64 {
	var n int64
	for _, b := range m.Blocks {
		n += b.Size
	}
	return n
}

// Whole returns a one-block manifest for the same model as an unsplit ONNX
// file with the given CID and size: its inputs are the model inputs plus every
// state input, its outputs the model outputs plus every state output. It lets
// a test or benchmark run full.onnx through the same runtime as the blocks.
func (m *Manifest) Whole(c cid.Cid, size int64) *Manifest {
	w := &Manifest{Format: m.Format, Name: m.Name + "-whole", Kind: m.Kind, Inputs: m.Inputs, Outputs: m.Outputs, Decoder: m.Decoder}
	blk := BlockSpec{CID: c.String(), Size: size, Inputs: append([]TensorSpec(nil), m.Inputs...), Outputs: append([]TensorSpec(nil), m.Outputs...)}
	for _, b := range m.Blocks {
		for _, p := range b.State {
			blk.State = append(blk.State, p)
			for _, t := range b.Inputs {
				if t.Name == p.Input {
					blk.Inputs = append(blk.Inputs, t)
				}
			}
			for _, t := range b.Outputs {
				if t.Name == p.Output {
					blk.Outputs = append(blk.Outputs, t)
				}
			}
		}
	}
	w.Blocks = []BlockSpec{blk}
	return w
}

// CheckTensors checks that ts holds every tensor of specs with its declared
// type, rank and fixed sizes, and well-formed data: what a hop checks of the
// activations it receives, and a requester of a result.
func CheckTensors(specs []TensorSpec, ts map[string]*protocol.Tensor) error {
	for _, spec := range specs {
		t, ok := ts[spec.Name]
		if !ok || t == nil {
			return fmt.Errorf("missing tensor %q", spec.Name)
		}
		if err := t.Validate(); err != nil {
			return fmt.Errorf("tensor %q: %w", spec.Name, err)
		}
		if t.DType != spec.DType || len(t.Shape) != len(spec.Shape) {
			return fmt.Errorf("tensor %q is %v, want %v of rank %d", spec.Name, t, spec.DType, len(spec.Shape))
		}
		for i, d := range spec.Shape {
			if d.Param == "" && t.Shape[i] != d.Size {
				return fmt.Errorf("tensor %q is %v, want dimension %d = %d", spec.Name, t, i, d.Size)
			}
		}
	}
	return nil
}

// CheckInputs checks one call's inputs as CheckTensors does, and that
// symbolic dimensions with the same name agree across them ("?" names
// none): what a requester checks of a caller's inputs before any hop sees
// them.
func CheckInputs(specs []TensorSpec, ts map[string]*protocol.Tensor) error {
	if err := CheckTensors(specs, ts); err != nil {
		return err
	}
	type binding struct {
		tensor string
		dim    int
		size   int64
	}
	bound := map[string]binding{}
	for _, spec := range specs {
		t := ts[spec.Name]
		for i, d := range spec.Shape {
			if d.Param == "" || d.Param == "?" {
				continue
			}
			b, ok := bound[d.Param]
			if !ok {
				bound[d.Param] = binding{spec.Name, i, t.Shape[i]}
				continue
			}
			if b.size != t.Shape[i] {
				return fmt.Errorf("dimension %q disagrees: tensor %q has %d (dimension %d), tensor %q has %d (dimension %d)",
					d.Param, b.tensor, b.size, b.dim, spec.Name, t.Shape[i], i)
			}
		}
	}
	return nil
}

// CheckStep checks the inputs of one call of m after past positions of a
// session (0 for a single pass): CheckInputs against the model's inputs,
// and for a decoder, that its attention mask covers past + seq positions
// (seq being input_ids' last dimension).
func (m *Manifest) CheckStep(ts map[string]*protocol.Tensor, past int64) error {
	if err := CheckInputs(m.Inputs, ts); err != nil {
		return err
	}
	d := m.Decoder
	if d == nil || d.AttentionMask == "" {
		return nil
	}
	ids, mask := ts[d.InputIDs], ts[d.AttentionMask]
	if ids == nil || mask == nil || len(ids.Shape) == 0 || len(mask.Shape) == 0 {
		return nil // not inputs of this model: CheckInputs said so if they must be
	}
	seq, total := ids.Shape[len(ids.Shape)-1], mask.Shape[len(mask.Shape)-1]
	if total != past+seq {
		return fmt.Errorf("tensor %q covers %d positions, want %d (%d past + %d in %q)",
			d.AttentionMask, total, past+seq, past, seq, d.InputIDs)
	}
	return nil
}
