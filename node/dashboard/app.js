// The operator's dashboard: polls the node's own API every few seconds and
// draws it. No framework and no CDN: this file, the page and its style are
// embedded in the node. Every string from the mesh (peer IDs, model names,
// errors) goes into the page as text, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

// el builds an element: el("td", {class: "x"}, "text", child, ...).
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-") || k === "title" || k === "colspan" || k === "value") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}

const short = (id) => (id && id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id || "");
const ms = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + " ms";

// api calls the node's API; when the node wants a token (its API listens
// beyond loopback), the page asks for it once and keeps it for the tab.
async function api(path, init) {
  init = init || {};
  const headers = Object.assign({}, init.headers);
  const token = sessionStorage.getItem("infermesh-token");
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, Object.assign({}, init, { headers }));
  if (resp.status === 401 && !init.retried) {
    const t = window.prompt("This node's API needs its token (infermesh node prints where it is):");
    if (t) {
      sessionStorage.setItem("infermesh-token", t.trim());
      return api(path, Object.assign({}, init, { retried: true }));
    }
  }
  return resp;
}

async function getJSON(path) {
  const resp = await api(path);
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error((body && body.error && body.error.message) || resp.status + " " + resp.statusText);
  return body;
}

function setLive(ok, text) {
  const b = $("live");
  b.textContent = text;
  b.className = "badge " + (ok ? "ok" : "bad");
}

function drawNode(st) {
  $("node-id").textContent = st.id;
  document.title = "infermesh " + short(st.id);
  const dl = $("node-facts");
  dl.replaceChildren();
  const row = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, v));
  row("version", st.version);
  row("serving", st.serving.length === 0 ? "nothing (requester only)" :
    st.serving.map((s) => short(s.model) + " blocks " + s.start + "–" + (s.end - 1) + " of " + s.blocks).join("; "));
  row("load", st.load.in_flight + " running, " + st.load.queued + " queued");
  row("accelerators", (st.accelerators || []).map((a) => a.kind + (a.name ? " " + a.name : "") +
    (a.memory_bytes ? " (" + (a.memory_bytes / 2 ** 30).toFixed(1) + " GiB)" : "")).join(", ") || "none reported");
  row("connected peers", String(st.connected_peers));
  row("addresses", el("span", { class: "mono" }, (st.addrs || []).join("\n")));
}

const loadClass = (l) => "load" + Math.min(4, (l.in_flight || 0) + (l.queued || 0));

// drawCoverage draws one model: a grid of its servers x blocks.
function drawCoverage(model, cov) {
  const m = model.infermesh;
  const blocks = cov ? cov.blocks : m.blocks;
  const covered = blocks - (cov ? cov.uncovered.length : m.uncovered.length);
  const sec = el("section", { class: "model", "data-model": model.id, "data-blocks": blocks,
    "data-covered": covered, "data-complete": String(!!(cov ? cov.complete : m.complete)) });
  const badge = el("span", { class: "badge " + ((cov ? cov.complete : m.complete) ? "ok" : "bad") },
    covered + "/" + blocks + " blocks covered");
  sec.append(el("h3", {}, (m.name || "model") + " ", el("span", { class: "mono muted" }, model.id), " ", badge,
    m.text ? el("span", { class: "badge" }, "text") : null));
  if (!cov || blocks === 0) {
    sec.append(el("p", { class: "muted" }, "No server known for this model."));
    return sec;
  }
  const uncovered = new Set(cov.uncovered);
  const head = el("tr", {}, el("th", {}, "peer"));
  for (let b = 0; b < blocks; b++) {
    head.append(el("th", { class: "block" + (uncovered.has(b) ? " uncovered" : ""),
      title: uncovered.has(b) ? "block " + b + ": nobody serves it" : "block " + b + ": " + cov.by_block[b].length + " servers" }, String(b)));
  }
  const table = el("table", { class: "coverage" }, el("thead", {}, head));
  const body = el("tbody");
  for (const p of cov.peers) {
    const rtt = p.rtt_ms === 0 ? "this node" : p.rtt_ms < 0 ? "rtt ?" : "rtt " + ms(p.rtt_ms);
    const tr = el("tr", { "data-peer": p.id },
      el("td", { class: "peer mono", title: p.id + "\n" + (p.addrs || []).join("\n") },
        short(p.id) + " ", el("span", { class: "muted" }, rtt + " · " + ms(p.pass_us / 1000) + "/pass")));
    for (let b = 0; b < blocks; b++) {
      const serves = b >= p.start && b < p.end;
      tr.append(el("td", { class: "cell" + (serves ? " served " + loadClass(p.load) : ""),
        title: serves ? "block " + b + " on " + short(p.id) + ": " + p.load.in_flight + " running, " + p.load.queued + " queued" : "" }));
    }
    body.append(tr);
  }
  table.append(body);
  sec.append(table);
  return sec;
}

