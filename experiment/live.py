"""One live run of the hot-experts experiment: a policy's expert plane on Ray Serve, driven open-loop.

Each (workload, policy) runs on an expert plane (the plane alone, from `raymoe config`'s settings, through
the declarative path KubeRay uses) reset to its starting state at the same replica budget, and a
driver-side router that sends it tokens over the real gRPC data plane: synthetic hidden states and gate
choices for the synthetic workloads, the bundled model itself (attention, gate, sampling) for `real`.
Requests arrive by Poisson; those that find the batch full wait, and their wait counts in their first
token's latency.

Every second the run samples the directory (serving replicas per shard) and the router's own counts
((token, expert) slots each replica computed), giving replicas and load per shard and per-replica imbalance
over time.
"""

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from ray import serve

from bench.harness import percentile
from checkpoint.reader import Checkpoint
from cluster.autoscaling import decisions, router_load, router_shares
from cluster.deploy import apply
from cluster.directory import DirectoryClient
from cluster.eplb import imbalance
from cluster.expert_plane import connect_experts
from cluster.serve_config import serve_config
from experiment.workloads import POLICIES, Workload, arrivals
from router.config import EngineConfig, ExpertPlaneConfig
from router.dispatch import Backoff, ExpertsUnavailable
from server.config import ServerConfig

log = logging.getLogger(__name__)

PLANE_IMPORT_PATH = "cluster.expert_plane:build_expert_plane_app"
GIVE_UP_S = 60.0  # a step that cannot reach its experts for this long fails its requests
# The policy takes over once the replicas' load window (experts.load, 5 s) holds only the run's traffic: let loose
# earlier, it reads the idle pause before the run as a plane to shrink.
POLICY_AFTER_S = 5.0
FIRST_REPLACE_S = 2.0  # four of the routers' 0.5 s load reports
SWITCH_S = 2.0  # about what a live re-placement takes to switch (see cluster.rebalance.switch_placement)
CALIBRATED_LOAD = 0.7  # the default arrival rate's share of what the starting plane decodes: busy, not drowning


@dataclass
class LiveRun:
    """What a live run needs besides the workload and the policy."""

    model: str
    num_shards: int
    budget: int  # replicas, all shards together
    duration_s: float
    rate: float | None  # requests/s; None: measured before the first run of each kind (synthetic, model)
    tokens_per_request: int
    max_batch: int
    expert_num_cpus: float
    replace_every_s: float
    kill_at_s: float | None = None
    seed: int = 0
    paced_ms: tuple[float, float] = (0.0, 0.0)  # replicas as devices of their own: ms per expert, per row
    prompts: list[list[int]] = field(default_factory=list)  # token ids, for `real`
    rates: dict[str, float] = field(default_factory=dict)  # the rate used per kind of workload
    applied: dict[str, str] = field(default_factory=dict)  # plane -> the policy its config is now ("pinned")


