package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"

	"github.com/infermesh/infermesh/mesh"
	"github.com/infermesh/infermesh/mesh/simnettest"
	"github.com/infermesh/infermesh/shards"
	"github.com/infermesh/infermesh/shards/build"
)

// benchMesh starts a requester and one server per span, on loopback or on
// a simulated network (net non-nil: node i is 127.0.0.(i+1) inside it).
func benchMesh(b *testing.B, m *shards.Model, net *simnettest.Network, spans ...string) (*Node, []*Node) {
	b.Helper()
	var nodes []*Node
	b.Cleanup(func() { closeAll(nodes) })
	start := func(i int, boot []string, serve ...string) *Node {
		dir := b.TempDir()
		cfg := DefaultConfig()
		cfg.Listen, cfg.API = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}, "127.0.0.1:0"
		cfg.NoMDNS, cfg.NoNAT, cfg.DHTMode = true, true, "server"
		cfg.Bootstrap, cfg.Serve, cfg.Threads = boot, serve, 1
		var hostOpts []libp2p.Option
		if net != nil {
			cfg.Listen = []string{simnettest.ListenAddr(i)}
			hostOpts = []libp2p.Option{net.HostOption()}
		}
		if _, err := Init(dir, cfg); err != nil {
			b.Fatal(err)
		}
		n, err := New(context.Background(), cfg, Options{DataDir: dir, Logger: testLogger(), HostOptions: hostOpts})
		if err != nil {
			b.Fatal(err)
		}
		nodes = append(nodes, n)
		return n
	}
	req := start(0, nil)
	boot := []string{req.Status().Addrs[0]}
	var servers []*Node
	for i, s := range spans {
		servers = append(servers, start(i+1, boot, m.Dir+":"+s))
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		cov, err := req.Coverage(context.Background(), m.ID.String())
		if err == nil && cov.Complete && len(cov.Peers) == len(spans) {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("no coverage: %+v %v", cov, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return req, servers
}

func benchGPT(b *testing.B, layers, dim int) *shards.Model {
	b.Helper()
	m, err := build.GPT(build.GPTConfig{Layers: layers, Dim: dim, Seed: 1, Context: 256}, filepath.Join(b.TempDir(), "gpt"))
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// BenchmarkHopOverhead: one pass (batch 1, one token, dim-512 activations)
// through a 3-hop mesh on loopback against the same three spans run in
// sequence in this process, interleaved. Reports both and the time the
// mesh adds per hop.
//
// go test -run '^$' -bench HopOverhead -benchtime 200x ./node/
func BenchmarkHopOverhead(b *testing.B) {
	m := benchGPT(b, 8, 512)
	spans := []string{"0-2", "3-5", "6-9"}
	req, _ := benchMesh(b, m, nil, spans...)
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		b.Fatal(err)
	}
	var local []*shards.Span
	for _, r := range [][2]int{{0, 3}, {3, 6}, {6, 10}} {
		sp, err := rt.LoadSpan(m, r[0], r[1])
		if err != nil {
			b.Fatal(err)
		}
		defer sp.Close()
		local = append(local, sp)
	}
	in := shards.StepInputs(m.Manifest.Decoder, []int64{'a'}, 0)
	ctx := context.Background()
	var tLocal, tMesh time.Duration
	for b.Loop() {
		t0 := time.Now()
		x := in
		for _, sp := range local {
			if x, err = sp.Run(x); err != nil {
				b.Fatal(err)
			}
		}
		t1 := time.Now()
		if _, _, err := req.mesh.Infer(ctx, m.ID, in, mesh.InferOptions{}); err != nil {
			b.Fatal(err)
		}
		tLocal += t1.Sub(t0)
		tMesh += time.Since(t1)
	}
	n := float64(b.N)
	b.ReportMetric(float64(tLocal.Microseconds())/n, "local_us")
	b.ReportMetric(float64(tMesh.Microseconds())/n, "mesh_us")
	b.ReportMetric(float64((tMesh-tLocal).Microseconds())/n/3, "added_us_per_hop")
}

// BenchmarkGenerate3Hops: 32 tokens of greedy generation of the 8-layer
// GPT (dim 256, 512) through 3 hops on loopback against the same model
// decoded in this process, interleaved: tokens/s locally, as a decode ring
// and with the requester's loop, and where a ring token's time goes.
//
// go test -run '^$' -bench Generate3Hops -benchtime 20x ./node/
//
// The -simnet sub-benchmarks run the same QUIC hosts over an in-memory
// packet network with no delay instead of the kernel's UDP loopback: what
// the legs cost without the kernel's packet path on the shared cores.
func BenchmarkGenerate3Hops(b *testing.B) {
	for _, dim := range []int{256, 512} {
		b.Run(fmt.Sprintf("dim-%d", dim), func(b *testing.B) { generate3Hops(b, dim, false) })
	}
	b.Run("dim-256-simnet", func(b *testing.B) { generate3Hops(b, 256, true) })
}

// generate3Hops: local decoding, the decode ring and the requester's loop,
// interleaved in each iteration.
func generate3Hops(b *testing.B, dim int, simnet bool) {
	m := benchGPT(b, 8, dim)
	var net *simnettest.Network
	if simnet {
		net = simnettest.New(func(x, y int) time.Duration { return 0 }, 10_000_000_000)
		defer net.Close()
	}
	req, _ := benchMesh(b, m, net, "0-2", "3-5", "6-9")
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		b.Fatal(err)
	}
	span, err := rt.LoadSpan(m, 0, len(m.Manifest.Blocks))
	if err != nil {
		b.Fatal(err)
	}
	defer span.Close()
	prompt := []int64{'t', 'h', 'e', ' '}
	const tokens = 32
	// Of each ring token's interval (after the first), the hops' compute
	// and the rest: the legs (framing, QUIC, scheduling).
	var ringCompute, ringInterval time.Duration
	failovers := 0 // none expected: a run with some is not a clean measure
	viaMesh := func(loop bool) time.Duration {
		t0 := time.Now()
		res, err := req.Generate(context.Background(), GenerateRequest{Model: m.ID, Prompt: prompt, MaxTokens: tokens,
			Options: mesh.InferOptions{RequesterLoop: loop}}, nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, st := range res.Steps {
			failovers += st.Failovers
		}
		if !loop {
			for _, st := range res.Steps[1:] {
				ringInterval += st.Total
				for _, us := range st.HopMicros {
					ringCompute += time.Duration(us) * time.Microsecond
				}
			}
		}
		return time.Since(t0)
	}
	viaMesh(false) // warm: connections, sessions
	ringCompute, ringInterval, failovers = 0, 0, 0
	var tLocal, tRing, tLoop time.Duration
	for b.Loop() {
		t0 := time.Now()
		sess := span.NewSession()
		dec, _ := shards.NewDecoder(m.Manifest.Decoder, sess, prompt, shards.Sampling{})
		for range tokens {
			if _, err := dec.Next(); err != nil {
				b.Fatal(err)
			}
		}
		sess.Close()
		tLocal += time.Since(t0)
		tRing += viaMesh(false)
		tLoop += viaMesh(true)
	}
	n := float64(b.N * tokens)
	b.ReportMetric(n/tLocal.Seconds(), "local_tok/s")
	b.ReportMetric(n/tRing.Seconds(), "ring_tok/s")
	b.ReportMetric(n/tLoop.Seconds(), "loop_tok/s")
	b.ReportMetric(tLocal.Seconds()/tRing.Seconds(), "ring_vs_local")
	b.ReportMetric(tLocal.Seconds()/tLoop.Seconds(), "loop_vs_local")
	perToken := float64(b.N * (tokens - 1))
	b.ReportMetric(float64(ringCompute.Microseconds())/perToken, "ring_compute_us/token")
	b.ReportMetric(float64((ringInterval-ringCompute).Microseconds())/perToken, "ring_legs_us/token")
	b.ReportMetric(float64(failovers), "failovers")
}

// BenchmarkRingFarRequester: 32-token generations through 3 hops over a
// simulated network, 2 ms one-way between hops, with the requester 2 ms
// from every hop and then 40 ms (switched in the same mesh). Reports the
// per-token interval and time to first token the requester sees, for the
// decode ring and the requester's loop.
//
// go test -run '^$' -bench RingFarRequester -benchtime 5x ./node/
func BenchmarkRingFarRequester(b *testing.B) {
	m := benchGPT(b, 4, 64)
	var far atomic.Bool
	net := simnettest.New(func(x, y int) time.Duration {
		if (x == 0 || y == 0) && far.Load() {
			return 40 * time.Millisecond
		}
		return 2 * time.Millisecond
	}, 1000_000_000)
	defer net.Close()
	req, _ := benchMesh(b, m, net, "0-1", "2-3", "4-5")
	const tokens = 32
	type figures struct{ interval, first time.Duration }
	run := func(loop bool) figures {
		res, err := req.Generate(context.Background(), GenerateRequest{Model: m.ID, Prompt: toTokens("far away"), MaxTokens: tokens,
			Options: mesh.InferOptions{RequesterLoop: loop}}, nil)
		if err != nil {
			b.Fatal(err)
		}
		return figures{(res.Total - res.FirstToken) / (tokens - 1), res.FirstToken}
	}
	run(false) // warm: connections, sessions
	run(true)
	sum := map[string]figures{}
	for b.Loop() {
		for _, f := range []bool{false, true} {
			far.Store(f)
			for _, loop := range []bool{false, true} {
				key := fmt.Sprintf("far=%v loop=%v", f, loop)
				got := run(loop)
				s := sum[key]
				s.interval += got.interval
				s.first += got.first
				sum[key] = s
			}
		}
	}
	far.Store(false)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N) }
	ringNear, ringFar := sum["far=false loop=false"], sum["far=true loop=false"]
	loopNear, loopFar := sum["far=false loop=true"], sum["far=true loop=true"]
	b.ReportMetric(ms(ringNear.interval), "ring_ms/token_near")
	b.ReportMetric(ms(ringFar.interval), "ring_ms/token_far")
	b.ReportMetric(ms(loopNear.interval), "loop_ms/token_near")
	b.ReportMetric(ms(loopFar.interval), "loop_ms/token_far")
	b.ReportMetric(ms(ringNear.first), "ring_ttft_ms_near")
	b.ReportMetric(ms(ringFar.first), "ring_ttft_ms_far")
	b.ReportMetric(ms(loopNear.first), "loop_ttft_ms_near")
	b.ReportMetric(ms(loopFar.first), "loop_ttft_ms_far")
	b.ReportMetric(float64(ringFar.interval)/float64(ringNear.interval), "ring_far/near")
}

