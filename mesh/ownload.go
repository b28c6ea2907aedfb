package mesh

import (
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/infermesh/infermesh/protocol"
)

// ownSessions counts the sessions this node has open through each peer.
// A requester that opens many sessions at once learns of the load they put
// on a hop only from that hop's next answer, too late for the sessions
// opened meanwhile; counting its own keeps them from all taking the same
// replica (as least-request balancers do with their own in-flight counts).
type ownSessions struct {
	mu sync.Mutex
	n  map[peer.ID]int
}

// swap releases the peers of route old and holds those of route new.
func (o *ownSessions) swap(old, new []protocol.Hop) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.swapLocked(old, new)
}

func (o *ownSessions) swapLocked(old, new []protocol.Hop) {
	if o.n == nil {
		o.n = map[peer.ID]int{}
	}
	for _, h := range old {
		if p, err := peer.Decode(h.Peer); err == nil {
			if o.n[p]--; o.n[p] <= 0 {
				delete(o.n, p)
			}
		}
	}
	for _, h := range new {
		if p, err := peer.Decode(h.Peer); err == nil {
			o.n[p]++
		}
	}
}

// WithOwnLoad raises each candidate's load to at least the sessions the
// requester itself has open through it (own): those sessions are work the
// peer has or will soon have, whether or not its last answer or record
// shows them yet. A load that already counts more is left as it is, so
// sessions a fresh answer included are not counted twice.
func WithOwnLoad(cands []RouteCandidate, own map[peer.ID]int) {
	for i := range cands {
		c := &cands[i]
		n := own[c.Peer]
		if have := max(c.Load.InFlight, 0) + max(c.Load.Queued, 0); n > have {
			c.Load.InFlight = max(c.Load.InFlight, 0) + n - have
		}
	}
}