def group(policy: str) -> str:
    """Policies that run on the same deployed plane: their configs differ only in options Serve changes in place
    (autoscaling bounds), so switching between them restarts no replica."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    return "raymoe" if policy.startswith("raymoe") else "fixed"


def plane_app(policy: str, r: LiveRun, name: str, pinned: bool = False) -> dict:
    """The Serve app of `policy`'s expert plane; every policy starts from budget // num_shards replicas a shard.

    static: that count, fixed (autoscaling bounds pinned to it, so that it shares a plane with serve-default).
    serve-default: Serve's own autoscaler as its docs configure it (request-based, target 2 ongoing requests,
    Serve's default delays, the budget as max), which counts the requests Serve routes: none, since routers
    call replicas over gRPC. raymoe: raymoe's policy (busy fraction toward 0.6, the budget shared out,
    hottest first). raymoe+replace: the same, plus a rebalance every replace_every_s (run_policy calls it).
    pinned: the policy's plane held at the starting counts (between runs).
    """
    each = r.budget // r.num_shards
    common = dict(num_shards=r.num_shards, expert_num_cpus=r.expert_num_cpus,
                  paced_expert_ms=r.paced_ms[0] or None, paced_row_ms=r.paced_ms[1] or None)
    if group(policy) == "raymoe":
        plane = ExpertPlaneConfig(replicas_per_shard=1, max_replicas_per_shard=r.budget - (r.num_shards - 1),
                                  max_total_replicas=r.budget, **common)
    else:
        plane = ExpertPlaneConfig(replicas_per_shard=each, **common)
    cfg = serve_config(EngineConfig(model=r.model), plane, ServerConfig())
    app = cfg["applications"][0]
    app.update(name=name, route_prefix=f"/{name}", import_path=PLANE_IMPORT_PATH)
    for dep in app["deployments"]:
        dep.pop("num_replicas", None)
        bounds = dep.setdefault("autoscaling_config", {})
        if pinned or policy == "static":
            bounds.update(min_replicas=each, initial_replicas=each, max_replicas=each)
        elif policy == "serve-default":
            bounds.update(min_replicas=1, initial_replicas=each, max_replicas=each, target_ongoing_requests=2)
        else:
            bounds["initial_replicas"] = each  # start as static does, move from there
    return app


def reset(name: str, policy: str, r: LiveRun, n_layers: int, n_experts: int, timeout_s: float = 120.0) -> None:
    """Bring a plane used by an earlier run back to the start: every shard pinned at its starting count, the
    deployed placement, no replica draining. The policy's own bounds go on once traffic has flowed for
    POLICY_AFTER_S (start_policy): an autoscaler let loose on an idle plane would shrink it before the run begins."""
    from cluster.placement import PlacementPlan
    from cluster.rebalance import current_placement, switch_placement

    if r.applied.get(name) not in ("pinned", "static"):  # static's bounds are the pinned ones
        apply([plane_app(policy, r, name, pinned=True)])
        r.applied[name] = "pinned"
    each = r.budget // r.num_shards
    directory = DirectoryClient(name)
    deadline = time.monotonic() + timeout_s
    while True:
        snap = directory.snapshot()
        counts = [sum(e["shard"] == s for e in snap["replicas"]) for s in range(r.num_shards)]
        if counts == [each] * r.num_shards and all(e.get("state") == "serving" for e in snap["replicas"]):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"plane {name!r} did not return to {each} replicas a shard: {counts}")
        time.sleep(0.2)
    base = [list(s.pairs) for s in PlacementPlan.expert_parallel(n_layers, n_experts, r.num_shards).shards]
    version, shards, standby, _ = current_placement(snap)
    if version and ([sorted(map(tuple, s)) for s in shards] != [sorted(s) for s in base] or any(standby)):
        switch_placement(name, base)
        time.sleep(1.2)  # the routers' view refresh (0.5 s) with room: the next run starts from what the directory says


def start_policy(name: str, policy: str, r: LiveRun, at: float) -> None:
    """Lift the pinned bounds to the policy's at monotonic time `at` (a lightweight update: no replica restarts)."""
    time.sleep(max(0.0, at - time.monotonic()))
    apply([plane_app(policy, r, name)])
    r.applied[name] = policy


class Recorder:
    """Token times of every request, and the 1 Hz series of the plane as the directory and router see it."""

    def __init__(self, n_shards: int, t0: float):
        self.t0, self.n_shards = t0, n_shards
        self.arrived: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.first: dict[int, float] = {}  # time of each request's first token
        self.itl: list[tuple[float, float]] = []  # (time, latency) of every token after a request's first
        self.done_tokens: list[float] = []  # completion time of every token
        self.finished: dict[int, float] = {}
        self.failed = 0
        self.series: dict = {"t": [], "replicas": {str(s): [] for s in range(n_shards)},
                             "load": {str(s): [] for s in range(n_shards)},
                             "critical": {str(s): [] for s in range(n_shards)}, "imbalance": [], "p99_ms": []}

    def token(self, rid: int, now: float) -> None:
        if rid in self.last:
            self.itl.append((now, now - self.last[rid]))
        else:
            self.first[rid] = now
        self.last[rid] = now
        self.done_tokens.append(now)

    @property
    def ttft(self) -> list[float]:
        return [f - self.arrived[rid] for rid, f in self.first.items()]


