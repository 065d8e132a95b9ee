"""`raymoe experiment hot-experts --simulate`: the experiment's workloads replayed against a cost model of
Mixtral-8x7B on N GPUs, with the project's real policy code deciding. Every number it returns is SIMULATED.

What is real: the autoscaling rule (`cluster.autoscaling.decide`, the function the Serve policy calls), the
re-placement planner (`cluster.eplb.balanced_placement`), the workloads' arrival rates and expert popularity
(`experiment.workloads`), and Ray Serve's own delay rule (a decision applies once it has held for
upscale_delay_s / downscale_delay_s). What is modelled:

- Placement. 8 shards, expert-parallel to start (shard s holds expert s of all 32 layers, ~11.3 GB of bf16
  weights). One replica is one GPU; all shards' replicas together stay within `gpus`: a replica the policy
  adds waits for a free GPU, as a Ray actor would. After a re-placement with 8 redundant copies per layer
  (16 copies of 8 experts on 8 shards) a replica holds 2 experts per layer, ~22.5 GB, which an 80 GB H100 holds.
- Decode. Routers (attention and the gate) are separate GPUs, one per expert GPU, each batching up to
  256 sequences; they are modelled as one lock-step batch of N active sequences, each decoding one token a step:
      tau = attention_ms_per_step + sum over layers of max over replicas of (that replica's time in the layer)
      replica time in a layer = call_overhead_ms + sum over the experts of the layer it holds that got tokens of
                                max(expert bytes / HBM bandwidth, 2 * 3 * dim * expert_hidden * tokens / flop rate)
  A layer's 2N routing slots go to experts by `slot_shares` of the workload's popularity; a shard's tokens split
  evenly over its serving replicas, and a pair held by several shards splits over them as routers split it: in
  proportion to each shard's serving replicas against those the re-placement was planned for (evenly while
  those agree, and always under the starting plan, which records none). At the peak
  numbers below an expert is memory-bound below ~295 tokens per call (0.105 ms to read its 352 MB), so extra
  replicas of a hot expert only shorten a step when each still gets more than that.
- Load. Requests arrive open-loop, Poisson per 1 s tick, each decoding `tokens_per_request` tokens (prompts and
  prefill are not modelled). A request lasts well under a tick, so each tick is solved as a steady state: N is
  the concurrency at which N / tau(N) tokens/s serves the tick's demand; if even the concurrency cap cannot, the
  cap runs all tick and the rest waits in a FIFO queue.
- Latency. Every token completed in a tick takes tau, except a request's first token, which also waits its time
  in the queue (its TTFT). Percentiles are weighted by tokens; requests still waiting at the end count with their
  wait so far (a lower bound).
- Metrics the policies see: busy of a replica = its expert math per step (weight reads and FLOPs, not the call
  overhead) / tau; a shard's load = tokens/s routed to it. Imbalance = (max - mean) / mean of load per replica.
  In lock-step decode a replica idles while each layer waits for that layer's slowest shard, so when every
  layer has its own hot expert, busy stays low even while requests queue.
- Policies, all within the budget B = gpus and starting at B // 8 replicas per shard. `static` holds.
  `serve-default` is Serve's request-based rule, desired = ceil(ongoing requests / 2) within [1, B // 8], with
  upscale/downscale delays 30 s / 600 s; ongoing HTTP requests are always 0 (routers call replicas over gRPC), so
  it only ever scales down, at 600 s. `raymoe` calls `decide` every tick with each shard's busy over the last
  2 s (queued when requests wait and the shard is past target), its critical share over the last 5 s (the time
  it was each layer's slowest shard, as routers report it), whether requests waited in those 5 s, target 0.6,
  bounds [1, B - 7], budget B, and delays 1 s / 10 s. `raymoe+replace` also re-places every `replace_every_s`
  on the tokens routed since the last time (capacity: serving replicas), switching `switch_s` later if the
  plan differs.
- A kill takes one serving replica of the shard with the most load per replica; Serve starts a replacement at
  once, which serves replica_start_s later. Routers retry on the shard's other replicas, so nothing fails; with
  none left, the tokens wait.

Honest limits: peak bandwidth and FLOPs (real kernels reach less), attention as a constant per step (short
prompts), replicas that batch every router's tokens of a layer into one call, no network contention, and
1 s resolution.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from cluster.autoscaling import ShardLoad, critical_shares, decide
from cluster.directory import CRITICAL_WINDOW_S
from cluster.eplb import balanced_placement, imbalance
from cluster.placement import PlacementPlan
from experiment.workloads import POLICIES, Workload, slot_shares

DT_S = 1.0  # one tick
TARGET_BUSY = 0.6  # raymoe's default --target-busy
LOOK_BACK_S = 2.0  # raymoe's busy is the mean over this window
UPSCALE_DELAY_S = {"serve-default": 30.0, "raymoe": 1.0}  # Serve's defaults; raymoe's --upscale-delay-s
DOWNSCALE_DELAY_S = {"serve-default": 600.0, "raymoe": 10.0}
SERVE_TARGET_ONGOING = 2.0  # Serve's default target_ongoing_requests
KILL_WINDOW_S = 60.0  # throughput lost is measured over this window centred on the kill


@dataclass
class SimCluster:
    gpus: int = 64  # budget: expert replicas, one GPU each
    n_layers: int = 32  # Mixtral-8x7B
    n_experts: int = 8  # Mixtral-8x7B (top-2)
    dim: int = 4096  # Mixtral-8x7B hidden size
    expert_hidden: int = 14336  # Mixtral-8x7B expert FFN size (w1, w2, w3: 3 * dim * expert_hidden params)
    bytes_per_param: int = 2  # bf16
    hbm_gb_s: float = 3350.0  # H100 SXM HBM3 peak bandwidth
    tflops: float = 989.0  # H100 SXM dense bf16 peak
    call_overhead_ms: float = 0.05  # assumed, per replica call per layer: an RDMA-class round trip + kernel launch
    attention_ms_per_step: float = 2.0  # assumed, router side per decode step: attention weights, short KV caches
    replica_start_s: float = 30.0  # assumed: a new replica starts its process and loads ~11 GB of weights
    switch_s: float = 5.0  # assumed: replicas load a re-placement's new pairs beside the old, then routers switch
    routers_per_gpu: float = 1.0  # assumed: one attention GPU per expert GPU, so concurrency grows with the budget
    max_batch_per_router: int = 256  # sequences one router batches (vLLM's long-standing max_num_seqs default)

    @property
    def expert_read_ms(self) -> float:
        """Time to stream one expert's weights from HBM."""
        return 3 * self.dim * self.expert_hidden * self.bytes_per_param / (self.hbm_gb_s * 1e9) * 1e3

    @property
    def ms_per_token(self) -> float:
        """One token through one expert: 2 FLOPs per multiply-add over its three matrices."""
        return 2 * 3 * self.dim * self.expert_hidden / (self.tflops * 1e12) * 1e3

    @property
    def max_active(self) -> int:
        """Sequences the routers can decode at once."""
        return int(self.routers_per_gpu * self.gpus) * self.max_batch_per_router


