// Package simulations is the discrete-event simulator of the mesh: peers on
// a geography (or an explicit topology), a workload of single passes and
// generation sessions, churn, capacity records in a DHT, and the node's own
// routing, placement, rebalancing, failover and replay decisions, which it
// does not copy but calls: mesh.PlanRouteTiered (and through it
// mesh.PlanRoute and mesh.SelectCandidates), mesh.Place, mesh.Rebalance
// (mesh.ShouldMove), mesh.BanDuration, mesh.Distrusts, mesh.RetryPause,
// mesh.ReplayFrom and mesh.ResumeFrom (a requester loop's failover), and
// protocol.MaxRingForced (a decode ring's). It may import protocol, shards
// and mesh, never node or cmd.
//
// A run is deterministic: a virtual clock in nanoseconds, events in a
// binary heap ordered by (time, sequence), and one PCG stream per concern
// (workload, peers, churn, network jitter, placement, timers) seeded from
// Scenario.Seed, so that the same scenario and seed give the same Result
// byte for byte, and changing churn does not change the workload's draws.
//
// # Models
//
//   - Network (network.go): great-circle distance at 2/3 c times a route
//     factor, plus each end's last mile and an exponential jitter;
//     activations take bytes / the slower access bandwidth on top. Network
//     coordinates are the exact 3-D chord embedding of the geography with
//     last miles as heights (what a converged Vivaldi gives, with its kind
//     of error); an explicit topology's are fitted to its latency matrix by
//     Vivaldi's spring rule, run to convergence. network.coord_error_ms
//     adds a random error to them, to ask what worse coordinates cost.
//     Every message of a request between two nodes also pays
//     network.hop_overhead_us (default 300 µs: framing, tensor codec and
//     stream work, BENCHMARKS.md's per hop), which coordinates do not see;
//     the jitter's mean is its two ends' jitter_ms (a class's, or an
//     explicit node's).
//   - Peers: classes with a per-block time, a prefill factor for prompt
//     tokens, memory (the span they hold), bandwidth, last mile; each runs
//     Slots passes at once and queues Queue more, by default 4 x Slots
//     as the stage server queues 4 x MaxInFlight (mesh.StageConfig's
//     MaxWaiting; it serves them fairly among sending peers, which Queue
//     models first come, first served; 0: busy at once, as the stage
//     server did before it queued), and holds at most Sessions
//     sessions (the stage server's MaxSessions). A peer that moved serves
//     its old span for the node's dropGrace (30 s), then refuses it.
//   - DHT and views: each peer publishes its capacity record (span, load
//     now) on joining, on moving, and every RecordTTL/3 with jitter; a
//     graceful leaver publishes an empty one, a crashed peer's lingers
//     until it expires. Every node's view is the records published before
//     its last ViewRefresh tick and not expired, so loads are as stale as
//     the real node's and dead peers stay routable until their record
//     expires or a requester that failed to reach them distrusts them. All
//     views refresh on the same ticks, and expiry is checked at each tick
//     (the node checks it at every read: a record may outlive its expiry
//     here by up to one refresh). Lookups are not simulated hop by
//     hop: a joining peer pays log2(N)/log2(k)+1 round trips to random
//     peers twice (providers, then records), the Kademlia cost.
//   - Requests: entry nodes (the users' own local nodes) near the users;
//     a request routes at its entry node, travels hop to hop (each hop
//     pushes to the next), and the last hop answers the entry node. A
//     generation session is a prompt pass then one step per output token
//     on the same route. By default (workload.decode: ring) it runs as the
//     node runs it, a decode ring (mesh.Session.Ring): the entry node
//     sends the prompt to the first hop; the last hop samples each token,
//     sends the next step (one token) straight to the first hop and the
//     token to the entry node, which takes them in order, so the
//     per-token loop is hop to hop and last hop to first hop, and each
//     token reaches the requester one one-way leg after it is sampled.
//     The requester's clock of a step starts when the token before it
//     arrives (a crashed hop is noticed a step timeout after that). With
//     workload.decode: requester, the requester drives each step, a round
//     trip from it per token. A failed hop is banned and routed around: a
//     single pass routes again from scratch. A ring step a hop answers
//     busy is resumed, as Session.ring does: after mesh.RetryPause(k) (k
//     the busy answers in a row before it) the requester sends that step
//     again to the first hop on the same route and session; the hops
//     before the busy one answer it from what they kept (legs, no
//     compute), the busy one and those after compute it; a token reaching
//     the requester ends the row; a resume counts against MaxFailovers
//     but is no failover (no ban; Summary.Resumes). The fourth busy
//     answer in a row (mesh's maxRingResumes, 3, mirrored: it is
//     unexported), or any other failure, restarts the ring on a new route
//     (a new session, the old one closed at every hop) and replays the
//     prompt and every token the requester has as forced ring steps,
//     each one ring turn of events (passes queue and compute as any),
//     failing past protocol.MaxRingForced tokens as the node does; a
//     requester-loop session replaces the lost span and replays its
//     completed steps there, as mesh.Session.Step does (that replay is
//     charged as round trips from the requester by formula, not as
//     events). The hops' per-step progress heartbeats to the requester
//     are not modelled (they move no step on, and no bandwidth is shared),
//     nor the node's per-hop progress deadlines: in both modes a stall is
//     noticed by the step timeout.
//     With workload.gateway (a region, or "local": each user's own),
//     requests run instead at gateway nodes in that region, a central
//     API's servers next to its GPUs: the user's node sends the prompt
//     there (one one-way leg, the prompt's activation bytes over the
//     user's access, as its own upload to a first hop would be), the
//     gateway routes, steps (or runs the ring), fails over and replays as
//     an entry node does, and streams each token back one one-way leg
//     after it has it. TTFT and end-to-end latency grow by the two legs;
//     the per-token time is the gateway's.
//   - Churn: sessions at a leave rate per hour, exponential or
//     heavy-tailed (lognormal), the starting peers part-way through theirs
//     (the renewal steady state); a share of them crashes; leavers are optionally replaced by a new peer of the
//     same class and region, which places itself with mesh.Place on the
//     view and fetches its blocks before it goes online. A graceful
//     leaver's connections close: its requests fail over at once. A
//     crashed peer's connections look alive for QUIC's idle timeout
//     (30 s), so passes sent to it stall until the attempt's step timeout;
//     after that, dials to it fail within 2 s (unreachable: banned and
//     distrusted until its record expires).
//   - Fresh loads (routing.fresh_load, on by default): a hop that
//     finishes a pass tells its requester its load (passes running and
//     queued), as the node's progress and result frames do; the requester
//     routes on mesh.FreshLoad of that and the record's load, as the
//     node's view does. The answer counts from when the hop sends it, a
//     one-way leg early, and one that says what the record says is
//     dropped (exact while the record stays the same).
//   - Placement: mesh.Place and mesh.Rebalance with the node's
//     PlaceRequest (Replicas, default 2, and mesh.DefaultPlaceSpread). A
//     peer holds the blocks it serves (the node announces no others), and
//     a moving peer, once it has fetched its new span, asks
//     mesh.LastCopies on its view whether it would drop a block's last
//     copy, and then keeps its old span instead. Summary.Blocks counts the
//     blocks that lost their last online holder.
//
// # Scale
//
// PlanRoute over 100k peers would take tens of ms a route, which no node
// can afford either; mesh.PlanRouteTiered keeps the mesh.RoutePerBlock
// best first hops per block (mesh.SelectCandidates) over views larger than
// mesh.MaxRouteCandidates. The simulator preselects, once per view and
// region, four times that many from the region's centre, and each entry
// node's route selects from that pool with its own coordinate and bans.
// A node draws each route with fresh randomness (mesh.RouteRequest.Rand),
// which spreads requesters over near-equal routes; so does the simulator,
// from a seeded stream of its own, keeping up to eight drawn routes per
// entry node, view, span and ban set, of which each request takes one at
// random (drawing one per request would cost too much at 100k peers);
// routing.spread: false passes no Rand, the mesh before spreading. With
// fresh loads the memo's key holds the loads routing assumes where they
// differ from the records, so a busy mesh routes nearly every request
// afresh. mesh.Place and mesh.Rebalance see the view through its per-block
// throughput totals and copy counts (mesh.AggregateCopies), on which they
// answer as on the candidates.
//
// # Files
//
//   - api.go: Run and RunOptions (the contract with the report and CLI)
//   - scenario.go: Scenario and its YAML form, defaults, checks, Set, Arm
//   - engine.go: the simulated mesh and its event handlers
//   - events.go: the event heap
//   - network.go: geography, latencies, coordinates
//   - result.go: Result, what a run produces
//   - load.go: how the compute spread over the peers, and the capacity
//     of the bottleneck block (Summary.Load, Summary.Capacity)
//   - report*.go, sweep.go: reports, plots, comparisons and sweeps
//
// The scenarios under scenarios/ are documented in scenarios/README.md.
package simulations