// BenchmarkPipelining: generations through 3 hops over a simulated network
// with 5 ms one-way latency on every link: throughput with 16 generations
// at once against one at a time.
//
// go test -run '^$' -bench Pipelining -benchtime 1x ./node/
func BenchmarkPipelining(b *testing.B) {
	m := benchGPT(b, 4, 64)
	net := simnettest.New(func(a, c int) time.Duration { return 5 * time.Millisecond }, 1000_000_000)
	defer net.Close()
	req, _ := benchMesh(b, m, net, "0-1", "2-3", "4-5")
	const tokens = 16
	run := func(concurrent int) float64 {
		var wg sync.WaitGroup
		start := time.Now()
		for i := range concurrent {
			wg.Go(func() {
				prompt := toTokens(fmt.Sprintf("prompt %02d", i))
				if _, err := req.Generate(context.Background(), GenerateRequest{Model: m.ID, Prompt: prompt, MaxTokens: tokens}, nil); err != nil {
					b.Error(err)
				}
			})
		}
		wg.Wait()
		return float64(concurrent*tokens) / time.Since(start).Seconds()
	}
	for b.Loop() {
		run(2) // warm: connections, sessions
		one := run(1)
		sixteen := run(16)
		b.ReportMetric(one, "tok/s_x1")
		b.ReportMetric(sixteen, "tok/s_x16")
		b.ReportMetric(sixteen/one, "ratio")
	}
}