async function drawModels() {
  const list = await getJSON("/v1/models");
  const models = list.data || [];
  // The generation box offers the text models; keep the user's choice.
  const sel = $("gen-model");
  const chosen = sel.value;
  const text = models.filter((m) => m.infermesh && m.infermesh.text);
  const opts = text.map((m) => el("option", { value: m.id }, (m.infermesh.name || "model") + " " + short(m.id)));
  sel.replaceChildren(...opts);
  if (text.some((m) => m.id === chosen)) sel.value = chosen;
  $("gen-go").disabled = text.length === 0 || running !== null;

  const out = [];
  for (const m of models) {
    let cov = null;
    try { cov = await getJSON("/v1/peers?model=" + encodeURIComponent(m.id)); } catch (e) { /* drawn without */ }
    out.push(drawCoverage(m, cov));
  }
  const box = $("model-list");
  if (out.length === 0) box.replaceChildren(el("p", { class: "muted" }, "No model known yet."));
  else box.replaceChildren(...out);
}

async function drawPeers() {
  const p = await getJSON("/v1/peers");
  $("peer-count").textContent = String(p.connected.length);
  $("peer-list").replaceChildren(...p.connected.map((id) => el("li", { title: id }, id)));
}

function routeCell(route) {
  if (!route || route.length === 0) return el("span", { class: "muted" }, "—");
  const span = el("span");
  route.forEach((h, i) => {
    if (i > 0) span.append(" → ");
    span.append(el("span", { class: "hop mono", title: h.peer },
      short(h.peer) + " [" + h.start + "–" + (h.end - 1) + "] " + ms(h.compute_us / 1000)));
  });
  return span;
}

async function drawRequests() {
  const r = await getJSON("/v1/requests");
  const rows = r.requests.map((q) => el("tr", { "data-kind": q.kind, "data-status": q.status },
    el("td", {}, String(q.id)),
    el("td", { title: q.started }, new Date(q.started).toLocaleTimeString()),
    el("td", {}, q.kind),
    el("td", { class: "mono", title: q.model }, short(q.model)),
    el("td", { class: q.status === 200 ? "status-ok" : "status-bad", title: q.error || "" }, q.status === 200 ? "ok" : q.status + " " + (q.error || "")),
    el("td", {}, ms(q.total_ms)),
    el("td", {}, q.tokens ? q.tokens + " (first " + ms(q.first_token_ms) + ")" : ""),
    el("td", {}, routeCell(q.route)),
    el("td", {}, String(q.failovers))));
  $("req-rows").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 9, class: "muted" }, "None yet."))]));
}

async function refresh() {
  try {
    drawNode(await getJSON("/v1/status"));
    await Promise.all([drawModels(), drawPeers(), drawRequests()]);
    setLive(true, "live");
  } catch (e) {
    setLive(false, "node unreachable: " + e.message);
  }
}

// The generation box: POST /v1/generate with stream, read as Server-Sent
// Events from the response body (EventSource cannot POST).
let running = null;

async function generate(ev) {
  ev.preventDefault();
  const out = $("gen-output"), stats = $("gen-stats");
  out.textContent = "";
  out.dataset.state = "running";
  out.dataset.tokens = "0";
  stats.textContent = "waiting for the first token…";
  running = new AbortController();
  $("gen-go").disabled = true;
  $("gen-stop").disabled = false;
  const started = performance.now();
  let tokens = 0;
  // Each event's text is whole characters (a token that ends inside one
  // has none; the character comes with the token that completes it).
  window.genTokens = [];
  try {
    const resp = await api("/v1/generate", {
      method: "POST", signal: running.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("gen-model").value, prompt: $("gen-prompt").value,
        max_tokens: Number($("gen-max").value), temperature: Number($("gen-temp").value), stream: true }),
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || resp.status + " " + resp.statusText);
    }
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (name === "error") throw new Error(msg.error.message);
        if ("token" in msg) {
          tokens++;
          window.genTokens.push(msg.token);
          out.textContent += msg.text;
          out.dataset.tokens = String(tokens);
          stats.textContent = tokens + " tokens, " + ms(performance.now() - started);
        } else if ("route" in msg) {
          stats.replaceChildren(tokens + " tokens · first token " + ms(msg.first_token_ms) + " · " +
            msg.tokens_per_s.toFixed(1) + " tokens/s · failovers " + msg.failovers + " · route ", routeCell(msg.route));
        }
      }
    }
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    stats.textContent = e.name === "AbortError" ? "stopped after " + tokens + " tokens" : "failed: " + e.message;
  } finally {
    running = null;
    $("gen-go").disabled = $("gen-model").options.length === 0;
    $("gen-stop").disabled = true;
    drawRequests().catch(() => {});
  }
}

$("gen-form").addEventListener("submit", generate);
$("gen-stop").addEventListener("click", () => running && running.abort());

// Poll, one refresh at a time: a slow node is not asked twice at once.
(async function loop() {
  for (;;) {
    await refresh();
    await new Promise((r) => setTimeout(r, REFRESH_MS));
  }
})();