class _StepCost:
    """One tick's decode-step cost as a function of N active sequences, for fixed expert shares (L, E),
    holdings (G, L, E) and serving replicas (G,)."""

    def __init__(self, c: SimCluster, share: np.ndarray, holds: np.ndarray, serving: np.ndarray,
                 planned: np.ndarray | None = None) -> None:
        self.c = c
        live = holds & (serving > 0)[:, None, None]
        self.stalled = bool(((share > 0) & ~live.any(0)).any())  # some tokens have no replica to go to
        # A copy's weight: its shard's serving replicas against those the placement was planned for (router.grpc_
        # dispatch.copy_weights); tokens per active sequence per step that shard g gets of (layer, expert): 2 per token.
        ratio = np.ones(len(serving)) if planned is None else serving / planned  # (G,)
        weight = np.where(live, ratio[:, None, None], 0.0)  # (G, L, E)
        self.per_shard = np.where(live, 2 * share * weight / np.maximum(weight.sum(0), 1e-12), 0.0)
        self.per_replica = self.per_shard / np.maximum(serving, 1)[:, None, None]
        self.called = self.per_shard > 0
        self.overhead = c.call_overhead_ms * self.called.any(2)  # (G, L): one call per layer touched

    def math_ms(self, n: float) -> np.ndarray:
        """(G, L, E) expert time of one replica of each shard per step: weight reads or FLOPs, whichever is longer."""
        return np.where(self.called, np.maximum(self.c.expert_read_ms, self.c.ms_per_token * self.per_replica * n), 0.0)

    def tau_ms(self, n: float) -> float:
        return self._tau_and_slope(n)[0]

    def critical_ms(self, n: float) -> np.ndarray:
        """(G,) per step, the time each shard's replicas hold up a layer as its slowest: what routers report."""
        per_layer = self.overhead + self.math_ms(n).sum(2)  # (G, L)
        worst = per_layer.max(0)  # (L,)
        # Shards tied for slowest share the layer's wait: in a real run, noise picks each of them as often.
        last = np.isclose(per_layer, worst, rtol=1e-9, atol=0.0) & (worst > 0)  # (G, L)
        return (last * worst / np.maximum(last.sum(0), 1)).sum(1)

    def _tau_and_slope(self, n: float) -> tuple[float, float]:
        """tau(n) and its slope in n (ms per sequence): the compute-bound terms on each layer's slowest shard."""
        if self.stalled:
            return math.inf, 0.0
        flops = self.c.ms_per_token * self.per_replica
        per_layer = self.overhead + self.math_ms(n).sum(2)
        slowest = per_layer.argmax(0)
        layers = np.arange(per_layer.shape[1])
        path = flops[slowest, layers]
        on_path = path * (self.called[slowest, layers] & (path * n > self.c.expert_read_ms))
        return self.c.attention_ms_per_step + float(per_layer[slowest, layers].sum()), float(on_path.sum())

    def tokens_per_s(self, n: float) -> float:
        return n / self.tau_ms(n) * 1e3 if n > 0 else 0.0

    def concurrency(self, tokens_per_s: float) -> float:
        """The N at which N / tau(N) serves `tokens_per_s`, which the caller checked the cap can: Newton on
        N - rate * tau(N), concave since tau is convex and piecewise linear, so it climbs to the root from 0
        without overshooting and lands on it once in the root's linear piece."""
        rate = tokens_per_s / 1e3  # tokens per ms
        n = 0.0
        for _ in range(64):
            tau, slope = self._tau_and_slope(n)
            step = (rate * tau - n) / (1 - rate * slope)
            n = min(n + step, float(self.c.max_active))
            if step <= 1e-9 * n:
                break
        return n