func toTokens(s string) []int64 {
	out := make([]int64, len(s))
	for i := range len(s) {
		out[i] = int64(s[i])
	}
	return out
}

// BenchmarkJoinFiveNodes: a publisher holds the 8-layer, dim-512 GPT (98
// MB); five empty nodes join one after another with only its ID, each
// fetching, verifying, loading and measuring up to 3 blocks. Reports the
// time from the first start until the five serve a complete model.
//
// go test -run '^$' -bench JoinFiveNodes -benchtime 1x ./node/
func BenchmarkJoinFiveNodes(b *testing.B) {
	m := benchGPT(b, 8, 512)
	for b.Loop() {
		publisher := startTestNode(b, nil)
		nodes := []*Node{publisher}
		if _, _, err := publisher.Publish(context.Background(), m.Dir); err != nil {
			b.Fatal(err)
		}
		boot := []string{publisher.Status().Addrs[0]}
		start := time.Now()
		for range 5 {
			nodes = append(nodes, startJoiner(b, boot, m.ID.String(), 3, time.Hour))
		}
		for {
			cov, err := publisher.Coverage(context.Background(), m.ID.String())
			if err == nil && cov.Complete {
				break
			}
			if time.Since(start) > time.Minute {
				b.Fatal("no coverage after a minute")
			}
			time.Sleep(20 * time.Millisecond)
		}
		b.ReportMetric(time.Since(start).Seconds(), "s_to_serving")
		closeAll(nodes)
	}
}

