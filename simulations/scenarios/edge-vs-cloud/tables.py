#!/usr/bin/env python3
"""Builds the combined tables of the study (sweeps/*.md and *.csv) from the
sweep CSVs and run summaries that reproduce.sh wrote. Usage:
tables.py WORK SWEEPS_DIR [DECODE] (DECODE: ring, the default, or requester:
the runs' workload.decode)"""
import csv, json, math, os, sys

work, sw = sys.argv[1], sys.argv[2]
RING = (sys.argv[3] if len(sys.argv) > 3 else "ring") == "ring"
ARMS = ["cloud", "edge", "edge-dc", "cloud-client-decode"]
COLS = [("hops", "hops", "{:.2f}"), ("ttft_p50", "TTFT p50", "ms"), ("ttft_p95", "TTFT p95", "ms"),
        ("per_token_p50", "per-token p50", "ms"), ("e2e_p50", "e2e p50", "s"), ("e2e_p95", "e2e p95", "s"),
        ("completion_rate", "completed", "%"), ("failovers", "failovers", "{:.0f}")]
RATIOS = [("ttft_p50", "TTFT p50 / cloud"), ("per_token_p50", "per-token p50 / cloud"),
          ("e2e_p50", "e2e p50 / cloud"), ("e2e_p95", "e2e p95 / cloud")]


def fmt(v, f):
    if f == "ms":
        return f"{v*1000:.0f} ms"
    if f == "s":
        return f"{v:.1f} s"
    if f == "%":
        return f"{v*100:.1f} %"
    return f.format(v)


def read_sweep(name, arm):
    p = os.path.join(sw, name, arm, "sweep.csv")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        rows = list(csv.DictReader(f))
    key = list(rows[0].keys())[0]
    return {r[key]: {k: float(v) for k, v in r.items() if k != key} for r in rows}


def summary(path):
    with open(path) as f:
        s = json.load(f)["summary"]
    out = {k: float(v) for k, v in s.items() if not isinstance(v, dict)}
    for k in ("e2e", "ttft", "per_token"):
        for q, v in s[k + "_s"].items():
            out[f"{k}_{q}"] = float(v)
    out["hops"] = out.get("mean_hops", 0)
    return out