class Sampler(threading.Thread):
    """Once a second: serving replicas per shard (directory), (token, expert) slots per replica and shard (router
    counts: a replica's work, whichever of its rows carry them), each shard's share of the routers' layer waits
    (what the autoscaling policy reads)."""

    def __init__(self, rec: Recorder, directory: DirectoryClient, slots_sent: dict[str, int]):
        super().__init__(name="sampler", daemon=True)
        self.rec, self.directory, self.slots_sent = rec, directory, slots_sent
        self.stop = threading.Event()
        self.shard_of: dict[str, int] = {}
        self.per_replica: list[tuple[float, dict[str, int]]] = []  # (time, slots each serving replica ran that second)

    def run(self) -> None:
        before = dict(self.slots_sent)
        next_t = time.monotonic() + 1.0
        while not self.stop.wait(max(0.0, next_t - time.monotonic())):
            next_t += 1.0
            try:
                entries = [e for e in self.directory.snapshot()["replicas"] if e.get("state") == "serving"]
            except Exception as e:  # the directory may be restarting: skip this second
                log.warning("sampler: %r", e)
                continue
            now = dict(self.slots_sent)
            self.shard_of.update({e["replica_id"]: e["shard"] for e in entries})
            per_replica = {e["replica_id"]: now.get(e["replica_id"], 0) - before.get(e["replica_id"], 0)
                           for e in entries}
            before = now
            s = self.rec.series
            s["t"].append(round(time.monotonic() - self.rec.t0, 2))
            self.per_replica.append((s["t"][-1], per_replica))
            for shard in range(self.rec.n_shards):
                s["replicas"][str(shard)].append(sum(e["shard"] == shard for e in entries))
                s["load"][str(shard)].append(sum(n for rid, n in per_replica.items() if self.shard_of[rid] == shard))
            shares = router_shares(router_load(self.directory.app))
            for shard in range(self.rec.n_shards):
                s["critical"][str(shard)].append(shares.get(shard))
            s["imbalance"].append(imbalance(list(per_replica.values())) if per_replica else 0.0)
            recent = [lat for t, lat in self.rec.itl[-5000:] if t >= time.monotonic() - 1.0]
            s["p99_ms"].append(1e3 * percentile(recent, 99) if recent else None)


def kill_hottest(app: str, series: dict) -> dict:
    """Kill one serving replica of the shard with the most load over the last 5 s (Serve restarts it)."""
    import ray

    load = {int(s): sum(v[-5:]) for s, v in series["load"].items()}
    hot = max(load, key=load.get)
    entry = next(e for e in DirectoryClient(app).replicas() if e["shard"] == hot and e.get("state") == "serving")
    ray.kill(ray.get_actor(entry["actor_name"], namespace="serve"), no_restart=True)
    return {"shard": hot, "replica_id": entry["replica_id"]}


def deploy_planes(policies: list[str], r: LiveRun) -> dict[str, str]:
    """One plane per group of policies, deployed at once (their processes start together), held at the starting
    counts until a run resets one to its policy; -> group -> plane name."""
    names = {group(p): f"hot-experts-{group(p)}" for p in policies}
    first = {g: next(p for p in policies if group(p) == g) for g in names}
    apply([plane_app(first[g], r, name, pinned=True) for g, name in names.items()])
    r.applied.update(dict.fromkeys(names.values(), "pinned"))
    return names


