package mesh

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// waitTurn acquires in the background and reports on the channel when the
// slot is granted (or why not).
func waitTurn(q *fairQueue, ctx context.Context, p peer.ID) <-chan error {
	return waitTurnHeld(q, ctx, p, false)
}

func waitTurnHeld(q *fairQueue, ctx context.Context, p peer.ID, held bool) <-chan error {
	done := make(chan error, 1)
	go func() {
		busy, err := q.acquire(ctx, p, held)
		if busy != "" {
			err = errors.New("busy: " + busy)
		}
		done <- err
	}()
	return done
}

func waitingIs(t *testing.T, q *fairQueue, n int) {
	t.Helper()
	for range 500 {
		if _, w, _ := q.load(); w == n {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	_, w, _ := q.load()
	t.Fatalf("%d steps waiting, want %d", w, n)
}

func granted(t *testing.T, c <-chan error) bool {
	t.Helper()
	select {
	case err := <-c:
		if err != nil {
			t.Fatalf("acquire: %v", err)
		}
		return true
	case <-time.After(20 * time.Millisecond):
		return false
	}
}

// A peer with many costly steps queued does not hold up another peer's
// one step: the freed slot goes to the peer that used less.
func TestFairQueueLightPeerGoesNext(t *testing.T) {
	q := newFairQueue(1, 16, 8)
	ctx := context.Background()
	heavy, light := peer.ID("heavy"), peer.ID("light")
	if busy, err := q.acquire(ctx, heavy, false); busy != "" || err != nil {
		t.Fatal(busy, err)
	}
	var heavyTurns []<-chan error
	for range 5 {
		heavyTurns = append(heavyTurns, waitTurn(q, ctx, heavy))
	}
	waitingIs(t, q, 5)
	lightTurn := waitTurn(q, ctx, light)
	waitingIs(t, q, 6)

	q.release(heavy, 5000)
	if !granted(t, lightTurn) {
		t.Fatal("the light peer's step did not get the freed slot")
	}
	for _, c := range heavyTurns {
		if granted(t, c) {
			t.Fatal("a heavy step started while the slot was taken")
		}
	}
	// The light peer, charged little, goes first again next time; the
	// heavy peer's steps run, one at a time, when it has nothing waiting.
	q.release(light, 100)
	n := 0
	for range 5 { // a peer's own steps start in the order they queued, not heavyTurns' order
		for _, c := range heavyTurns {
			if granted(t, c) {
				n++
				q.release(heavy, 5000)
			}
		}
	}
	if n != 5 {
		t.Fatalf("%d of 5 heavy steps ran", n)
	}
	if r, w, peak := q.load(); r != 0 || w != 0 || peak != 1 {
		t.Fatalf("running %d waiting %d peak %d, want 0 0 1", r, w, peak)
	}
}

// Past the peer's quota, or the queue's room, the answer is busy at once.
func TestFairQueueBusy(t *testing.T) {
	q := newFairQueue(1, 2, 2)
	ctx := context.Background()
	a, b, c := peer.ID("a"), peer.ID("b"), peer.ID("c")
	if busy, _ := q.acquire(ctx, a, false); busy != "" {
		t.Fatal(busy)
	}
	turnA := waitTurn(q, ctx, a)
	waitingIs(t, q, 1)
	if busy, _ := q.acquire(ctx, a, false); !strings.Contains(busy, "from this peer") {
		t.Fatalf("a third step from one peer with quota 2: %q", busy)
	}
	turnB := waitTurn(q, ctx, b)
	waitingIs(t, q, 2)
	if busy, _ := q.acquire(ctx, c, false); !strings.Contains(busy, "waiting") {
		t.Fatalf("a step past the queue's room: %q", busy)
	}
	// b has used nothing, a one step: b goes first.
	q.release(a, 10)
	if !granted(t, turnB) || granted(t, turnA) {
		t.Fatal("b's step should start before a's second")
	}
	q.release(b, 10)
	if !granted(t, turnA) {
		t.Fatal("a's second step never started")
	}
	q.release(a, 10)
	// c, turned away, is not remembered.
	if _, ok := q.peers[c]; ok || len(q.peers) != 2 {
		t.Fatalf("peers tracked: %v", q.peers)
	}
}

// A held step (the next step of a session the hop holds) waits past the
// peer's quota and the queue's room, and still takes its fair turn; a
// step that is not held is then refused.
func TestFairQueueHeldStepsWait(t *testing.T) {
	q := newFairQueue(1, 1, 1)
	ctx := context.Background()
	a, b, c := peer.ID("a"), peer.ID("b"), peer.ID("c")
	if busy, _ := q.acquire(ctx, a, false); busy != "" {
		t.Fatal(busy)
	}
	turnA := waitTurnHeld(q, ctx, a, true) // past a's quota of 1
	waitingIs(t, q, 1)
	turnB := waitTurnHeld(q, ctx, b, true) // past the queue's room of 1
	waitingIs(t, q, 2)
	if busy, _ := q.acquire(ctx, c, false); !strings.Contains(busy, "waiting") {
		t.Fatalf("a step that is not held, past the queue's room: %q", busy)
	}
	q.release(a, 10)
	if !granted(t, turnB) || granted(t, turnA) {
		t.Fatal("b's held step should start before a's")
	}
	q.release(b, 10)
	if !granted(t, turnA) {
		t.Fatal("a's held step never started")
	}
	q.release(a, 10)
}

// A step whose deadline passes while it waits leaves the queue, and the
// slot goes to the next.
func TestFairQueueDeadlineWhileWaiting(t *testing.T) {
	q := newFairQueue(1, 4, 4)
	a, b := peer.ID("a"), peer.ID("b")
	if busy, _ := q.acquire(context.Background(), a, false); busy != "" {
		t.Fatal(busy)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := q.acquire(ctx, b, false); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("acquire past its deadline: %v", err)
	}
	if _, w, _ := q.load(); w != 0 {
		t.Fatalf("%d steps still waiting", w)
	}
	turn := waitTurn(q, context.Background(), b)
	waitingIs(t, q, 1)
	q.release(a, 1)
	if !granted(t, turn) {
		t.Fatal("b's later step never started")
	}
}

// A peer that was idle while others computed starts at the queue's
// virtual time: it cannot bank its idle time and then hold the slots.
func TestFairQueueNoCreditForIdle(t *testing.T) {
	q := newFairQueue(1, 8, 8)
	ctx := context.Background()
	busyPeer, late := peer.ID("busy"), peer.ID("late")
	for range 10 {
		if b, _ := q.acquire(ctx, busyPeer, false); b != "" {
			t.Fatal(b)
		}
		q.release(busyPeer, 1000)
	}
	if b, _ := q.acquire(ctx, busyPeer, false); b != "" {
		t.Fatal(b)
	}
	lateTurns := []<-chan error{waitTurn(q, ctx, late)}
	waitingIs(t, q, 1)
	lateTurns = append(lateTurns, waitTurn(q, ctx, late))
	waitingIs(t, q, 2)
	busyTurn := waitTurn(q, ctx, busyPeer)
	waitingIs(t, q, 3)
	// The late peer starts level with the busy one (not 10 steps behind):
	// after one step of its own at the same cost, the busy peer's turn.
	q.release(busyPeer, 1000)
	if !granted(t, lateTurns[0]) {
		t.Fatal("the late peer's first step did not start")
	}
	q.release(late, 2000)
	if !granted(t, busyTurn) || granted(t, lateTurns[1]) {
		t.Fatal("the late peer kept the slot as if it had credit for its idle time")
	}
	q.release(busyPeer, 1000)
	if !granted(t, lateTurns[1]) {
		t.Fatal("the late peer's second step never started")
	}
	q.release(late, 1)
}
