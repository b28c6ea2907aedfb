package node

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the node's Prometheus metrics, on a registry of its own that
// libp2p's metrics share (GET /metrics).
type metrics struct {
	reg       *prometheus.Registry
	requests  *prometheus.CounterVec   // API requests by route and status
	latency   *prometheus.HistogramVec // API request time by route
	tokens    prometheus.Counter       // tokens generated through the mesh
	passes    prometheus.Counter       // steps (passes, tokens) this node asked of the mesh
	hops      prometheus.Histogram     // hops per route taken
	failovers prometheus.Counter       // hops re-routed after a failure
}

func newMetrics() *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "infermesh_api_requests_total",
			Help: "Local API requests, by route and HTTP status."}, []string{"route", "status"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "infermesh_api_request_seconds",
			Help: "Local API request time, by route.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)}, []string{"route"}),
		tokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "infermesh_tokens_generated_total",
			Help: "Tokens generated through the mesh for this node's requests."}),
		passes: prometheus.NewCounter(prometheus.CounterOpts{Name: "infermesh_mesh_steps_total",
			Help: "Steps (single passes and generation steps) this node sent through the mesh."}),
		hops: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "infermesh_route_hops",
			Help: "Hops of the routes this node's steps took.", Buckets: []float64{1, 2, 3, 4, 6, 8, 12, 16}}),
		failovers: prometheus.NewCounter(prometheus.CounterOpts{Name: "infermesh_failovers_total",
			Help: "Hops re-routed after a failure during this node's requests."}),
	}
	reg.MustRegister(m.requests, m.latency, m.tokens, m.passes, m.hops, m.failovers,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// gauges registers the metrics read from the node when scraped.
func (m *metrics) gauges(n *Node) {
	gauge := func(name, help string, f func() float64) {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	gauge("infermesh_stage_in_flight", "Steps this node is computing for the mesh now.", func() float64 {
		return float64(n.mesh.StageStats().InFlight)
	})
	gauge("infermesh_stage_sessions", "Generation sessions (KV caches) this node holds.", func() float64 {
		return float64(n.mesh.StageStats().Sessions)
	})
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "infermesh_stage_steps_total",
		Help: "Steps this node computed for the mesh."}, func() float64 { return float64(n.mesh.StageStats().Steps) }))
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "infermesh_stage_busy_total",
		Help: "Requests this node answered busy: compute slots or sessions full, overall or for the sending peer."}, func() float64 { return float64(n.mesh.StageStats().Busy) }))
	gauge("infermesh_connected_peers", "Peers this node is connected to.", func() float64 {
		return float64(len(n.mesh.Host().Network().Peers()))
	})
	gauge("infermesh_served_blocks", "Blocks this node serves, over all models.", func() float64 {
		total := 0
		for _, s := range n.servedSpans() {
			total += s.end - s.start
		}
		return float64(total)
	})
	gauge("infermesh_store_blocks", "Blocks and manifests in this node's store.", func() float64 {
		l, _ := n.own.List()
		return float64(len(l))
	})
}

// observeStep records a step's route and failovers.
func (m *metrics) observeStep(hops, failovers int) {
	m.passes.Inc()
	m.hops.Observe(float64(hops))
	m.failovers.Add(float64(failovers))
}

// handler serves the registry.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// instrument counts and times every API request by its route pattern.
func (m *metrics) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)
		route := r.Pattern
		if route == "" {
			route = "unmatched"
		}
		m.requests.WithLabelValues(route, strconv.Itoa(sw.status)).Inc()
		m.latency.WithLabelValues(route).Observe(time.Since(start).Seconds())
	})
}

// statusWriter remembers the status code; it passes Flush through for
// streamed answers.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
