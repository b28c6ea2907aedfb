package simulations

// The event queue: a binary heap ordered by (time, sequence number), so
// that events at the same virtual time run in the order they were
// scheduled and every run of a scenario is the same. Events are plain
// values (no closures, no interfaces), so that a run of tens of millions
// of them allocates little.

type evKind uint8

const (
	evArrival   evKind = iota // the next request arrives
	evHop                     // a request's activations reach hop b (a: request)
	evDone                    // hop b of request a finished its pass
	evResult                  // request a's step result is back at its entry node
	evFail                    // request a's entry node learns hop b failed (x: mesh.FailureKind)
	evRetry                   // request a tries to route again after a pause
	evLeave                   // peer a leaves (x: 1 when it crashes)
	evOnline                  // peer a has loaded its span and joins the mesh
	evJoin                    // a new peer arrives to replace peer a (same class and region)
	evPublish                 // peer a republishes its record
	evRebalance               // peer a runs its rebalancing check
	evMoved                   // peer a has loaded the span it moves to
	evSample                  // the end of a sample interval
)

type event struct {
	t    int64 // virtual ns
	seq  uint64
	a, b int32
	p    int32  // evDone: the peer
	e    uint32 // the request's epoch when scheduled: stale events are dropped
	kind evKind
	x    uint8
}

func (a *event) before(b *event) bool {
	if a.t != b.t {
		return a.t < b.t
	}
	return a.seq < b.seq
}

type eventQueue struct {
	h   []event
	seq uint64
}

func (q *eventQueue) push(ev event) {
	q.seq++
	ev.seq = q.seq
	q.h = append(q.h, ev)
	h := q.h
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if !h[i].before(&h[p]) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func (q *eventQueue) pop() event {
	h := q.h
	top := h[0]
	n := len(h) - 1
	h[0] = h[n]
	h = h[:n]
	for i := 0; ; {
		l, m := 2*i+1, i
		if l < n && h[l].before(&h[m]) {
			m = l
		}
		if r := l + 1; r < n && h[r].before(&h[m]) {
			m = r
		}
		if m == i {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	q.h = h
	return top
}