def run_policy(w: Workload, policy: str, r: LiveRun, name: str) -> dict:
    """Reset plane `name` to `policy` at its starting state, drive `w` through it for r.duration_s; -> the
    policy's result entry."""
    ckpt = Checkpoint(r.model)
    a = ckpt.args
    reset(name, policy, r, a.n_layers, a.n_experts)
    backend = connect_experts(ckpt, torch.float32, name)
    rng = np.random.default_rng(r.seed)
    try:
        warm(backend, a, r)
        kind = "model" if w.real else "synthetic"
        if kind not in r.rates:
            full = (model_capacity(ckpt, backend, r) if w.real else capacity(backend, a, r))
            r.rates[kind] = r.rate or CALIBRATED_LOAD * full
            log.info("%s workloads: %.1f requests/s (%.0f%% of the %.1f this plane serves with full batches)", kind,
                     r.rates[kind], 100 * r.rates[kind] / full, full)
        times = arrivals(rng, w, r.rates[kind], r.duration_s)
        backend.forget_load()  # the warm-up's and the calibration's: the first re-placement would balance on them
        t0 = time.monotonic()
        rec = Recorder(r.num_shards, t0)
        sampler = Sampler(rec, DirectoryClient(name), backend.slots_sent)
        sampler.start()
        background = [] if policy == "static" else [  # static's bounds are the pinned ones
            threading.Thread(target=start_policy, args=(name, policy, r, t0 + POLICY_AFTER_S), daemon=True)]
        kill: dict = {}
        if r.kill_at_s is not None:
            def do_kill():
                time.sleep(max(0.0, t0 + r.kill_at_s - time.monotonic()))
                kill.update(at=round(time.monotonic() - t0, 2), **kill_hottest(name, rec.series))
            background.append(threading.Thread(target=do_kill, daemon=True))
        if policy == "raymoe+replace":
            background.append(threading.Thread(target=replace_every, args=(name, r, sampler.stop), daemon=True))
        for t in background:
            t.start()
        if w.real:
            drive_model(ckpt, backend, times, rec, r)
        else:
            drive_synthetic(w, backend, a, times, rec, r, rng)
        sampler.stop.set()
        sampler.join()
        for t in background:
            t.join()
        return summarize(rec, r, decisions(name), t0, kill or None, sampler.per_replica)
    finally:
        backend.close()


def replace_every(name: str, r: LiveRun, stop: threading.Event) -> None:
    """raymoe+replace: `raymoe rebalance` every replace_every_s on the load of that window, and whenever a shard's
    replica count changes (as the plane's own --rebalance-interval-s does); the first FIRST_REPLACE_S into the
    run, as soon as the routers have reported a few steps of its skew."""
    from cluster.plane_ingress import PERIODIC_MIN_GAIN
    from cluster.rebalance import RebalanceOptions, rebalance_loop

    o = RebalanceOptions(window_s=r.replace_every_s, min_gain=PERIODIC_MIN_GAIN)
    rebalance_loop(name, o, r.replace_every_s, stop, first_s=min(FIRST_REPLACE_S, r.replace_every_s))


def remove(name: str) -> None:
    """Delete a plane without waiting for its replicas to drain and exit: the next plane starts meanwhile."""
    serve.delete(name, _blocking=False)
    DirectoryClient(name).remove_app()


def warm(backend, a, r: LiveRun) -> None:
    """A few steps through every layer, so channels and pages are warm before the clock starts."""
    x, w = torch.randn(r.max_batch, a.dim), torch.full((r.max_batch, 2), 0.5)
    ids = torch.stack([torch.arange(r.max_batch) % a.n_experts, (torch.arange(r.max_batch) + 1) % a.n_experts], 1)
    keys = np.arange(r.max_batch, dtype=np.int64)
    for _ in range(3):
        for layer in range(a.n_layers):
            backend.forward(layer, x, ids, w, keys)


def capacity(backend, a, r: LiveRun, seconds: float = 2.0) -> float:
    """Requests/s this plane completes with the batch always full of zipf-1.2 tokens (closed loop)."""
    from experiment.workloads import workload

    rng = np.random.default_rng(r.seed + 1)
    w = workload("zipf-1.2", r.duration_s)
    x, weights = torch.randn(r.max_batch, a.dim), torch.full((r.max_batch, 2), 0.5)
    keys = np.arange(r.max_batch, dtype=np.int64)
    steps, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        synthetic_step(backend, w, rng, a, 0.0, x, weights, keys)
        steps += 1
    return steps * r.max_batch / (time.monotonic() - t0) / r.tokens_per_request


