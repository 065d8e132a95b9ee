"""`raymoe bench elastic`: the expert plane under a Zipf-skewed load, scaled out, then re-placed.

A driver-side router (the real gRPC backend) sends steps of synthetic tokens: every layer, 64 sequences
whose two experts are drawn Zipf-skewed over the layer's experts, with random hidden states, to the
bundled model's experts deployed as `raymoe serve` deploys them (declaratively, one shard per expert).
Three phases of steady load, with two changes between them: first the hottest shard gets as many
replicas as its share of the load calls for (`raymoe scale`, the lightweight path), then a rebalance
re-places the hot (layer, expert) pairs with redundant copies (`raymoe rebalance`, live). Then the only replica
of a shard is killed twice: once with the re-placement's standby copies of its pairs on other shards, once after
a rebalance without them (the baseline), each time until Serve's replacement serves.

Reported, in one run: seconds from the scaling decision to the new replicas serving tokens; per-replica
imbalance (max - mean) / mean of the tokens each replica ran in each phase; the longest step during each
change against the median step of the steady phase before it; failed steps; for each kill, how long steps stalled
(from the start of the first step that found the replica gone to the end of the first step after it that ran) and
the steps that failed meanwhile (a router's engine would run them again).
"""

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.harness import percentile, two_distinct
from checkpoint.bundled import BUNDLED_MODEL


@dataclass
class ElasticBenchOptions:
    """The load and the phases."""

    zipf: float = field(default=1.2, metadata={"help": "Zipf exponent of the experts' popularity in each layer"})
    sequences: int = field(default=64, metadata={"help": "sequences per step"})
    phase_s: float = field(default=15.0, metadata={"help": "seconds of steady load before, between and after "
                                                           "the changes"})
    expert_num_cpus: float = field(default=0.1, metadata={"help": "CPUs per expert replica"})
    out: Path = field(default=Path("runs/bench_elastic.json"), metadata={"help": "results (JSON; PNG beside it)"})


def zipf_choices(rng: np.random.Generator, n: int, n_experts: int, s: float, order: np.ndarray) -> np.ndarray:
    """(n, 2) distinct experts per token, expert order[r] having popularity 1 / (r + 1)^s."""
    p = 1.0 / np.arange(1, n_experts + 1) ** s
    return two_distinct(rng, p[np.argsort(order)] / p.sum(), n)  # popularity by expert id


