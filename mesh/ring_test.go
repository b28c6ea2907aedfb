package mesh

import (
	"testing"
	"time"
)

// The token queue never blocks the pusher, hands tokens out in order, and
// reports the end once closed and drained.
func TestTokenQueue(t *testing.T) {
	q := &tokenQueue{ready: make(chan struct{}, 1)}
	const n = 10000 // far more than any buffer: pushes must not block
	pushed := make(chan struct{})
	go func() {
		for i := range n {
			q.push(RingToken{Token: int64(i)})
		}
		q.close()
		close(pushed)
	}()
	select {
	case <-pushed:
	case <-time.After(5 * time.Second):
		t.Fatal("pushes blocked with nobody popping")
	}
	for i := range n {
		tok, ok := q.pop()
		if !ok || tok.Token != int64(i) {
			t.Fatalf("pop %d: %v %v", i, tok.Token, ok)
		}
	}
	if _, ok := q.pop(); ok {
		t.Fatal("a token after the end")
	}
}