def model_capacity(ckpt: Checkpoint, backend, r: LiveRun, max_s: float = 180.0) -> float:
    """Requests/s the bundled model serves through this plane with its batch kept full (closed loop), over the
    time it takes to finish a batch's worth of requests: each one finished is replaced by a new one, so prefills
    count as they do in the run, not only decode steps."""
    from router.engine import Engine
    from router.model import RouterModel
    from router.sampling import SamplingParams

    engine = Engine(RouterModel.from_checkpoint(ckpt, torch.float32), backend,
                    EngineConfig(model=r.model, max_num_seqs=r.max_batch))
    params = SamplingParams(temperature=0.0, max_tokens=r.tokens_per_request, ignore_eos=True)
    added = 0

    def add() -> None:
        nonlocal added
        engine.add_request(r.prompts[added % len(r.prompts)], params)
        added += 1

    for _ in range(r.max_batch):
        add()
    done, t0 = 0, time.monotonic()
    while done < r.max_batch and time.monotonic() - t0 < max_s:
        for s in engine.step():
            if s.finished:
                done += 1
                add()
    if not done:
        raise RuntimeError(f"the model finished no request in {max_s:.0f}s through this plane: pass --rate")
    return done / (time.monotonic() - t0)


def with_retries(fn, rec: Recorder, ids: list[int]):
    """Run a step, again after a backoff while the experts are unavailable; None once it gave up (its requests
    failed)."""
    backoff, deadline = Backoff(), time.monotonic() + GIVE_UP_S
    while True:
        try:
            return fn()
        except ExpertsUnavailable as e:
            if time.monotonic() > deadline:
                log.warning("giving up on %d requests: %s", len(ids), e)
                rec.failed += len(ids)
                return None
            time.sleep(backoff.failed())


def synthetic_step(backend, w: Workload, rng: np.random.Generator, a, now: float, x: torch.Tensor,
                   weights: torch.Tensor, keys: np.ndarray) -> bool:
    """One decode step of len(keys) sequences through every layer, each token's experts drawn from `w` at `now`."""
    for layer in range(a.n_layers):
        choice = torch.from_numpy(w.choices(rng, len(keys), layer, now, a.n_layers, a.n_experts))
        backend.forward(layer, x, choice, weights, keys)
    return True


def drive_synthetic(w: Workload, backend, a, times: np.ndarray, rec: Recorder, r: LiveRun,
                    rng: np.random.Generator) -> None:
    waiting: deque[int] = deque()
    active: dict[int, int] = {}  # request -> tokens left
    x_pool = torch.randn(r.max_batch, a.dim)
    nxt = 0
    while True:
        now = time.monotonic() - rec.t0
        while nxt < len(times) and times[nxt] <= now:
            rec.arrived[nxt] = rec.t0 + times[nxt]
            waiting.append(nxt)
            nxt += 1
        while waiting and len(active) < r.max_batch:
            active[waiting.popleft()] = r.tokens_per_request
        backend.note_waiting(len(waiting))  # as the engine does: the autoscaler's sign that capacity is short
        if not active:
            if nxt >= len(times):
                return
            time.sleep(max(0.0, rec.t0 + times[nxt] - time.monotonic()))
            continue
        ids_ = list(active)
        n = len(ids_)
        keys = np.array(ids_, dtype=np.int64)
        weights = torch.full((n, 2), 0.5)

        ok = with_retries(partial(synthetic_step, backend, w, rng, a, now, x_pool[:n], weights, keys), rec, ids_)
        t = time.monotonic()
        for rid in ids_:
            if ok is None:
                del active[rid]
                continue
            rec.token(rid, t)
            active[rid] -= 1
            if active[rid] == 0:
                del active[rid]
                rec.finished[rid] = t


