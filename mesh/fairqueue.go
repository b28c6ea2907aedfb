package mesh

import (
	"context"
	"fmt"
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"
)

// fairQueue hands out a hop's compute slots. Up to slots steps compute at
// once; the rest wait, at most maxWaiting of them, and a freed slot goes to
// the waiting peer that has used the least compute (start-time fair
// queueing by sending peer, charged in measured microseconds).
//
// Why: a peer that floods a hop with costly steps must not make an honest
// peer's cheap decode step wait behind all of them (nor share the CPU
// with them all, as running every step at once would). Under fair
// queueing the light peer's step starts next, as soon as one slot frees,
// whatever the others have queued. A peer idle for a while gets no credit
// for it: its usage is raised to the queue's virtual time when it comes
// back, so it cannot bank compute to burst later.
type fairQueue struct {
	slots      int // steps computing at once
	maxWaiting int // steps waiting for a slot, all peers together
	perPeer    int // steps one peer may have computing or waiting

	mu      sync.Mutex
	running int
	waiting int
	peak    int
	vtime   int64 // the usage of the peer whose step started last
	peers   map[peer.ID]*peerShare
}

type peerShare struct {
	running int
	waiters []chan struct{} // oldest first
	used    int64           // virtual compute time, µs
}

func newFairQueue(slots, maxWaiting, perPeer int) *fairQueue {
	return &fairQueue{slots: slots, maxWaiting: maxWaiting, perPeer: perPeer, peers: map[peer.ID]*peerShare{}}
}

// acquire takes a compute slot for a step from peer p, waiting its turn
// if none is free. busy is set, at once, when p already has perPeer steps
// computing or waiting, or when maxWaiting steps wait already, unless the
// step is held: the next step of a session the hop already holds, which
// waits however many do (see stage.holdStep); err when ctx ends first. On
// success the caller must call release with the step's compute time.
func (q *fairQueue) acquire(ctx context.Context, p peer.ID, held bool) (busy string, err error) {
	q.mu.Lock()
	s := q.peers[p]
	if s == nil {
		if len(q.peers) >= maxSharesTracked {
			q.sweepLocked()
		}
		s = &peerShare{used: q.vtime}
		q.peers[p] = s
	}
	if n := s.running + len(s.waiters); n >= q.perPeer && !held {
		q.mu.Unlock()
		return fmt.Sprintf("%d steps in flight from this peer", n), nil
	}
	if s.running == 0 && len(s.waiters) == 0 {
		s.used = max(s.used, q.vtime) // no credit for idle time
	}
	if q.running < q.slots && q.waiting == 0 {
		q.startLocked(p, s)
		q.mu.Unlock()
		return "", nil
	}
	if q.waiting >= q.maxWaiting && !held {
		q.forgetLocked(p, s)
		busy = fmt.Sprintf("%d steps in flight and %d waiting", q.running, q.waiting)
		q.mu.Unlock()
		return busy, nil
	}
	ready := make(chan struct{})
	s.waiters = append(s.waiters, ready)
	q.waiting++
	q.mu.Unlock()

	select {
	case <-ready:
		return "", nil
	case <-ctx.Done():
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, w := range s.waiters {
		if w == ready {
			s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
			q.waiting--
			q.forgetLocked(p, s)
			return "", ctx.Err()
		}
	}
	// The slot was granted as ctx ended: hand it on.
	q.releaseLocked(p, s, 0)
	return "", ctx.Err()
}

// release returns p's slot, charging p the step's compute time, and
// starts the next waiting step.
func (q *fairQueue) release(p peer.ID, micros int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.releaseLocked(p, q.peers[p], micros)
}

func (q *fairQueue) releaseLocked(p peer.ID, s *peerShare, micros int64) {
	q.running--
	s.running--
	s.used += max(micros, 1)
	q.forgetLocked(p, s)
	for q.running < q.slots && q.waiting > 0 {
		var next peer.ID
		var ns *peerShare
		for id, c := range q.peers {
			if len(c.waiters) == 0 {
				continue
			}
			// Least used first; on a tie, the peer with fewer steps
			// computing, then a fixed order (map order would be random).
			if ns == nil || c.used < ns.used || (c.used == ns.used && (c.running < ns.running || (c.running == ns.running && id < next))) {
				next, ns = id, c
			}
		}
		ready := ns.waiters[0]
		ns.waiters = ns.waiters[1:]
		q.waiting--
		q.startLocked(next, ns)
		close(ready)
	}
}

func (q *fairQueue) startLocked(p peer.ID, s *peerShare) {
	q.vtime = max(q.vtime, s.used)
	s.running++
	q.running++
	q.peak = max(q.peak, q.running)
}

// forgetLocked drops a peer with nothing computing or waiting whose usage
// is no longer ahead of the virtual time (it would be raised to it on
// return anyway), so the table holds only peers that matter.
func (q *fairQueue) forgetLocked(p peer.ID, s *peerShare) {
	if s.running == 0 && len(s.waiters) == 0 && s.used <= q.vtime {
		delete(q.peers, p)
	}
}

// maxSharesTracked bounds the peers whose usage the queue remembers. Past
// it, idle peers are forgotten even when they used more than their share
// lately: many identities can earn a little head start that way, never a
// slot more than the others.
const maxSharesTracked = 4096

func (q *fairQueue) sweepLocked() {
	for id, s := range q.peers {
		if s.running == 0 && len(s.waiters) == 0 {
			delete(q.peers, id)
		}
	}
}

// load reports the steps computing and waiting now, and the most that
// ever computed at once.
func (q *fairQueue) load() (running, waiting, peak int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.running, q.waiting, q.peak
}
