"""`raymoe bench elastic`: the expert plane under a Zipf-skewed load while the hottest shard is scaled out.

A driver-side router (the real gRPC backend) sends steps of synthetic tokens: every layer, 64 sequences
whose two experts are drawn Zipf-skewed over the layer's experts, with random hidden states, to the
bundled model's experts deployed as `raymoe serve` deploys them (declaratively, one shard per expert).
Mid-run the hottest shard gets as many replicas as its share of the load calls for (`raymoe scale`,
the lightweight path). Reported, in one run: seconds from that decision to the new replicas serving
tokens, per-replica imbalance (max - mean) / mean of the tokens each replica ran before and after, the
longest gap between steps during the change against the steady median, and failed calls.
Re-placement of hot (layer, expert) pairs across shards is not built yet; this measures scale-out only.
"""

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.harness import percentile
from checkpoint.bundled import BUNDLED_MODEL


@dataclass
class ElasticBenchOptions:
    """The load and the phases."""

    zipf: float = field(default=1.2, metadata={"help": "Zipf exponent of the experts' popularity in each layer"})
    sequences: int = field(default=64, metadata={"help": "sequences per step"})
    phase_s: float = field(default=15.0, metadata={"help": "seconds of steady load before and after the change"})
    expert_num_cpus: float = field(default=0.1, metadata={"help": "CPUs per expert replica"})
    out: Path = field(default=Path("runs/bench_elastic.json"), metadata={"help": "results (JSON; PNG beside it)"})


def zipf_choices(rng: np.random.Generator, n: int, n_experts: int, s: float, order: np.ndarray) -> np.ndarray:
    """(n, 2) distinct experts per token, expert order[r] having popularity 1 / (r + 1)^s."""
    p = 1.0 / np.arange(1, n_experts + 1) ** s
    p = p[np.argsort(order)] / p.sum()  # popularity by expert id
    first = rng.choice(n_experts, size=n, p=p)
    q = np.tile(p, (n, 1))
    q[np.arange(n), first] = 0
    q /= q.sum(1, keepdims=True)
    second = (q.cumsum(1) > rng.random((n, 1))).argmax(1)
    return np.stack([first, second], 1)


def imbalance(loads: list[float]) -> float:
    mean = float(np.mean(loads))
    return (max(loads) - mean) / mean if mean else 0.0


def run(o: ElasticBenchOptions) -> None:
    from checkpoint.reader import Checkpoint
    from cluster.deploy import deploy, free_port, scale_shard
    from cluster.expert_plane import connect_experts
    from cluster.ray_init import remove_apps, start_or_join_ray, start_serve
    from cluster.serve_config import serve_config
    from cluster.status import plane_status
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

    try:
        for _ in range(5):  # warm-up: channels, pages
            step()
        t0 = time.monotonic()
        loads_before = phase(o.phase_s)
        per_shard = {sh["shard"]: sum(sum(r["tokens"].values()) for r in sh["replicas"])
                     for sh in plane_status(app)["shards"]}
        hot = max(per_shard, key=per_shard.get)
        want = max(2, round(per_shard[hot] / np.mean(list(per_shard.values()))))
        old = {r.replica_id for r in backend.view.get(hot, [])}
        change_at = time.monotonic()
        done = threading.Event()
        threading.Thread(target=lambda: (scale_shard(app, hot, want), done.set()), daemon=True).start()
        serving_at = None
        while serving_at is None or not done.is_set():
            step()
            fresh = {r for r in backend.rows_sent if r not in old} & {r.replica_id for r in backend.view.get(hot, [])}
            if serving_at is None and len(fresh) >= want - len(old):
                serving_at = time.monotonic()
            if time.monotonic() - change_at > 120:
                raise TimeoutError("the new replicas did not serve within 120 s")
        change_end = time.monotonic()
        loads_after = phase(o.phase_s)
        steady = [d for t, d in steps if t0 <= t < change_at]
        during = [d for t, d in steps if change_at <= t < change_end]
        result = {
            "zipf": o.zipf, "sequences_per_step": o.sequences, "hot_shard": hot, "hot_shard_replicas": want,
            "decision_to_serving_s": serving_at - change_at,
            "imbalance_before": imbalance(loads_before), "imbalance_after": imbalance(loads_after),
            "steady_step_ms_p50": 1e3 * percentile(steady, 50),
            "longest_step_ms_during_change": 1e3 * max(during),
            "failed_steps": failed, "steps": len(steps),
            "series": {"t": [t - t0 for t, _ in steps], "step_ms": [1e3 * d for _, d in steps]},
            "change_at_s": change_at - t0, "serving_at_s": serving_at - t0,
        }
    finally:
        backend.close()
        remove_apps([app], started_serve, started_ray)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_text(json.dumps(result, indent=1))
    plot(result, o.out.with_suffix(".png"))
    print(f"Zipf {o.zipf}, {o.sequences} sequences per step, bundled model ({a.n_layers} layers x {a.n_experts} "
          f"experts, one shard per expert); shard {hot} scaled 1 -> {want} replicas")
    print(f"decision -> new replicas serving: {result['decision_to_serving_s']:.2f} s")
    print(f"per-replica imbalance (max - mean) / mean: {result['imbalance_before']:.2f} before, "
          f"{result['imbalance_after']:.2f} after")
    gap, p50 = result["longest_step_ms_during_change"], result["steady_step_ms_p50"]
    print(f"longest step during the change {gap:.1f} ms vs steady p50 {p50:.1f} ms ({gap / p50:.1f}x)")
    print(f"failed steps: {failed} of {len(steps)}; {o.out}, {o.out.with_suffix('.png')}")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(r["series"]["t"], r["series"]["step_ms"], ".", ms=2, label="step (all layers)")
    ax.axvline(r["change_at_s"], color="red", ls="--", label="scale decision")
    ax.axvline(r["serving_at_s"], color="green", ls="--", label="new replicas serving")
    ax.set_xlabel("seconds")
    ax.set_ylabel("step time (ms)")
    ax.set_yscale("log")
    ax.set_title(f"hot shard {r['hot_shard']} scaled to {r['hot_shard_replicas']}: imbalance "
                 f"{r['imbalance_before']:.2f} -> {r['imbalance_after']:.2f}, {r['failed_steps']} failed steps")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