def _expert_parallel(c: SimCluster) -> np.ndarray:
    """(G, L, E) holdings of PlacementPlan.expert_parallel: shard s holds expert s of every layer."""
    plan = PlacementPlan.expert_parallel(c.n_layers, c.n_experts)
    return _holdings(c, [list(s.pairs) for s in plan.shards])


def _holdings(c: SimCluster, shards: list[list[tuple[int, int]]]) -> np.ndarray:
    holds = np.zeros((len(shards), c.n_layers, c.n_experts), dtype=bool)
    for g, pairs in enumerate(shards):
        for layer, e in pairs:
            holds[g, layer, e] = True
    return holds


def _real_shares(c: SimCluster, shares: np.ndarray) -> np.ndarray:
    """Measured (L', E) slot shares -> (L, E): layer l of the simulated model repeats measured layer l * L' // L."""
    shares = np.asarray(shares, dtype=np.float64)
    if shares.ndim != 2 or shares.shape[1] != c.n_experts or (shares < 0).any() or not (shares.sum(1) > 0).all():
        raise ValueError(f"real_shares must be a non-negative (layers, {c.n_experts}) array with load in every layer, "
                         f"got shape {shares.shape}")
    shares = shares[np.arange(c.n_layers) * len(shares) // c.n_layers]
    return shares / shares.sum(1, keepdims=True)


def _weighted_percentile(samples: list[tuple[float, float]], q: float) -> float | None:
    """The smallest value with at least a fraction q of the total weight at or below it."""
    samples = [(v, wt) for v, wt in samples if wt > 0]
    if not samples:
        return None
    values, weights = np.array(samples).T
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


class _Shard:
    """One shard's replicas: serving, starting (each with the time it begins serving), and decided but waiting
    for a free GPU (each with its decision, whose seconds_to_serving is updated when it gets one)."""

    def __init__(self, replicas: int) -> None:
        self.running = replicas
        self.starting: list[float] = []
        self.pending: list[dict] = []
        self.target = replicas  # what the policy last applied (Serve's target_num_replicas)
        self.streak: tuple[int, float] | None = None  # (direction, since): Serve's delay state
        self.busy: deque[float] = deque(maxlen=round(LOOK_BACK_S / DT_S))

    @property
    def allocated(self) -> int:
        """Replicas holding a GPU."""
        return self.running + len(self.starting)

    def resize(self, n: int) -> None:
        """Drive toward n replicas; Serve stops replicas not yet serving first, and a removed one leaves at once."""
        drop = self.allocated + len(self.pending) - n
        while drop > 0 and self.pending:
            self.pending.pop()
            drop -= 1
        self.starting.sort()
        while drop > 0 and self.starting:
            self.starting.pop()
            drop -= 1
        self.running -= max(drop, 0)
        self.target = n

    def delayed(self, want: int, t: float, up_s: float, down_s: float) -> bool:
        """Serve's delay rule: True once a wish to move in one direction has held for that direction's delay."""
        if want == self.target:
            self.streak = None
            return False
        direction = 1 if want > self.target else -1
        if self.streak is None or self.streak[0] != direction:
            self.streak = (direction, t)
        if t - self.streak[1] + 1e-9 >= (up_s if direction > 0 else down_s):
            self.streak = None
            return True
        return False


def _start_pending(shards: list[_Shard], gpus: int, t: float, start_s: float) -> None:
    free = gpus - sum(s.allocated for s in shards)
    for s in shards:
        while free > 0 and s.pending:
            decision = s.pending.pop(0)
            decision["seconds_to_serving"] = max(decision["seconds_to_serving"], t + start_s - decision["time"])
            s.starting.append(t + start_s)
            free -= 1


def default_rate(cluster: SimCluster, tokens_per_request: int) -> float:
    """A base arrival rate (requests/s) that loads the static plan to about 70% of what it can decode under
    zipf-1.2, so policies differ in how they use capacity, not in whether they drown."""
    c = cluster
    share = slot_shares(Workload("zipf-1.2", zipf=1.2).popularity(0.0, c.n_layers, c.n_experts))
    cost = _StepCost(c, share, _expert_parallel(c), np.full(c.n_experts, c.gpus // c.n_experts))
    return 0.7 * cost.tokens_per_s(c.max_active) / tokens_per_request


def simulate(w: Workload, policy: str, cluster: SimCluster, *, duration_s: float, base_rate: float,
             tokens_per_request: int = 64, kill_at_s: float | None = None, seed: int = 0,
             real_shares: np.ndarray | None = None, replace_every_s: float = 30.0) -> dict:
    """Replay w for duration_s under `policy` on the cost model (module docstring) ->
    {"simulated": True, "tokens_per_s", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "failed",
    "replica_seconds", "avg_replicas", "imbalance_p50", "decisions": [{"time", "kind", "seconds_to_serving"}],
    "kill": {"at", "failed", "throughput_lost"} or None,
    "series": {"t": [...], "replicas": {"<shard>": [...]}, "load": {"<shard>": [...]},
               "critical": {"<shard>": [...]}, "imbalance": [...], "p99_ms": [...]}}

    p50/p99 are per-token latencies (a first token includes its queue wait); replica_seconds counts every replica
    holding a GPU, starting ones too; series "replicas" are serving ones, "load" tokens/s routed to each shard,
    "critical" its share of the layer waits over the policy's window (None while the routers are not under load),
    "p99_ms" None in a tick that completed no token. real_shares: the (layers, experts) slot shares measured on
    the real model, required by the `real` workload and ignored by the others; measured layers repeat to fill the
    model's.
    """
    c = cluster
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    G = c.n_experts  # expert-parallel: one shard per expert
    if c.gpus < G:
        raise ValueError(f"need at least one GPU per shard ({G}), got {c.gpus}")
    if w.real and real_shares is None:
        raise ValueError("the real workload needs real_shares: its skew is measured on the model")
    shares_real = _real_shares(c, real_shares) if w.real else None
    shares: dict[int, np.ndarray] = {}  # slot shares per drift epoch
    rng = np.random.default_rng(seed)
    budget = c.gpus
    shards = [_Shard(budget // G) for _ in range(G)]
    holds = _expert_parallel(c)
    planned: np.ndarray | None = None  # (G,) replicas per shard the placement in force was planned for
    switch: tuple[float, np.ndarray, np.ndarray] | None = None  # (when, holdings, planned) of a re-placement loading
    every = max(1, round(replace_every_s / DT_S))
    window_load = np.zeros((c.n_layers, c.n_experts))  # tokens per (layer, expert) since the last re-placement

    queue: deque[list[float]] = deque()  # FIFO of [arrival time, requests]
    lat: list[tuple[float, float]] = []  # (ms, tokens)
    ttft: list[tuple[float, float]] = []  # (ms, requests)
    decisions: list[dict] = []
    imbalances: list[float] = []  # per tick that decoded anything
    series: dict = {"t": [], "replicas": {str(g): [] for g in range(G)}, "load": {str(g): [] for g in range(G)},
                    "critical": {str(g): [] for g in range(G)}, "imbalance": [], "p99_ms": []}
    tokens_done = replica_seconds = 0.0
    last_load = np.zeros(G)
    router_window: deque[tuple[np.ndarray, bool]] = deque(maxlen=round(CRITICAL_WINDOW_S / DT_S))
    kill: dict | None = None
    kill_t = None if kill_at_s is None else math.ceil(kill_at_s / DT_S) * DT_S  # the tick it happens in
    window = (-math.inf, -math.inf) if kill_t is None else (kill_t - KILL_WINDOW_S / 2, kill_t + KILL_WINDOW_S / 2)
    window_in = window_done = 0.0  # tokens that arrived in the kill window / of those, completed within it

    ticks = math.ceil(duration_s / DT_S)
    end = ticks * DT_S
    for i in range(ticks):
        t = i * DT_S
        for s in shards:
            s.running += sum(ready <= t for ready in s.starting)
            s.starting = [ready for ready in s.starting if ready > t]
        _start_pending(shards, budget, t, c.replica_start_s)
        if switch is not None and switch[0] <= t:
            holds, planned, switch = switch[1], switch[2], None
        if t == kill_t:
            # The busiest shard loses a serving replica; Serve starts a replacement on the freed GPU.
            per_replica = [last_load[g] / s.running if s.running else -1.0 for g, s in enumerate(shards)]
            hot = shards[int(np.argmax(per_replica))]
            hot.running -= 1
            hot.starting.append(t + c.replica_start_s)
            kill = {"at": t, "failed": 0, "throughput_lost": 0.0}
            decisions.append({"time": t, "kind": "kill", "seconds_to_serving": c.replica_start_s})

        arrived = float(rng.poisson(w.rate(t, base_rate) * DT_S))
        if arrived:
            queue.append([t, arrived])
        epoch = int(t // w.drift_every_s) if w.drift_every_s else 0  # popularity changes only when the hot set drifts
        if shares_real is not None:
            share = shares_real
        elif epoch not in shares:
            share = shares[epoch] = slot_shares(w.popularity(t, c.n_layers, c.n_experts))
        else:
            share = shares[epoch]
        serving = np.array([s.running for s in shards])
        cost = _StepCost(c, share, holds, serving, planned)

        # Serve the tick: all that waits if the cap can, else the cap's worth, first come first served.
        waiting = sum(n for _, n in queue)
        capacity = 0.0 if cost.stalled else cost.tokens_per_s(c.max_active) * DT_S / tokens_per_request
        served = min(waiting, capacity)
        n = 0.0 if served == 0 else (
            c.max_active if served < waiting else cost.concurrency(served * tokens_per_request / DT_S))
        tau = cost.tau_ms(n)
        tick_lat: list[tuple[float, float]] = []
        left = served
        while left > 1e-9 and queue:
            arrival, count = queue[0]
            part = min(count, left)
            tick_lat.append(((t - arrival) * 1e3 + tau, part))
            if window[0] <= arrival < window[1] and t + DT_S <= window[1]:
                window_done += part * tokens_per_request
            left -= part
            if part < count:
                queue[0][1] = count - part
            else:
                queue.popleft()
        if window[0] <= t < window[1]:
            window_in += arrived * tokens_per_request
        ttft.extend(tick_lat)
        tick_lat.append((tau, served * (tokens_per_request - 1)))
        lat.extend(tick_lat)
        tokens_done += served * tokens_per_request

        # What the replicas and routers would report this tick.
        busy = cost.math_ms(n).sum((1, 2)) / tau if n > 0 else np.zeros(G)
        load = cost.per_shard.sum((1, 2)) * n / tau * 1e3 if n > 0 else np.zeros(G)
        live = serving > 0
        tick_imbalance = imbalance(load[live] / serving[live]) if n > 0 else 0.0
        if n > 0:
            imbalances.append(tick_imbalance)
        window_load += 2 * share * (n / tau * 1e3 * DT_S if n > 0 else 0.0)
        last_load = load
        router_window.append((cost.critical_ms(n) * (DT_S / tau) if n > 0 else np.zeros(G), waiting > served))
        critical_share = critical_shares(list(sum(c for c, _ in router_window)), len(router_window) * DT_S)
        for g in range(G):
            series["critical"][str(g)].append(None if critical_share is None else float(critical_share[g]))
        for g, s in enumerate(shards):
            if s.running:
                s.busy.append(float(busy[g]))
            series["replicas"][str(g)].append(s.running)
            series["load"][str(g)].append(float(load[g]))
        series["t"].append(t)
        series["imbalance"].append(tick_imbalance)
        series["p99_ms"].append(_weighted_percentile(tick_lat, 0.99))
        replica_seconds += sum(s.allocated for s in shards) * DT_S

        if policy == "serve-default":
            # Serve counts ongoing HTTP requests per replica: always 0, since routers reach replicas over gRPC.
            want = {str(g): max(1, min(budget // G, math.ceil(0.0 / SERVE_TARGET_ONGOING))) for g in range(G)}
        elif policy.startswith("raymoe"):
            loads = {}
            for g, s in enumerate(shards):
                mean_busy = float(np.mean(s.busy)) if s.running and s.busy else None
                hot_queue = waiting > served and mean_busy is not None and mean_busy > TARGET_BUSY
                loads[str(g)] = ShardLoad(current=s.running, min_replicas=1, max_replicas=budget - (G - 1),
                                          busy=mean_busy, queued=1.0 if hot_queue else 0.0, target_replicas=s.target,
                                          critical=None if critical_share is None or not s.running
                                          else float(critical_share[g]))
            want = decide(loads, target_busy=TARGET_BUSY, max_total_replicas=budget,
                          requests_waiting=any(w for _, w in router_window))
        else:
            want = {}
        key = "serve-default" if policy == "serve-default" else "raymoe"
        moves = [(g, want[str(g)]) for g, s in enumerate(shards) if str(g) in want
                 and s.delayed(want[str(g)], t, UPSCALE_DELAY_S[key], DOWNSCALE_DELAY_S[key])]
        for g, n_new in sorted(moves, key=lambda m: m[1] - shards[m[0]].target):  # downs first: they free GPUs
            s = shards[g]
            up = n_new > s.target
            decision = {"time": t, "kind": "autoscale", "seconds_to_serving": c.replica_start_s if up else 0.0}
            decisions.append(decision)
            if up:
                s.pending.extend([decision] * (n_new - s.allocated - len(s.pending)))
                s.target = n_new
            else:
                s.resize(n_new)
        _start_pending(shards, budget, t, c.replica_start_s)

        if policy == "raymoe+replace" and (i + 1) % every == 0 and switch is None and window_load.any():
            capacity = np.array([max(1, s.running) for s in shards], dtype=np.float64)
            try:
                plan = _holdings(c, balanced_placement(window_load, capacity, c.n_experts + G))
            except ValueError:
                # eplb's greedy packing can strand a copy with no free shard that lacks its expert; the live
                # rebalance then fails the same way and the placement in force stays.
                plan = holds
            if (plan != holds).any():
                switch = (t + c.switch_s, plan, capacity)
                decisions.append({"time": t, "kind": "rebalance", "seconds_to_serving": c.switch_s})
            window_load[:] = 0.0

    for arrival, count in queue:  # still waiting: their wait so far is a lower bound on their first token
        lat.append(((end - arrival) * 1e3, count))
        ttft.append(((end - arrival) * 1e3, count))
    if kill is not None:
        kill["throughput_lost"] = float(1 - window_done / window_in) if window_in else 0.0
    return {
        "simulated": True,
        "tokens_per_s": tokens_done / end,
        "p50_ms": _weighted_percentile(lat, 0.5),
        "p99_ms": _weighted_percentile(lat, 0.99),
        "ttft_p50_ms": _weighted_percentile(ttft, 0.5),
        "ttft_p99_ms": _weighted_percentile(ttft, 0.99),
        "failed": 0,  # routers retry on a shard's other replicas; tokens with none left wait, they are not lost
        "replica_seconds": replica_seconds,
        "avg_replicas": replica_seconds / end,
        "imbalance_p50": float(np.median(imbalances)) if imbalances else 0.0,
        "decisions": decisions,
        "kill": kill,
        "series": series,
    }
