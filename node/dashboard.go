package node

// The dashboard: GET / is a page an operator (or an app developer) opens in
// a browser to see this node, its peers, every model's coverage, recent
// requests, and to try a generation. Its files are embedded in the binary;
// the page loads nothing from elsewhere. It is static and holds no data of
// its own: the page reads the API like any client, so it needs no token,
// while the API it calls still does.

import (
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

//go:embed dashboard/index.html dashboard/app.js dashboard/style.css
var dashboardFiles embed.FS

// dashboardPath says whether a request is for the dashboard's static files.
func dashboardPath(p string) bool { return p == "/" || strings.HasPrefix(p, "/dashboard/") }

func dashboardHandler() http.Handler {
	sub, _ := fs.Sub(dashboardFiles, "dashboard")
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// The page talks to this origin only; nothing else may frame or feed it.
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Cache-Control", "no-cache")
		if r.URL.Path == "/" {
			http.ServeFileFS(w, r, sub, "index.html")
			return
		}
		http.StripPrefix("/dashboard/", files).ServeHTTP(w, r)
	})
}