def write(name, title, label, rows, note=""):
    """rows: list of (value label, arm, metrics, cloud metrics or None)."""
    head = [label, "arm"] + [c[1] for c in COLS] + [r[1] for r in RATIOS]
    md = [f"# {title}", ""]
    if note:
        md += [note, ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    with open(os.path.join(sw, name + ".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([label, "arm"] + [c[0] for c in COLS] + ["ratio_" + r[0] for r in RATIOS])
        for val, arm, m, ref in rows:
            cells = [(fmt(m[c[0]], c[2]) if not math.isnan(m[c[0]]) else "–") for c in COLS]
            rat = [m[k] / ref[k] if ref and ref[k] else float("nan") for k, _ in RATIOS]
            md.append("| " + " | ".join([val, arm] + cells + [f"{x:.2f}×" if not math.isnan(x) else "–" for x in rat]) + " |")
            w.writerow([val, arm] + [f"{m[c[0]]:.6g}" for c in COLS] + [f"{x:.4f}" for x in rat])
    with open(os.path.join(sw, name + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")


def combined(name, title, label, relabel=lambda v: v, ref_fixed=None, note=""):
    data = {a: read_sweep(name, a) for a in ARMS}
    data = {a: d for a, d in data.items() if d}
    if not data:
        return
    vals = list(next(iter(data.values())).keys())
    rows = []
    for v in vals:
        ref = data["cloud"][v] if "cloud" in data else ref_fixed
        for a in ARMS:
            if a in data:
                rows.append((relabel(v), a, data[a][v], ref))
    write(name, title, label, rows, note)


cloud_default = None
p = os.path.join(work, "runs", "region-all", "cloud", "summary.json")
if os.path.exists(p):
    cloud_default = summary(p)

combined("users-share", "User spread: share of the users in us-east (the cloud's region)", "users in us-east",
         lambda v: f"{float(v)/(float(v)+10)*100:.0f} % (w={v})",
         note="regions.0.weight = w against the other five regions' 10 (2+3+2+2+1); peers stay where they are.")
combined("model-blocks", "Model depth: model.blocks (400 MB each; an edge GPU holds 15, a dc GPU 100)", "blocks")
combined("entry-bandwidth", "Prompt upload: the users' access bandwidth (workload.entry_bandwidth_mbps)", "entry Mbps",
         note="The user's node sends the prompt's activations (10 KB a token, ~2 MB for 200 tokens) to the first hop, "
         "or, through a gateway (cloud, edge-dc), to the gateway, which sends them on to the first hop.")
combined("load", "Load: workload.rate (200 s of virtual time)", "req/s")
combined("edge-memory", "Edge GPU memory for blocks (classes.1.memory_gb): the span held, so the hops", "edge GB",
         lambda v: f"{v} GB ({min(40, int(float(v)*1000/400))} blocks)", ref_fixed=cloud_default,
         note="Ratios against the default cloud arm (it does not change).")
combined("edge-block-ms", "Edge GPU speed (classes.1.block_ms; the cloud's dc GPU takes 0.6 ms)", "edge ms/block",
         ref_fixed=cloud_default, note="Ratios against the default cloud arm (it does not change).")
combined("edge-churn", "Edge churn: churn.leave_per_hour (half crashes, replaced after ~60 s)", "leaves per hour",
         lambda v: f"{float(v)*100:g} %", ref_fixed=cloud_default,
         note="Ratios against the default cloud arm (no churn: data-centre GPUs).")
combined("edge-cpu-share", "Edge CPUs (15 ms a block, 8 GB, 2 slots) replacing consumer GPUs", "CPU share of the 600 edge peers",
         lambda v: f"{float(v)/(float(v)+1)*100:.0f} %", ref_fixed=cloud_default,
         note="classes.2.share = s against the GPUs' 1; ratios against the default cloud arm.")

# users by region
regions = [("us-east", 39.0, -77.5), ("us-west", 37.4, -122.1), ("eu-west", 50.1, 8.7), ("ap-south", 19.1, 72.9),
           ("ap-east", 35.7, 139.7), ("sa-east", -23.5, -46.6)]


def km(a, b):
    la1, lo1, la2, lo2 = map(math.radians, (a[1], a[2], b[1], b[2]))
    d = math.sin(la1) * math.sin(la2) + math.cos(la1) * math.cos(la2) * math.cos(lo1 - lo2)
    return math.acos(max(-1, min(1, d))) * 6371


rows = []
for r in regions + [("all", 0, 0)]:
    d = os.path.join(work, "runs", "region-" + r[0])
    if not os.path.isdir(d):
        continue
    ms = {a: summary(os.path.join(d, a, "summary.json")) for a in ARMS if os.path.exists(os.path.join(d, a, "summary.json"))}
    if r[0] == "all":
        lab = "worldwide (default weights)"
    else:
        dist = km(r, regions[0])
        lab = f"{r[0]} ({dist:,.0f} km, RTT ≈ {2*(dist/200*1.8)+2*10.2:.0f} ms)"
    for a in ARMS:
        if a in ms:
            rows.append((lab, a, ms[a], ms.get("cloud")))
if rows:
    write("users-by-region", "All users in one region: how far from the cloud (us-east)", "users in",
          rows, note="Distance of the region's centre from us-east; RTT to the cloud = 2 × (distance/200 km/ms × 1.8 + both last miles 10 + 0.2 ms), without jitter.")

# model presets
presets = [("8b", "8B-class: 32 × 440 MB, 8 KB act."), ("13b", "13B-class: 40 × 400 MB, 10 KB act. (default)"),
           ("34b", "34B-class: 48 × 1,400 MB, 16 KB act."), ("70b", "70B-class: 80 × 1,750 MB, 16 KB act.")]
rows = []
for key, lab in presets:
    d = os.path.join(work, "runs", "model-" + key)
    if not os.path.isdir(d):
        continue
    ms = {a: summary(os.path.join(d, a, "summary.json")) for a in ARMS if os.path.exists(os.path.join(d, a, "summary.json"))}
    for a in ARMS:
        if a in ms:
            rows.append((lab, a, ms[a], ms.get("cloud")))
if rows:
    write("model-presets", "Model size: depth, block size, compute per block and activation width together (fp16)", "model",
          rows, note="block_ms in proportion to block_mb (decode is memory-bound): 0.6 ms (dc) / 1.2 ms (consumer) per 400 MB. "
          "A dc GPU holds floor(40 GB / block), a consumer GPU floor(6 GB / block).")

# per users' region of the default (worldwide) runs
def region_stats(path):
    with open(path) as f:
        j = json.load(f)
    hops = float(j["summary"]["mean_hops"])
    out = {}
    for r in j.get("regions", []):
        m = {"hops": hops, "completion_rate": r["completed"] / max(1, r["completed"] + r["failed"]), "failovers": float("nan")}
        for k in ("e2e", "ttft", "per_token"):
            for q, v in r[k + "_s"].items():
                m[f"{k}_{q}"] = float(v)
        out[r["region"]] = m
    return out


d = os.path.join(work, "runs", "region-all")
if os.path.isdir(d):
    st = {a: region_stats(os.path.join(d, a, "summary.json")) for a in ARMS if os.path.exists(os.path.join(d, a, "summary.json"))}
    rows = []
    for r in regions:
        if r[0] not in st.get("cloud", {}):
            continue
        dist = km(r, regions[0])
        lab = f"{r[0]} ({dist:,.0f} km)"
        for a in ARMS:
            if a in st and r[0] in st[a]:
                rows.append((lab, a, st[a][r[0]], st["cloud"][r[0]]))
    write("regions-worldwide", "Per users' region, default worldwide workload (weights 3/2/3/2/2/1)", "users in", rows,
          note="The region breakdown (summary.json `regions`) of the default runs, the headline's arms: cloud (server-side decode "
          "through us-east gateways), edge (the consumer mesh, " + ("the users' nodes requesting, the decode ring among the hops"
          if RING else "decoded from the users' nodes") + "), edge-dc (150 data-centre GPUs "
          "spread over the regions, server-side decode through a gateway in the user's region) and cloud-client-decode. "
          "Distance of the region's centre from us-east. "
          "Failovers are not broken down per region (NaN).")


# server-side decoding, simulated (the first version of the study estimated it:
# its figures are kept for comparison)
ESTIMATE = {"cloud": 3.73, "edge with gateways": 9.12, "edge-dc": 3.61}  # s, a 128-token reply, commit fbca9ec
d = os.path.join(work, "runs", "region-all")
if os.path.isdir(d):
    base = {a: summary(os.path.join(d, a, "summary.json")) for a in ARMS if os.path.exists(os.path.join(d, a, "summary.json"))}
    c = base["cloud"]
    p = os.path.join(work, "runs", "serverside", "edge", "summary.json")
    if os.path.exists(p):
        base["edge with gateways"] = summary(p)
    md = ["# Server-side decoding, simulated", "",
          "The default worldwide runs of the headline's arms. cloud and edge-dc decode server-side (`workload.gateway`: "
          "us-east, and `local`, the user's own region): the gateway runs the decode loop next to the GPUs and streams "
          "the tokens, so the user pays one one-way leg for the prompt and one for the reply. " +
          ("All runs use the decode ring (`workload.decode: ring`): the requester (the gateway, or for edge (the mesh) and "
           "cloud-client-decode the user's own node) sends the prompt to the first hop and receives the tokens from the last, "
           "which feeds each next step to the first hop; the requester is off the per-token loop. "
           if RING else
           "edge (the mesh) and cloud-client-decode run the loop at the user's own node (`workload.decode: requester`): "
           "a round trip to the route per token. ") +
          "edge with gateways is the consumer mesh given a gateway in each user's region (`--set workload.gateway=local`), "
          "the case the first version of this study estimated for the edge. "
          "The last column is that version's estimate of a 128-token reply's e2e, which these runs replace.", "",
          "| arm | " + ("requester" if RING else "decode loop at") + " | TTFT p50 | TTFT p95 | per-token p50 | e2e p50 | e2e p95 | e2e p50 / cloud | e2e p95 / cloud | "
          "TTFT p50 / cloud | estimated e2e (128 tokens) / cloud |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    where = {"cloud": "gateway in us-east", "edge": "user's node", "edge-dc": "gateway in the user's region",
             "cloud-client-decode": "user's node", "edge with gateways": "gateway in the user's region (not the mesh's way)"}
    with open(os.path.join(sw, "server-side.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "ttft_p50", "ttft_p95", "per_token_p50", "e2e_p50", "e2e_p95", "ratio_e2e_p50", "ratio_e2e_p95",
                    "ratio_ttft_p50", "estimate_ratio_e2e"])
        for a, m in base.items():
            est = f"{ESTIMATE[a]/ESTIMATE['cloud']:.2f}×" if a in ESTIMATE else "–"
            md.append(f"| {a} | {where[a]} | {m['ttft_p50']*1000:.0f} ms | {m['ttft_p95']*1000:.0f} ms | "
                      f"{m['per_token_p50']*1000:.1f} ms | {m['e2e_p50']:.2f} s | {m['e2e_p95']:.2f} s | "
                      f"{m['e2e_p50']/c['e2e_p50']:.2f}× | {m['e2e_p95']/c['e2e_p95']:.2f}× | {m['ttft_p50']/c['ttft_p50']:.2f}× | {est} |")
            w.writerow([a] + [f"{m[k]:.6g}" for k in ("ttft_p50", "ttft_p95", "per_token_p50", "e2e_p50", "e2e_p95")] +
                       [f"{m['e2e_p50']/c['e2e_p50']:.4f}", f"{m['e2e_p95']/c['e2e_p95']:.4f}", f"{m['ttft_p50']/c['ttft_p50']:.4f}",
                        f"{ESTIMATE[a]/ESTIMATE['cloud']:.4f}" if a in ESTIMATE else ""])
    with open(os.path.join(sw, "server-side.md"), "w") as f:
        f.write("\n".join(md) + "\n")
