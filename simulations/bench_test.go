package simulations

import (
	"context"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"
)

// BenchmarkScale runs the scale scenario at 100k peers and 1M requests
// (acceptance 3 of issue 7) once, and reports requests and events per
// wall second and the peak heap. Run it with
//
//	go test -run '^$' -bench BenchmarkScale -benchtime 1x ./simulations/
func BenchmarkScale(b *testing.B) {
	sc, err := LoadScenario("scenarios/scale.yaml")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		peak := watchHeap(b)
		t0 := time.Now()
		r, err := Run(context.Background(), sc, RunOptions{})
		if err != nil {
			b.Fatal(err)
		}
		wall := time.Since(t0).Seconds()
		b.ReportMetric(float64(r.Summary.Requests)/wall, "req/s")
		b.ReportMetric(float64(r.Summary.Events)/wall, "events/s")
		b.ReportMetric(float64(peak())/(1<<20), "peak-heap-MiB")
		b.ReportMetric(float64(r.Summary.Completed), "completed")
	}
}

// watchHeap samples the live heap every 50 ms until the returned function
// is called, which returns the highest seen.
func watchHeap(tb testing.TB) func() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	var peakV uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(s)
			peakV = max(peakV, s[0].Value.Uint64())
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	var once bool
	f := func() uint64 {
		if !once {
			once = true
			close(stop)
			<-done
		}
		return peakV
	}
	tb.Cleanup(func() { f() })
	runtime.GC()
	return f
}
