package mesh

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// FuzzFitBlocks: whatever spans peers claim, a model's block count is the
// manifest's when known, else this node's own, else one that the most
// well-formed claims agree on (issue 12, finding 2: one record never
// changes what the model is).
func FuzzFitBlocks(f *testing.F) {
	f.Add(8, 0, []byte{8, 0, 4, 8, 4, 8, 200, 0, 2})
	f.Add(0, 0, []byte{8, 0, 4, 8, 4, 8, 200, 0, 2})
	f.Add(0, 8, []byte{255, 0, 1})
	f.Add(0, 0, []byte{})
	f.Fuzz(func(t *testing.T, manifest, mine int, claims []byte) {
		var spans []protocol.ServedSpan
		for i := 0; i+2 < len(claims) && len(spans) < 64; i += 3 {
			blocks, start, end := int(claims[i]), int(claims[i+1]), int(claims[i+2])
			s := protocol.ServedSpan{Blocks: blocks, Start: start, End: end}
			if end > start && end-start < 256 {
				s.BlockMicros = make([]float64, end-start)
			}
			spans = append(spans, s)
		}
		got := FitBlocks(manifest, mine, spans)
		switch {
		case manifest > 0:
			if got != manifest {
				t.Fatalf("manifest says %d, FitBlocks %d", manifest, got)
			}
			return
		case mine > 0:
			if got != mine {
				t.Fatalf("this node's span says %d, FitBlocks %d", mine, got)
			}
			return
		}
		votes := map[int]int{}
		for _, s := range spans {
			if SpanFits(s, s.Blocks) {
				votes[s.Blocks]++
			}
		}
		most := 0
		for _, v := range votes {
			most = max(most, v)
		}
		if most == 0 {
			if got != 0 {
				t.Fatalf("no well-formed claim, FitBlocks %d", got)
			}
			return
		}
		if votes[got] != most {
			t.Fatalf("FitBlocks %d has %d claims, another count %d", got, votes[got], most)
		}
	})
}

// FuzzAccusations: whatever hops report about each other and whatever the
// requester later sees, a peer is a liar only when more of its
// accusations were refuted than confirmed, and never for accusations that
// all came true (issue 12, finding 3).
func FuzzAccusations(f *testing.F) {
	f.Add([]byte{0, 1, 2, 2, 1, 0, 0, 2, 3, 3, 2})
	f.Add([]byte{0, 0, 1, 1, 1, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		var a Accusations
		peers := []peer.ID{"p0", "p1", "p2", "p3"}
		now := time.Unix(1e9, 0)
		type counts struct{ right, wrong int }
		settled := map[peer.ID]*counts{}
		pending := map[peer.ID][]peer.ID{} // by accused: accusers, oldest first
		for i := 0; i+2 < len(ops) && i < 3*500; i += 3 {
			x, y := peers[ops[i+1]%4], peers[ops[i+2]%4]
			now = now.Add(time.Second)
			switch ops[i] % 3 {
			case 0:
				a.Accuse(x, y, now)
				list := append(pending[y], x)
				if len(list) > maxPendingAccusations {
					list = list[1:]
				}
				pending[y] = list
			case 1, 2:
				right := ops[i]%3 == 1
				if right {
					a.Confirm(y, now)
				} else {
					a.Refute(y, now)
				}
				for _, by := range pending[y] {
					c := settled[by]
					if c == nil {
						c = &counts{}
						settled[by] = c
					}
					if right {
						c.right++
					} else {
						c.wrong++
					}
				}
				delete(pending, y)
			}
			for _, p := range peers {
				c := settled[p]
				want := c != nil && c.wrong > c.right
				if got := a.Liar(p); got != want {
					t.Fatalf("op %d: Liar(%s) = %v, accusations settled %+v", i/3, p, got, c)
				}
			}
		}
	})
}