def run(o: ElasticBenchOptions) -> None:
    from checkpoint.reader import Checkpoint
    from cluster.deploy import deploy, free_port, scale_shard
    from cluster.directory import DirectoryClient
    from cluster.eplb import imbalance
    from cluster.expert_plane import connect_experts
    from cluster.ray_init import remove_apps, start_or_join_ray, start_serve
    from cluster.rebalance import RebalanceOptions, current_placement, rebalance, switch_placement
    from cluster.serve_config import serve_config
    from cluster.status import plane_status
    from experts.holdings import DRAIN_VIEW_S
    from router.config import EngineConfig, ExpertPlaneConfig
    from server.config import ServerConfig

    ckpt = Checkpoint(BUNDLED_MODEL)
    a = ckpt.args
    started_ray = start_or_join_ray(num_cpus=max(8, 2 * a.n_experts), log_to_driver=False)
    started_serve = start_serve({"host": "127.0.0.1", "port": free_port()})
    app = "raymoe-bench-elastic"
    cfg = serve_config(EngineConfig(model=str(BUNDLED_MODEL)),
                       ExpertPlaneConfig(expert_num_cpus=o.expert_num_cpus), ServerConfig(router_num_cpus=0.1))
    cfg["applications"][0].update(name=app, route_prefix=f"/{app}")
    deploy(cfg)
    backend = connect_experts(ckpt, torch.float32, app)
    rng = np.random.default_rng(0)
    orders = [rng.permutation(a.n_experts) for _ in range(a.n_layers)]  # each layer's own hot experts
    keys = np.arange(o.sequences, dtype=np.int64)
    w = torch.full((o.sequences, 2), 0.5)
    steps: list[tuple[float, float]] = []  # (start, seconds)
    failed = 0

    def step() -> None:
        nonlocal failed
        t = time.monotonic()
        try:
            for layer in range(a.n_layers):
                ids = torch.from_numpy(zipf_choices(rng, o.sequences, a.n_experts, o.zipf, orders[layer]))
                backend.forward(layer, torch.randn(o.sequences, a.dim), ids, w, keys)
        except Exception as e:
            failed += 1
            print(f"failed step: {e!r}")
        steps.append((t, time.monotonic() - t))

    def replica_tokens() -> dict[str, int]:
        s = plane_status(app)
        return {r["replica_id"]: sum(r["tokens"].values()) for sh in s["shards"] for r in sh["replicas"]}

    def phase(seconds: float) -> list[float]:
        before = replica_tokens()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            step()
        after = replica_tokens()
        return [after[r] - before.get(r, 0) for r in after]

    def longest(start: float, end: float) -> float:
        return 1e3 * max(d for t, d in steps if start <= t < end)

    def kill_only_replica(spare: bool) -> dict:
        """Kill the only replica of a shard (the last such listed); step until Serve's replacement has run tokens."""
        import ray

        entries = [e for e in DirectoryClient(app).replicas() if e.get("state") == "serving"]
        alone = [e for e in entries if sum(x["shard"] == e["shard"] for x in entries) == 1]
        if not alone:
            raise RuntimeError("every shard has several replicas: none to kill alone")
        victim = alone[-1]
        failed0, before = failed, {r.replica_id for rs in backend.view.values() for r in rs}
        kill_at = time.monotonic()
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        noticed = ran_at = None  # the start of the first step that found it gone; the end of the first that ran
        while True:
            n, t = failed, time.monotonic()
            step()
            if noticed is None and (failed > n or victim["replica_id"] in backend.suspect):
                noticed = t
            if noticed is not None and ran_at is None and failed == n:
                ran_at = time.monotonic()
            new = [r for r in backend.view.get(victim["shard"], []) if r.replica_id not in before]
            if ran_at is not None and any(backend.rows_sent.get(r.replica_id) for r in new):
                break
            if time.monotonic() - kill_at > 120:
                raise TimeoutError("the killed replica was not replaced within 120 s")
        return {"standby": spare, "shard": victim["shard"], "stall_s": ran_at - noticed,
                "longest_step_ms": longest(kill_at, time.monotonic()), "failed_steps": failed - failed0,
                "replaced_after_s": time.monotonic() - kill_at}

    try:
        for _ in range(5):  # warm-up: channels, pages
            step()
        t0 = time.monotonic()
        loads_before = phase(o.phase_s)
        steady_end = time.monotonic()
        # 1. Scale out the hottest shard.
        per_shard = {sh["shard"]: sum(sum(r["tokens"].values()) for r in sh["replicas"])
                     for sh in plane_status(app)["shards"]}
        hot = max(per_shard, key=per_shard.get)
        want = max(2, round(per_shard[hot] / np.mean(list(per_shard.values()))))
        old = {r.replica_id for r in backend.view.get(hot, [])}
        scale_at = time.monotonic()
        done = threading.Event()
        threading.Thread(target=lambda: (scale_shard(app, hot, want), done.set()), daemon=True).start()
        serving_at = None
        while serving_at is None or not done.is_set():
            step()
            fresh = {r for r in backend.rows_sent if r not in old} & {r.replica_id for r in backend.view.get(hot, [])}
            if serving_at is None and len(fresh) >= want - len(old):
                serving_at = time.monotonic()
            if time.monotonic() - scale_at > 120:
                raise TimeoutError("the new replicas did not serve within 120 s")
        scale_end = time.monotonic()
        loads_scaled = phase(o.phase_s)
        # 2. Re-place hot pairs by the load of the last phase, live, while steps go on.
        replace_at = time.monotonic()
        box: dict = {}

        def replace() -> None:
            box["result"] = rebalance(app, RebalanceOptions(window_s=o.phase_s))
            box["switched_at"] = time.monotonic()
        thread = threading.Thread(target=replace, daemon=True)
        thread.start()
        while thread.is_alive() or time.monotonic() < box.get("switched_at", 0) + DRAIN_VIEW_S + 1.0:
            step()
            if time.monotonic() - replace_at > 120:
                raise TimeoutError("the rebalance did not finish within 120 s")
        replace_end = time.monotonic()
        r = box["result"]
        loads_replaced = phase(o.phase_s)
        # 3. A shard's only replica dies: with the standby copies the re-placement gave its pairs, then without.
        kills = {}
        for spare in (True, False):
            if not spare:  # the same pairs, without standby copies
                _, shards, _, _ = current_placement(DirectoryClient(app).snapshot())
                v, _ = switch_placement(app, [[list(p) for p in pairs] for pairs in shards])
                while backend.routing.version < v:
                    step()
            kills["standby" if spare else "no standby"] = kill_only_replica(spare)
        failed_outside_kills = failed - sum(k["failed_steps"] for k in kills.values())
        steady = [d for t, d in steps if t0 <= t < steady_end]
        scaled = [d for t, d in steps if scale_end <= t < replace_at]
        result = {
            "zipf": o.zipf, "sequences_per_step": o.sequences, "hot_shard": hot, "hot_shard_replicas": want,
            "decision_to_serving_s": serving_at - scale_at,
            "imbalance_before": imbalance(loads_before), "imbalance_after_scale": imbalance(loads_scaled),
            "imbalance_after_replacement": imbalance(loads_replaced),
            "predicted_imbalance": {"before": r["imbalance_before"], "after": r["imbalance_after"]},
            "replacement": {"version": r["version"], "pairs_moved": r["pairs_moved"],
                            "seconds_to_switch": r["seconds"]},
            "steady_step_ms_p50": 1e3 * percentile(steady, 50),
            "scaled_step_ms_p50": 1e3 * percentile(scaled, 50),
            "longest_step_ms_during_scale": longest(scale_at, scale_end),
            "longest_step_ms_during_replacement": longest(replace_at, replace_end),
            "failed_steps": failed_outside_kills, "steps": len(steps), "kills": kills,
            "series": {"t": [t - t0 for t, _ in steps], "step_ms": [1e3 * d for _, d in steps]},
            "scale_at_s": scale_at - t0, "serving_at_s": serving_at - t0,
            "replace_at_s": replace_at - t0, "switched_at_s": box["switched_at"] - t0,
        }
    finally:
        backend.close()
        remove_apps([app], started_serve, started_ray)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_text(json.dumps(result, indent=1))
    plot(result, o.out.with_suffix(".png"))
    p50 = result["steady_step_ms_p50"]
    print(f"Zipf {o.zipf}, {o.sequences} sequences per step, bundled model ({a.n_layers} layers x {a.n_experts} "
          f"experts, one shard per expert)")
    print(f"scale-out: shard {hot} 1 -> {want} replicas; decision -> new replicas serving "
          f"{result['decision_to_serving_s']:.2f} s; longest step {result['longest_step_ms_during_scale']:.1f} ms "
          f"({result['longest_step_ms_during_scale'] / p50:.1f}x the steady p50 of {p50:.1f} ms)")
    gap, p50 = result["longest_step_ms_during_replacement"], result["scaled_step_ms_p50"]
    print(f"re-placement: v{r['version']}, {r['pairs_moved']} pair copies moved, switched in {r['seconds']:.2f} s; "
          f"longest step {gap:.1f} ms ({gap / p50:.1f}x the p50 of {p50:.1f} ms in the steady phase before it)")
    print(f"per-replica imbalance (max - mean) / mean: {result['imbalance_before']:.2f} at first, "
          f"{result['imbalance_after_scale']:.2f} after scale-out, {result['imbalance_after_replacement']:.2f} after "
          f"re-placement (predicted {r['imbalance_before']:.2f} -> {r['imbalance_after']:.2f})")
    for name, k in result["kills"].items():
        print(f"only replica of shard {k['shard']} killed, {name}: steps stalled {k['stall_s']:.2f} s (longest "
              f"{k['longest_step_ms']:.0f} ms, {k['failed_steps']} failed and to be run again) until Serve's "
              f"replacement served {k['replaced_after_s']:.1f} s after the kill")
    print(f"failed steps outside the kills: {result['failed_steps']} of {len(steps)}; {o.out}, "
          f"{o.out.with_suffix('.png')}")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.plot(r["series"]["t"], r["series"]["step_ms"], ".", ms=2, label="step (all layers)")
    ax.axvline(r["scale_at_s"], color="red", ls="--", label="scale decision")
    ax.axvline(r["serving_at_s"], color="green", ls="--", label="new replicas serving")
    ax.axvline(r["replace_at_s"], color="purple", ls="--", label="rebalance decision")
    ax.axvline(r["switched_at_s"], color="orange", ls="--", label="routers switch placement")
    ax.set_xlabel("seconds")
    ax.set_ylabel("step time (ms)")
    ax.set_yscale("log")
    ax.set_title(f"per-replica imbalance {r['imbalance_before']:.2f} -> {r['imbalance_after_scale']:.2f} (shard "
                 f"{r['hot_shard']} x{r['hot_shard_replicas']}) -> {r['imbalance_after_replacement']:.2f} "
                 f"(re-placed); {r['failed_steps']} failed steps")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