// BenchmarkAPILoad: 200 concurrent clients POST /v1/infer (one token, the
// 4-layer dim-64 GPT over 3 hops on loopback) for 30 s. Reports requests/s,
// p50/p99 latency, how many answers were 429 (busy) and how many were other
// errors (must be 0), and goroutine and heap growth after. Then, one caller
// at a time, the HTTP layer's overhead against calling Node.Infer directly,
// interleaved in the same run.
//
// go test -run '^$' -bench APILoad -benchtime 1x ./node/
func BenchmarkAPILoad(b *testing.B) {
	m := benchGPT(b, 4, 64)
	req, _ := benchMesh(b, m, nil, "0-1", "2-3", "4-5")
	in := shards.StepInputs(m.Manifest.Decoder, []int64{'a'}, 0)
	body, err := json.Marshal(InferRequest{Model: m.ID.String(), Inputs: in})
	if err != nil {
		b.Fatal(err)
	}
	url := "http://" + req.APIAddr() + "/v1/infer"
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	call := func() (int, error) {
		resp, err := client.Post(url, "application/json", bytes.NewReader(body))
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	for b.Loop() {
		runtime.GC()
		g0 := runtime.NumGoroutine()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		heap0 := ms.HeapInuse

		const clients, duration = 200, 30 * time.Second
		var mu sync.Mutex
		var lat []time.Duration
		statuses := map[int]int{}
		failures := 0
		stop := time.Now().Add(duration)
		var wg sync.WaitGroup
		for range clients {
			wg.Go(func() {
				for time.Now().Before(stop) {
					t0 := time.Now()
					code, err := call()
					d := time.Since(t0)
					mu.Lock()
					if err != nil {
						failures++
					} else {
						statuses[code]++
						if code == http.StatusOK {
							lat = append(lat, d)
						}
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		other := failures
		for code, k := range statuses {
			if code != http.StatusOK && code != http.StatusTooManyRequests {
				other += k
			}
		}
		slices.Sort(lat)
		pct := func(p int) float64 { return float64(lat[min(len(lat)-1, len(lat)*p/100)].Microseconds()) / 1000 }
		b.ReportMetric(float64(statuses[http.StatusOK])/duration.Seconds(), "ok_req/s")
		b.ReportMetric(pct(50), "p50_ms")
		b.ReportMetric(pct(99), "p99_ms")
		b.ReportMetric(float64(statuses[http.StatusTooManyRequests]), "busy_429")
		b.ReportMetric(float64(other), "errors")

		// Let connections close and passes in flight at the end finish
		// (bounded), then compare with before.
		client.CloseIdleConnections()
		for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > g0 && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
		}
		runtime.GC()
		runtime.ReadMemStats(&ms)
		b.ReportMetric(float64(runtime.NumGoroutine()-g0), "goroutines_grown")
		b.ReportMetric((float64(ms.HeapInuse)-float64(heap0))/(1<<20), "heap_MB_grown")

		b.ReportMetric(httpOverhead(b, req, m, 300), "http_overhead_%")
	}
}

// httpOverhead times calls one at a time, alternating Node.Infer and POST
// /v1/infer with the same one-token input, and returns how much longer the
// HTTP calls took, in percent.
func httpOverhead(b *testing.B, req *Node, m *shards.Model, calls int) float64 {
	in := shards.StepInputs(m.Manifest.Decoder, []int64{'a'}, 0)
	body, err := json.Marshal(InferRequest{Model: m.ID.String(), Inputs: in})
	if err != nil {
		b.Fatal(err)
	}
	url := "http://" + req.APIAddr() + "/v1/infer"
	var direct, viaHTTP time.Duration
	for range calls {
		t0 := time.Now()
		if _, err := req.Infer(context.Background(), m.ID, in, mesh.InferOptions{}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		resp, err := http.Post(url, "application/json", bytes.NewReader(body))
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("HTTP %v %v", resp, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		direct += t1.Sub(t0)
		viaHTTP += time.Since(t1)
	}
	b.ReportMetric(float64(direct.Microseconds())/float64(calls), "direct_us")
	b.ReportMetric(float64(viaHTTP.Microseconds())/float64(calls), "http_us")
	return (float64(viaHTTP)/float64(direct) - 1) * 100
}

// BenchmarkAPIOverhead: the HTTP layer's overhead on a one-token pass of
// the 8-layer, dim-512 GPT over 3 hops on loopback.
//
// go test -run '^$' -bench APIOverhead -benchtime 1x ./node/
func BenchmarkAPIOverhead(b *testing.B) {
	m := benchGPT(b, 8, 512)
	req, _ := benchMesh(b, m, nil, "0-2", "3-5", "6-9")
	for b.Loop() {
		b.ReportMetric(httpOverhead(b, req, m, 200), "http_overhead_%")
	}
}

// BenchmarkImportedLlama3Hops: greedy decoding of an imported
// Llama-architecture model, in this process against 3 hops on loopback; 32
// tokens after an 8-token prompt. The model is the imported one in
// $INFERMESH_BENCH_HF (make bench imports a checkpoint of Llama 3.2 1B's
// shapes there), else a 4-layer one imported here. A small model's runs
// are interleaved; a big one is decoded locally first and unloaded before
// the mesh loads it (two copies of Llama 3.2 1B in f32 would not fit in
// 24 GiB beside each other).
//
// INFERMESH_BENCH_HF=DIR go test -run '^$' -bench ImportedLlama3Hops -benchtime 1x -timeout 30m ./node/
func BenchmarkImportedLlama3Hops(b *testing.B) {
	var m *shards.Model
	if dir := os.Getenv("INFERMESH_BENCH_HF"); dir != "" {
		var err error
		if m, err = shards.OpenModel(dir); err != nil {
			b.Fatal(err)
		}
	} else {
		m = importLlama(b, 4)
	}
	big := m.Manifest.TotalSize() > 1<<30
	n := len(m.Manifest.Blocks)
	prompt := []int64{128000, 9906, 11, 1917, 0, 3639, 374, 264} // "<|begin_of_text|>Hello, world! What is a"
	const tokens = 32
	rt, err := shards.OpenRuntime(shards.RuntimeConfig{IntraOpThreads: 1})
	if err != nil {
		b.Fatal(err)
	}
	span, err := rt.LoadSpan(m, 0, n)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { span.Close() }()
	local := func() time.Duration {
		t0 := time.Now()
		sess := span.NewSession()
		defer sess.Close()
		dec, err := shards.NewDecoder(m.Manifest.Decoder, sess, prompt, shards.Sampling{})
		if err != nil {
			b.Fatal(err)
		}
		for range tokens {
			if _, err := dec.Next(); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(t0)
	}
	var tLocal, tMesh time.Duration
	if big {
		for range b.N {
			tLocal += local()
		}
		span.Close()
	}
	req, _ := benchMesh(b, m, nil, fmt.Sprintf("0-%d", n/3-1), fmt.Sprintf("%d-%d", n/3, 2*n/3-1), fmt.Sprintf("%d-%d", 2*n/3, n-1))
	b.ResetTimer()
	for b.Loop() {
		if !big {
			tLocal += local()
		}
		t1 := time.Now()
		// Node.Generate stops at an eos token: count what it made.
		res, err := req.Generate(context.Background(), GenerateRequest{Model: m.ID, Prompt: prompt, MaxTokens: tokens}, nil)
		if err != nil {
			b.Fatal(err)
		}
		if len(res.Tokens) != tokens {
			b.Fatalf("the mesh generated %d tokens (an eos token?), want %d", len(res.Tokens), tokens)
		}
		tMesh += time.Since(t1)
	}
	k := float64(b.N * tokens)
	b.ReportMetric(k/tLocal.Seconds(), "local_tok/s")
	b.ReportMetric(k/tMesh.Seconds(), "mesh_tok/s")
	b.ReportMetric(tLocal.Seconds()/tMesh.Seconds(), "mesh/local")
}
