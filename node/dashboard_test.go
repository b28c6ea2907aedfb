package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath finds the browser the dashboard test drives: $CHROMIUM (the
// Makefile sets it, after installing Debian's chromium when missing), else
// chromium on the PATH.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{os.Getenv("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"} {
		if name == "" {
			continue
		}
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("no Chromium to drive: `make browser` installs Debian's chromium, or set CHROMIUM=/path/to/chrome")
	return ""
}

// Acceptance 2 of issue 6: a real headless browser opens the dashboard of
// a live 3-node mesh, sees every block covered, runs a generation from the
// page and sees the tokens stream in, one by one, and the request appear
// with its route. A screenshot is saved under the test's artifacts
// (go test -artifacts keeps it).
func TestDashboardInABrowser(t *testing.T) {
	exe := chromiumPath(t)
	tm := startTestMesh(t, "0-4", "5-9")
	model := tm.model.ID.String()
	base := "http://" + tm.requester.APIAddr()

	// What greedy decoding of the prompt gives, asked straight from the API:
	// the page must show the same text.
	const prompt, maxTokens = "hello from the dashboard", 48
	var want GenerateResponse
	postJSON(t, tm.requester, "/v1/generate", map[string]any{"model": model, "prompt": prompt, "max_tokens": maxTokens}, &want)

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox, chromedp.Headless,
		chromedp.DisableGPU, chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-dev-shm-usage", true),
		// This machine's network is closed: nothing that reaches out (QUIC
		// probes, component updates, sync) may slow the browser down.
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1400, 1100))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	ctx, cancelTab := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	defer cancelTab()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()

	// eval runs a script that yields a string.
	eval := func(expr string) (string, error) { return chromedp.Run(ctx, chromedp.Evaluate[string](expr)) }
	sel := `section.model[data-model="` + model + `"]`
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/"), chromedp.WaitVisible(sel+`[data-complete="true"]`)); err != nil {
		t.Fatalf("dashboard never showed the model covered: %v", err)
	}
	facts, err := eval(`const m = document.querySelector('` + sel + `');
		[m.dataset.blocks, m.dataset.covered, m.querySelectorAll('th.block.uncovered').length,
		 m.querySelectorAll('tbody tr').length, m.querySelectorAll('td.cell.served[class*="load"]').length].join(" ")`)
	n := len(tm.model.Manifest.Blocks)
	// blocks, covered, uncovered heads, peer rows, served cells coloured by load
	if want := fmt.Sprintf("%d %d 0 2 %d", n, n, n); err != nil || facts != want {
		t.Fatalf("coverage on the page: %q, want %q (blocks, covered, uncovered, peer rows, coloured cells) %v", facts, want, err)
	}

	// Run a greedy generation from the page, recording every change of the
	// token count as it happens (a MutationObserver in the page).
	steps := []chromedp.Action[chromedp.Void]{
		chromedp.WaitEnabled("#gen-go"),
		chromedp.SetValue("#gen-model", model),
		chromedp.SetValue("#gen-prompt", prompt),
		chromedp.SetValue("#gen-max", strconv.Itoa(maxTokens)),
		chromedp.SetValue("#gen-temp", "0"),
		chromedp.Evaluate[chromedp.Void](`window.ticks = [];
			new MutationObserver(() => window.ticks.push([performance.now(), Number(document.getElementById("gen-output").dataset.tokens)]))
				.observe(document.getElementById("gen-output"), {attributes: true, attributeFilter: ["data-tokens"]})`),
		chromedp.Click("#gen-go"),
		chromedp.WaitVisible(`#gen-output:not([data-state="running"])`),
	}
	for i, st := range steps {
		sctx, c := context.WithTimeout(ctx, 15*time.Second)
		err = chromedp.Do(sctx, st)
		c()
		if err != nil {
			page, _ := eval(`document.getElementById("gen-output").dataset.state + ": " + document.getElementById("gen-stats").textContent`)
			t.Fatalf("generating from the page, step %d: %v (page: %s)", i, err, page)
		}
	}
	state, _ := eval(`document.getElementById("gen-output").dataset.state`)
	text, _ := eval(`document.getElementById("gen-output").textContent`)
	stats, _ := eval(`document.getElementById("gen-stats").textContent`)
	ticks, err := chromedp.Run(ctx, chromedp.Evaluate[[][2]float64](`window.ticks`))
	if err != nil {
		t.Fatal(err)
	}
	if state != "done" {
		t.Fatalf("the page's generation ended %q: %s", state, stats)
	}
	toks, err := chromedp.Run(ctx, chromedp.Evaluate[[]int64](`window.genTokens`))
	if err != nil || !slices.Equal(toks, want.Tokens) {
		t.Fatalf("the page got tokens %v; the API generates %v (%v)", toks, want.Tokens, err)
	}
	if len(text) == 0 || text != want.Text {
		t.Fatalf("the page shows %q; the API generates %q", text, want.Text)
	}
	// Streamed: the count rose through intermediate values over time, not
	// all at once at the end.
	var seen []float64
	for _, tk := range ticks {
		if tk[1] > 0 && tk[1] < maxTokens && (len(seen) == 0 || seen[len(seen)-1] != tk[1]) {
			seen = append(seen, tk[1])
		}
	}
	if len(seen) < 3 || ticks[len(ticks)-1][0] <= ticks[0][0] {
		t.Fatalf("tokens did not stream in: token counts seen %v (ticks %v)", seen, ticks)
	}
	t.Logf("the page streamed %d tokens, seen at %d intermediate counts over %.0f ms; stats: %s",
		maxTokens, len(seen), ticks[len(ticks)-1][0]-ticks[0][0], stats)

	// The generation shows among the recent requests, with its two hops.
	if err := chromedp.Do(ctx, chromedp.WaitVisible(`#req-rows tr[data-kind="generate"][data-status="200"]`)); err != nil {
		t.Fatalf("the generation never showed among the recent requests: %v", err)
	}
	hops, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelector('#req-rows tr[data-kind="generate"]').querySelectorAll('.hop').length`))
	if err != nil || hops != 2 {
		t.Fatalf("recent requests: %d hops shown for the generation, want 2 (%v)", hops, err)
	}

	shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100: PNG
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.ArtifactDir(), "dashboard.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes)", path, len(shot))

	// The page loaded nothing but its own files and the API.
	foreign, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](`performance.getEntriesByType("resource").map(e => e.name).filter(u => !u.startsWith(location.origin))`))
	if err != nil {
		t.Fatal(err)
	}
	if len(foreign) > 0 {
		b, _ := json.Marshal(foreign)
		t.Fatalf("the dashboard loaded resources from elsewhere: %s", b)
	}
}
