package node

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

// FuzzAPIGuard: whatever Host, Origin, method and Content-Type a request
// carries, the guard of a token-less API listening on 127.0.0.1:8080 lets
// it through only when the Host names the API (localhost or a loopback IP,
// port 8080), its Origin, if any, is an http origin naming the API too,
// and a body-carrying request is JSON. Issue 12, findings 5 (cross-site
// requests) and the rebinding of Host.
func FuzzAPIGuard(f *testing.F) {
	f.Add("127.0.0.1:8080", "", "POST", "application/json")
	f.Add("localhost:8080", "http://localhost:8080", "POST", "application/json; charset=utf-8")
	f.Add("127.0.0.1:8080", "http://evil.example", "POST", "text/plain")
	f.Add("evil.example:8080", "", "GET", "")
	f.Add("127.0.0.1.evil.example:8080", "http://127.0.0.1:8080", "POST", "application/json")
	f.Add("[::1]:8080", "http://[::1]:8080", "PUT", "application/problem+json")
	f.Add("localhost.:8080", "null", "POST", "application/json")
	f.Add("127.0.0.1", "https://127.0.0.1:8080", "GET", "")
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8080}
	g := newAPIGuard("127.0.0.1:8080", addr, false)
	reached := false
	h := g.wrap(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { reached = true }))
	f.Fuzz(func(t *testing.T, host, origin, method, contentType string) {
		r, err := http.NewRequest("GET", "http://127.0.0.1:8080/v1/status", nil)
		if err != nil {
			t.Fatal(err)
		}
		r.Method, r.Host = method, host
		if origin != "" {
			r.Header.Set("Origin", origin)
		}
		r.Header.Set("Content-Type", contentType)
		reached = false
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if !reached {
			if w.Code != http.StatusForbidden && w.Code != http.StatusUnsupportedMediaType {
				t.Fatalf("refused with %d", w.Code)
			}
			return
		}
		if !namesLoopbackAPI(host) {
			t.Fatalf("Host %q let through", host)
		}
		if origin != "" {
			u, err := url.Parse(origin)
			if err != nil || u.Scheme != "http" || !(strings.EqualFold(u.Host, host) || namesLoopbackAPI(u.Host)) {
				t.Fatalf("Origin %q let through (Host %q)", origin, host)
			}
		}
		if method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch {
			if !strings.Contains(strings.ToLower(contentType), "json") {
				t.Fatalf("%s with Content-Type %q let through", method, contentType)
			}
		}
	})
}

// namesLoopbackAPI is the fuzz oracle's own reading of "this names the API
// on 127.0.0.1:8080": localhost or a loopback IP literal, port 8080.
func namesLoopbackAPI(hostport string) bool {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil || p != "8080" {
		return false
	}
	h = strings.TrimSuffix(strings.ToLower(h), ".")
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}
