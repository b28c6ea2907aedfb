package text

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"
)

// maxVocab bounds token ids, so that a corrupt file cannot make Load
// allocate gigabytes.
const maxVocab = 1 << 24

// Word cache bounds: pieces longer than cacheMaxPiece bytes are not cached,
// and the cache is emptied when it reaches cacheMaxEntries.
const (
	cacheMaxPiece   = 256
	cacheMaxEntries = 1 << 15
)

// bpe is Hugging Face's BPE model. Merges are looked up by the pair of
// symbol ids; the merge loop takes the lowest-ranked (then leftmost) pair
// from a heap over a linked list of symbols.
type bpe struct {
	vocab        []string // by id
	hasID        []bool
	ids          map[string]int32
	merges       map[uint64]merge // key: left id << 32 | right id
	ignoreMerges bool
	byteFallback bool
	byteIDs      [256]int32 // <0xNN> ids; -1 where missing
	unk          int32      // -1: none
	fuseUnk      bool

	mu    sync.Mutex
	cache map[string][]int64
}

type merge struct {
	rank int32
	id   int32
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// modelJSON is tokenizer.json's model, read in the same pass as the rest
// of the file (the vocabulary and merges are most of its bytes).
type modelJSON struct {
	Type                    string           `json:"type"`
	Vocab                   map[string]int32 `json:"vocab"`
	Merges                  mergesJSON       `json:"merges"`
	UnkToken                *string          `json:"unk_token"`
	FuseUnk                 bool             `json:"fuse_unk"`
	ByteFallback            bool             `json:"byte_fallback"`
	IgnoreMerges            bool             `json:"ignore_merges"`
	Dropout                 *float64         `json:"dropout"`
	ContinuingSubwordPrefix *string          `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string          `json:"end_of_word_suffix"`
}

// mergesJSON reads merges written as "a b" strings or as ["a", "b"] pairs.
type mergesJSON [][2]string

func (ms *mergesJSON) UnmarshalJSON(data []byte) error {
	rest := bytes.TrimSpace(data)
	if len(rest) > 0 && rest[0] == '[' {
		rest = bytes.TrimSpace(rest[1:])
	}
	if len(rest) > 0 && rest[0] == '"' {
		var strs []string
		if err := json.Unmarshal(data, &strs); err != nil {
			return err
		}
		out := make([][2]string, len(strs))
		for i, s := range strs {
			a, b, ok := strings.Cut(s, " ")
			if !ok {
				return fmt.Errorf("merge %d %q is not two tokens", i, s)
			}
			out[i] = [2]string{a, b}
		}
		*ms = out
		return nil
	}
	var pairs [][2]string
	if err := json.Unmarshal(data, &pairs); err != nil {
		return fmt.Errorf("merges are neither \"a b\" strings nor [a, b] pairs: %w", err)
	}
	*ms = pairs
	return nil
}

func loadModel(c *modelJSON) (*bpe, error) {
	if c.Type != "BPE" && c.Type != "" {
		return nil, fmt.Errorf("%w: model type %q", ErrUnknownComponent, c.Type)
	}
	if c.Type == "" && c.Merges == nil {
		return nil, fmt.Errorf("%w: model without a type or merges", ErrUnknownComponent)
	}
	if c.Dropout != nil && *c.Dropout != 0 {
		return nil, fmt.Errorf("%w: BPE dropout %v", ErrUnknownComponent, *c.Dropout)
	}
	if c.ContinuingSubwordPrefix != nil && *c.ContinuingSubwordPrefix != "" {
		return nil, fmt.Errorf("%w: BPE continuing_subword_prefix %q", ErrUnknownComponent, *c.ContinuingSubwordPrefix)
	}
	if c.EndOfWordSuffix != nil && *c.EndOfWordSuffix != "" {
		return nil, fmt.Errorf("%w: BPE end_of_word_suffix %q", ErrUnknownComponent, *c.EndOfWordSuffix)
	}
	m := &bpe{
		ids:          c.Vocab,
		ignoreMerges: c.IgnoreMerges,
		byteFallback: c.ByteFallback,
		fuseUnk:      c.FuseUnk,
		unk:          -1,
		cache:        make(map[string][]int64),
	}
	n := 0
	if m.ids == nil {
		m.ids = map[string]int32{}
	}
	for tok, id := range m.ids {
		if id < 0 || id >= maxVocab {
			return nil, fmt.Errorf("vocab token %q has id %d", tok, id)
		}
		n = max(n, int(id)+1)
	}
	m.vocab = make([]string, n)
	m.hasID = make([]bool, n)
	for tok, id := range m.ids {
		m.vocab[id], m.hasID[id] = tok, true
	}
	for b := range 256 {
		m.byteIDs[b] = -1
		if id, ok := m.ids[fmt.Sprintf("<0x%02X>", b)]; ok {
			m.byteIDs[b] = id
		}
	}
	if c.UnkToken != nil {
		id, ok := m.ids[*c.UnkToken]
		if !ok {
			return nil, fmt.Errorf("unk_token %q is not in the vocabulary", *c.UnkToken)
		}
		m.unk = id
	}

	pairs := c.Merges
	m.merges = make(map[uint64]merge, len(pairs))
	for rank, p := range pairs {
		a, okA := m.ids[p[0]]
		b, okB := m.ids[p[1]]
		ab, okAB := m.ids[p[0]+p[1]]
		if !okA || !okB || !okAB {
			return nil, fmt.Errorf("merge %d (%q %q) uses a token missing from the vocabulary", rank, p[0], p[1])
		}
		k := pairKey(a, b)
		if _, dup := m.merges[k]; !dup {
			m.merges[k] = merge{int32(rank), ab}
		}
	}
	return m, nil
}

// encode appends the ids of one pre-tokenized piece to dst.
func (m *bpe) encode(dst []int64, piece string) []int64 {
	if piece == "" {
		return dst
	}
	if m.ignoreMerges {
		if id, ok := m.ids[piece]; ok {
			return append(dst, int64(id))
		}
	}
	cacheable := len(piece) <= cacheMaxPiece
	if cacheable {
		m.mu.Lock()
		ids, ok := m.cache[piece]
		m.mu.Unlock()
		if ok {
			return append(dst, ids...)
		}
	}
	start := len(dst)
	dst = m.merge(dst, piece)
	if cacheable {
		ids := append([]int64(nil), dst[start:]...)
		m.mu.Lock()
		if len(m.cache) >= cacheMaxEntries {
			clear(m.cache)
		}
		m.cache[piece] = ids
		m.mu.Unlock()
	}
	return dst
}

// symbol is one node of the linked list the merge loop works on.
type symbol struct {
	id         int32 // -1: merged away
	prev, next int32 // -1: none
}

// candidate is a possible merge of the symbol at pos with its successor.
type candidate struct {
	rank int32
	pos  int32
	id   int32 // the merged token
}

func (c candidate) less(d candidate) bool {
	return c.rank < d.rank || (c.rank == d.rank && c.pos < d.pos)
}

// candHeap is a binary min-heap, written out to avoid container/heap's
// interface boxing.
type candHeap []candidate

func (h *candHeap) push(c candidate) {
	*h = append(*h, c)
	s := *h
	i := len(s) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !s[i].less(s[p]) {
			break
		}
		s[i], s[p] = s[p], s[i]
		i = p
	}
}

func (h *candHeap) pop() candidate {
	s := *h
	top := s[0]
	last := len(s) - 1
	s[0] = s[last]
	s = s[:last]
	i := 0
	for {
		l, r, min := 2*i+1, 2*i+2, i
		if l < len(s) && s[l].less(s[min]) {
			min = l
		}
		if r < len(s) && s[r].less(s[min]) {
			min = r
		}
		if min == i {
			break
		}
		s[i], s[min] = s[min], s[i]
		i = min
	}
	*h = s
	return top
}

// merge runs BPE on piece and appends the resulting ids to dst.
func (m *bpe) merge(dst []int64, piece string) []int64 {
	syms := make([]symbol, 0, utf8.RuneCountInString(piece))
	add := func(id int32) {
		syms = append(syms, symbol{id: id, prev: int32(len(syms)) - 1, next: int32(len(syms)) + 1})
	}
	for i, r := range piece {
		size := utf8.RuneLen(r)
		if r == utf8.RuneError {
			_, size = utf8.DecodeRuneInString(piece[i:])
		}
		ch := piece[i : i+size]
		if id, ok := m.ids[ch]; ok {
			add(id)
			continue
		}
		if m.byteFallback {
			ok := true
			for j := 0; j < len(ch); j++ {
				ok = ok && m.byteIDs[ch[j]] >= 0
			}
			if ok {
				for j := 0; j < len(ch); j++ {
					add(m.byteIDs[ch[j]])
				}
				continue
			}
		}
		if m.unk < 0 {
			continue // no way to represent it: dropped, as Hugging Face does without unk_token
		}
		if m.fuseUnk && len(syms) > 0 && syms[len(syms)-1].id == m.unk {
			continue
		}
		add(m.unk)
	}
	if len(syms) == 0 {
		return dst
	}
	syms[len(syms)-1].next = -1

	var h candHeap
	for i := 0; i+1 < len(syms); i++ {
		if mg, ok := m.merges[pairKey(syms[i].id, syms[i+1].id)]; ok {
			h.push(candidate{mg.rank, int32(i), mg.id})
		}
	}
	for len(h) > 0 {
		c := h.pop()
		s := &syms[c.pos]
		if s.id < 0 || s.next < 0 {
			continue
		}
		next := &syms[s.next]
		mg, ok := m.merges[pairKey(s.id, next.id)]
		if !ok || mg.rank != c.rank {
			continue // stale: a neighbour merged since
		}
		s.id = c.id
		next.id = -1
		s.next = next.next
		if s.next >= 0 {
			syms[s.next].prev = c.pos
		}
		if s.prev >= 0 {
			p := syms[s.prev]
			if mg, ok := m.merges[pairKey(p.id, s.id)]; ok {
				h.push(candidate{mg.rank, s.prev, mg.id})
			}
		}
		if s.next >= 0 {
			if mg, ok := m.merges[pairKey(s.id, syms[s.next].id)]; ok {
				h.push(candidate{mg.rank, c.pos, mg.id})
			}
		}
	}
	for i := int32(0); i >= 0; i = syms[i].next {
		dst = append(dst, int64(syms[i].id))
	}
	return dst
}