def drive_model(ckpt: Checkpoint, backend, times: np.ndarray, rec: Recorder, r: LiveRun) -> None:
    """The bundled model serving held-out prompts: its own attention, gate and sampling in this process."""
    from router.engine import Engine
    from router.model import RouterModel
    from router.sampling import SamplingParams

    engine = Engine(RouterModel.from_checkpoint(ckpt, torch.float32), backend,
                    EngineConfig(model=r.model, max_num_seqs=r.max_batch))
    params = SamplingParams(temperature=0.0, max_tokens=r.tokens_per_request, ignore_eos=True)
    seq_of: dict[str, int] = {}
    nxt = 0
    while True:
        now = time.monotonic() - rec.t0
        while nxt < len(times) and times[nxt] <= now:
            rec.arrived[nxt] = rec.t0 + times[nxt]
            seq = engine.add_request(r.prompts[nxt % len(r.prompts)], params, seq_id=f"r{nxt}")
            seq_of[seq.seq_id] = nxt
            nxt += 1
        if not engine.has_unfinished():
            if nxt >= len(times):
                return
            time.sleep(max(0.0, rec.t0 + times[nxt] - time.monotonic()))
            continue
        running = [seq_of[s.seq_id] for s in engine.running]
        updated = with_retries(engine.step, rec, running)
        if updated is None:
            for s in list(engine.running) + list(engine.waiting):
                engine.abort(s.seq_id)
            continue
        t = time.monotonic()
        for s in updated:
            if s.output_ids:
                rec.token(seq_of[s.seq_id], t)
            if s.finished:
                rec.finished[seq_of[s.seq_id]] = t


DECISION = re.compile(r"ExpertShard-(\d+): (\d+) -> (\d+) replicas")
READY = re.compile(r"ready in ([\d.]+)s")


def decision_entries(log_: list[dict], t0_wall: float, series: dict) -> list[dict]:
    """The app's decision log as {"time" (s into the run), "kind", "seconds_to_serving", "detail"}: for a scale-up,
    the seconds until the directory counts that many serving replicas; for a rebalance, until the switch."""
    out = []
    for d in log_:
        t = d["time"] - t0_wall
        seconds = None
        m = DECISION.search(d["detail"])
        if m and int(m[3]) > int(m[2]):
            shard, want = m[1], int(m[3])
            seconds = next((ts - t for ts, n in zip(series["t"], series["replicas"].get(shard, []), strict=False)
                            if ts >= t and n >= want), None)
        elif m:
            seconds = 0.0
        elif (m := READY.search(d["detail"])) is not None:
            seconds = float(m[1])
        out.append({"time": round(t, 2), "kind": d["kind"], "seconds_to_serving": seconds, "detail": d["detail"]})
    return out


def backlog(rec: Recorder, t: float, tokens_per_request: int) -> int:
    """Tokens asked for by requests arrived by monotonic time t and not yet produced by then."""
    demanded = tokens_per_request * sum(a <= t for a in rec.arrived.values())
    return demanded - int(np.searchsorted(rec.done_tokens, t, side="right"))


def kept_pace_backlog(rec: Recorder, t: float, tokens_per_request: int, ttft: float, itl: float) -> int:
    """Tokens asked for by requests arrived by monotonic time t that a plane keeping a steady pace (a request's
    first token ttft after its arrival, one more every itl) would not have produced by then."""
    owed = 0
    for a in rec.arrived.values():
        if a <= t:
            made = 0 if t < a + ttft else min(tokens_per_request, 1 + int((t - a - ttft) / itl))
            owed += tokens_per_request - made
    return owed


def throughput_lost(rec: Recorder, at: float, r: LiveRun, before_s: float = 10.0, end_s: float = 5.0) -> float:
    """The share of the tokens asked for in the minute around `at` (within the run) that the kill cost: how far
    the backlog over the minute's last end_s seconds exceeds the backlog the plane would have carried at the
    pace it kept over the before_s seconds before the kill (mean TTFT and inter-token latency), for the same
    arrivals. Tokens merely delayed and caught up within the minute are not lost; requests still in flight when
    the minute ends are not a loss either, however many arrived just then (a clump of Poisson arrivals at the
    end would otherwise read as one)."""
    lo = rec.t0 + max(0.0, at - 30)
    hi = min(rec.t0 + at + 30, max(rec.arrived.values(), default=lo))
    demanded = r.tokens_per_request * sum(lo <= a < hi for a in rec.arrived.values())
    if not demanded:
        return 0.0
    since = rec.t0 + max(0.0, at - before_s)
    ttft = [f - rec.arrived[rid] for rid, f in rec.first.items() if since <= f < rec.t0 + at]
    itl = [lat for t, lat in rec.itl if since <= t < rec.t0 + at]
    if not ttft or not itl:
        return 0.0
    pace = (float(np.mean(ttft)), float(np.mean(itl)))
    excess = np.mean([backlog(rec, t, r.tokens_per_request) - kept_pace_backlog(rec, t, r.tokens_per_request, *pace)
                      for t in np.linspace(max(lo, hi - end_s), hi, 11)])
    return max(0.0, float(excess) / demanded)


