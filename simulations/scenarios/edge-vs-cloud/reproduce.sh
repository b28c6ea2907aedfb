#!/usr/bin/env bash
# Reproduces every figure of README.md (deterministic: seed 1, same output).
# Run from the repository root after `make build`:
#   simulations/scenarios/edge-vs-cloud/reproduce.sh            # all
#   simulations/scenarios/edge-vs-cloud/reproduce.sh headline   # only the default comparison
# Full sweep outputs (each run's own report) go to $WORK (default
# /tmp/evc-study); only the cited sweep files are copied into sweeps/.
# Generations run as the node runs them by default, a decode ring
# (workload.decode: ring). DECODE=requester reruns it all with the
# requester-driven loop (the simulator's only model before issue 13) into
# requester-loop/ (the comparison and the sweeps; not the arms' reports):
#   DECODE=requester simulations/scenarios/edge-vs-cloud/reproduce.sh
set -euo pipefail
BIN=${BIN:-bin/infermesh}
HERE=simulations/scenarios/edge-vs-cloud
DEST=$HERE
WORK=${WORK:-/tmp/evc-study}
DECODE=${DECODE:-ring}
DEC=(--set "workload.decode=$DECODE")
if [ "$DECODE" = requester ]; then DEST=$HERE/requester-loop; WORK=$WORK-requester; fi
SW=$DEST/sweeps
METRICS=ttft_p50,ttft_p95,per_token_p50,e2e_p50,e2e_p95,completion_rate,failovers,resumes
mkdir -p "$WORK" "$SW"

# The arms as --set flags (the arms `cloud`, `edge`, `edge-dc` and
# `cloud-client-decode` of edge-vs-cloud.yaml; `sim sweep` takes no arm).
# cloud: 150 dc GPUs in us-east, decoded server-side through gateway nodes
# in us-east that stream the tokens to the users.
CLOUD=(--set peers=150 --set classes.0.share=1 --set classes.1.share=0 --set workload.gateway=us-east)
# cloud-client-decode: the same GPUs, decoded from the users' own nodes (the
# mesh's way; the cloud arm of the study's first version, commit fbca9ec).
CLOUDCD=(--set peers=150 --set classes.0.share=1 --set classes.1.share=0)
EDGE=()
# "Distributed cloud": the edge arm's class made a data-centre GPU (the dc-gpu
# class's figures), 150 of them spread over the users' regions like the edge,
# decoded server-side by a gateway in each user's own region.
EDGEDC=(--set peers=150 --set classes.1.block_ms=0.6 --set classes.1.prefill_factor=0.01 --set classes.1.memory_gb=40
        --set classes.1.bandwidth_mbps=25000 --set classes.1.last_mile_ms=0.2 --set classes.1.jitter_ms=0.05 --set classes.1.slots=16
        --set workload.gateway=local)

headline() {
	rm -rf "$DEST"/comparison* "$DEST"/{cloud,edge}{,-local-users,-deep-model} "$DEST"/edge-dc "$DEST"/cloud-client-decode
	"$BIN" sim compare edge-vs-cloud "${DEC[@]}" --out "$DEST"
	if [ "$DECODE" = requester ]; then
		rm -rf "$DEST"/{cloud,edge}{,-local-users,-deep-model} "$DEST"/edge-dc "$DEST"/cloud-client-decode "$DEST"/comparison_cdf.png
	fi
}

# sweep NAME ARM PARAM VALUES [extra --set flags...]: runs a sweep of one arm
# and copies its table, CSV and plot into sweeps/NAME/ARM/.
sweep() {
	local name=$1 arm=$2 param=$3 values=$4; shift 4
	local flags=()
	case $arm in
	cloud) flags=("${CLOUD[@]}") ;;
	cloud-client-decode) flags=("${CLOUDCD[@]}") ;;
	edge) flags=() ;;
	edge-dc) flags=("${EDGEDC[@]}") ;;
	esac
	local out=$WORK/$name/$arm
	rm -rf "$out"; mkdir -p "$WORK/$name"
	"$BIN" sim sweep edge-vs-cloud "${DEC[@]}" "${flags[@]}" "$@" --param "$param" --values "$values" --metric "$METRICS" --out "$out" >"$out.log" 2>&1 || { cat "$out.log"; exit 1; }
	mkdir -p "$SW/$name/$arm"
	cp "$out"/sweep.csv "$out"/sweep.svg "$SW/$name/$arm/"
	# the per-run reports are not committed: drop their links
	sed -E 's/\[report\]\([^)]*\)/(not committed)/; s/with each run.s report.*//' "$out"/sweep.md >"$SW/$name/$arm/sweep.md"
}

