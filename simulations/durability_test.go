package simulations

import "testing"

// durable is a small mesh under heavy churn with room to spare: 10 peers
// that can hold 3.75 copies of a 16-block model between them, each
// leaving on average after an hour (half of them crashing) and replaced
// 30 s later; fast GPUs hold 8 blocks, slow CPUs 4.
const durable = `
name: durable
seed: 2
duration_s: 7200
sample_s: 60
peers: 10
model: {blocks: 16, block_mb: 500, activation_kb: 8}
regions:
  - {name: eu, lat: 50, lon: 8, weight: 1}
classes:
  - {name: gpu, share: 1, block_ms: 1, memory_gb: 4, last_mile_ms: 2, slots: 4}
  - {name: cpu, share: 1, block_ms: 8, prefill_factor: 0.5, memory_gb: 2, last_mile_ms: 5, slots: 1}
rebalance_s: 120
workload: {rate: 0.5, generate: 0, prompt: {dist: const, mean: 16}, entries: 2}
churn: {leave_per_hour: 1, crash_fraction: 0.5, replace: true, rejoin_s: 30}
`

// TestNoBlockLostUnderChurn is issue 15's durability goal in the
// simulator, on the churn scenario cut down (40 peers, an hour, 20 % of
// them leaving per hour, half crashing, each replaced a minute later on
// average): its peers can hold some 17 copies of the model between them,
// and joining and rebalancing peers place as the node does (mesh.Place
// and mesh.Rebalance with Replicas 2 and mesh.DefaultPlaceSpread, a moving
// peer keeping its span when mesh.LastCopies says it holds a last copy),
// so no block may lose its last live holder.
func TestNoBlockLostUnderChurn(t *testing.T) {
	sc, err := LoadScenario("scenarios/churn.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range [][2]string{{"peers", "40"}, {"workload.rate", "0.5"}, {"workload.entries", "8"}, {"churn.leave_per_hour", "0.2"},
		{"rebalance_s", "120"}} {
		if err := sc.Set(kv[0], kv[1]); err != nil {
			t.Fatal(err)
		}
	}
	r := run(t, sc)
	s := r.Summary
	if s.Leaves < 4 || s.Joins < 4 {
		t.Fatalf("too little churn to show anything: %d leaves, %d joins", s.Leaves, s.Joins)
	}
	if b := s.Blocks; b.Lost != 0 || b.MinHolders < 1 {
		t.Errorf("%+v: want no block lost", b)
	}
}

// TestBlocksLostCounted: the count fires. In a mesh with little to spare
// (durable) under heavy churn, placing on throughput alone (replicas 1),
// blocks lose their last live holder while the live peers could hold the
// whole model.
func TestBlocksLostCounted(t *testing.T) {
	sc := parse(t, durable)
	sc.Replicas = 1
	r := run(t, sc)
	if b := r.Summary.Blocks; b.LostWithRoom == 0 || b.Lost < b.LostWithRoom || !(b.LostS > 0) || b.MinHolders != 0 {
		t.Errorf("%+v: want blocks lost with room", b)
	}
}