def settled_imbalance(per_replica: list[tuple[float, dict[str, int]]], since: float, min_s: int = 5) -> float | None:
    """Per-replica imbalance of the (token, expert) slots each replica ran, from `since` (s into the run) on, each
    replica's slots set against the mean of all serving replicas' in the same seconds: load rises and falls over a
    run, and a replica that served only its busy part (one started late) is not uneven for it. A replica serving
    fewer than min_s of those seconds (starting, killed) is left out. Over many seconds, so that it says how even
    the placement and the spread are, not how many slots one second drew.

    Example: replica a ran 100 and 120 slots in two seconds, b 90 and 90, c 30 in the second: the seconds' means are
    95 and 80, so a ran 220 / 175 = 1.26 of the mean, b 1.03 (c left out with min_s 2): imbalance
    (1.26 - 1.14) / 1.14 = 0.1. Had a and b run 100 each, then a, b and c 200 each, every replica ran the mean: 0.
    """
    ran: dict[str, float] = {}
    expected: dict[str, float] = {}
    seconds: dict[str, int] = {}
    for t, counts in per_replica:
        if t < since or not counts:
            continue
        mean = sum(counts.values()) / len(counts)
        for rid, n in counts.items():
            ran[rid] = ran.get(rid, 0) + n
            expected[rid] = expected.get(rid, 0.0) + mean
            seconds[rid] = seconds.get(rid, 0) + 1
    rel = [ran[rid] / expected[rid] for rid in ran if seconds[rid] >= min_s and expected[rid] > 0]
    return imbalance(rel) if len(rel) > 1 else None


def summarize(rec: Recorder, r: LiveRun, log_: list[dict], t0: float, kill: dict | None,
              per_replica: list[tuple[float, dict[str, int]]]) -> dict:
    wall0 = time.time() - (time.monotonic() - t0)
    span = max(rec.done_tokens[-1] - t0, 1e-9) if rec.done_tokens else r.duration_s
    replicas = [sum(v[i] for v in rec.series["replicas"].values()) for i in range(len(rec.series["t"]))]
    rec.series["backlog"] = [int(backlog(rec, rec.t0 + t, r.tokens_per_request)) for t in rec.series["t"]]
    itl = [lat for _, lat in rec.itl]
    ttft = rec.ttft
    out = {
        "simulated": False,
        "tokens_per_s": len(rec.done_tokens) / span,
        "p50_ms": 1e3 * percentile(itl, 50) if itl else None, "p99_ms": 1e3 * percentile(itl, 99) if itl else None,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50) if ttft else None,
        "ttft_p99_ms": 1e3 * percentile(ttft, 99) if ttft else None,
        "failed": rec.failed, "requests": len(rec.arrived),
        "replica_seconds": float(sum(replicas)), "avg_replicas": float(np.mean(replicas)) if replicas else 0.0,
        "imbalance_p50": float(np.median(rec.series["imbalance"])) if rec.series["imbalance"] else None,
        "decisions": [d for d in decision_entries(log_, wall0, rec.series) if d["time"] >= -5],
        "kill": None, "series": rec.series,
    }
    # From the first re-placement's switch on (or, for the policies that never re-place, the time it would have
    # come), so that every policy is judged over the same part of the run.
    first = min((d["time"] + (d["seconds_to_serving"] or 0.0) for d in out["decisions"] if d["kind"] == "rebalance"),
                default=min(FIRST_REPLACE_S, r.replace_every_s) + SWITCH_S)
    out["imbalance_after_replace"] = settled_imbalance(per_replica, first)
    if kill is not None:
        out["kill"] = {**kill, "failed": rec.failed, "throughput_lost": throughput_lost(rec, kill["at"], r)}
        out["decisions"].append({"time": kill["at"], "kind": "kill", "seconds_to_serving": None,
                                 "detail": f"replica {kill['replica_id']} of shard {kill['shard']} killed"})
    return out