# run NAME ARM [extra --set flags...]: one run; its summary.json goes to $WORK/runs/NAME/ARM.
run() {
	local name=$1 arm=$2; shift 2
	local flags=()
	case $arm in
	cloud) flags=("${CLOUD[@]}") ;;
	cloud-client-decode) flags=("${CLOUDCD[@]}") ;;
	edge) flags=() ;;
	edge-dc) flags=("${EDGEDC[@]}") ;;
	esac
	local out=$WORK/runs/$name/$arm
	rm -rf "$out"; mkdir -p "$(dirname "$out")"
	"$BIN" sim run edge-vs-cloud "${DEC[@]}" "${flags[@]}" "$@" --out "$out" >"$out.log" 2>&1 || { cat "$out.log"; exit 1; }
}

# (a) user spread
users() {
	# the share of users in us-east, the cloud's region: weight w against the others' 10
	for arm in cloud edge edge-dc cloud-client-decode; do sweep users-share $arm regions.0.weight 0,1,3,10,30,100,1000; done
	# all users in one region (the others weigh 0), for each region
	regions=(us-east us-west eu-west ap-south ap-east sa-east)
	for i in "${!regions[@]}"; do
		w=()
		for j in "${!regions[@]}"; do w+=(--set "regions.$j.weight=$([ "$i" = "$j" ] && echo 1 || echo 0)"); done
		for arm in cloud edge edge-dc cloud-client-decode; do run "region-${regions[$i]}" $arm "${w[@]}"; done
	done
	for arm in cloud edge edge-dc cloud-client-decode; do run region-all $arm; done
}

# (b) model size
model() {
	for arm in cloud edge edge-dc; do sweep model-blocks $arm model.blocks 20,40,80,120,160; done
	# memory per edge GPU: the span it holds, so the hops a route needs
	sweep edge-memory edge classes.1.memory_gb 3,6,12,24
}

# (b') model presets: depth, block size, compute per block (decode is memory-bound:
# block_ms in proportion to block_mb, 0.6 ms (dc) and 1.2 ms (consumer) per 400 MB)
# and activation width, all together (fp16 weights)
presets() {
	local names=(8b 13b 34b 70b) blocks=(32 40 48 80) mb=(440 400 1400 1750) kb=(8 10 16 16)
	for i in "${!names[@]}"; do
		local dc edge
		dc=$(python3 -c "print(round(0.6*${mb[$i]}/400, 3))")
		edge=$(python3 -c "print(round(1.2*${mb[$i]}/400, 3))")
		for arm in cloud edge edge-dc; do
			local cms=$dc; [ $arm = edge ] && cms=$edge
			run "model-${names[$i]}" $arm --set model.blocks=${blocks[$i]} --set model.block_mb=${mb[$i]} --set model.activation_kb=${kb[$i]} \
				--set classes.0.block_ms=$dc --set classes.1.block_ms=$cms
		done
	done
}

# (c) GPU mix at the edge
mix() {
	sweep edge-block-ms edge classes.1.block_ms 0.3,0.6,1.2,2.4,4.8
	# a third class, edge CPUs, replacing part of the consumer GPUs (share s against the GPUs' 1)
	local classes='[{name: dc-gpu, share: 0, regions: [us-east], block_ms: 0.6, prefill_factor: 0.01, memory_gb: 40, bandwidth_mbps: 25000, last_mile_ms: 0.2, jitter_ms: 0.05, slots: 16}, {name: edge-gpu, share: 1, block_ms: 1.2, prefill_factor: 0.02, memory_gb: 6, bandwidth_mbps: 1000, last_mile_ms: 2, jitter_ms: 0.5, slots: 8}, {name: edge-cpu, share: 0, block_ms: 15, prefill_factor: 0.5, memory_gb: 8, bandwidth_mbps: 500, last_mile_ms: 5, jitter_ms: 1, slots: 2}]'
	sweep edge-cpu-share edge classes.2.share 0,0.1,0.25,1,3 --set "classes=$classes"
}

# (d) load (200 s of virtual time: the high rates are slow to simulate)
load() {
	for arm in cloud edge edge-dc; do sweep load $arm workload.rate 5,25,50,100,200 --set duration_s=200; done
}

# prompt upload: the client sends the prompt's activations (10 KB a token) over
# its 100 Mbps access; at 10 Gbps that cost vanishes (as a text prompt's would)
upload() {
	for arm in cloud edge edge-dc; do sweep entry-bandwidth $arm workload.entry_bandwidth_mbps 10,100,1000,10000; done
}

# (e) churn at the edge: consumer GPUs at home come and go (half of the leaves
# are crashes; each leaver is replaced a minute later on average)
churn() {
	sweep edge-churn edge churn.leave_per_hour 0,0.02,0.05,0.2,0.5 --set churn.crash_fraction=0.5 --set churn.replace=true
}

# server-side decoding for the consumer mesh too (not what the mesh does: each
# user's node runs its loop): the edge arm with a gateway in each user's region
serverside() {
	run serverside edge --set workload.gateway=local
}

tables() {
	rm -f "$SW"/server-side-estimate.* # the first version's estimate, now simulated (server-side.md)
	python3 "$HERE/tables.py" "$WORK" "$SW" "$DECODE"
}

if [ $# -eq 0 ]; then set -- headline users model presets mix load upload churn serverside tables; fi
for step in "$@"; do "$step"; done
