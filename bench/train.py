"""`raymoe bench train`: expert-parallel training throughput and the all-to-all's share of a step.

Each layout in --ep runs on the same number of ranks (E x world/E) in one TorchTrainer launch, one after
the other, on the same seed and data. Per layout: tokens/s per rank (its rows of the global batch over
the mean step time, the first step left out) and the share of step time inside all-to-all calls (token
counts and rows, forward and backward, timed to completion), averaged over the ranks. On CPUs the
exchange is gloo over loopback and every rank shares the machine's cores, so read the shares beside
each other, not as a network's.
"""

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class TrainBenchOptions:
    """The layouts and the model."""

    ep: list[int] = field(default_factory=lambda: [2, 4], metadata={
        "help": "expert-parallel sizes, one run each (data-parallel copies fill the rest of --world-size)"})
    world_size: int = field(default=4, metadata={"help": "ranks of every run"})
    steps: int = field(default=6, metadata={"help": "steps per run (the first is not timed)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step over all ranks"})
    seq_len: int = field(default=64, metadata={"help": "tokens per sequence"})
    dim: int = field(default=64, metadata={"help": "model width"})
    hidden_dim: int = field(default=128, metadata={"help": "expert intermediate size"})
    n_layers: int = field(default=2, metadata={"help": "layers"})
    n_experts: int = field(default=8, metadata={"help": "experts per layer"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per rank, NCCL"})
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs per rank (default: 1, or the cluster's free CPUs shared out)"})
    out: Path = field(default=Path("runs/bench_train.json"), metadata={"help": "results (JSON)"})


def run(o: TrainBenchOptions) -> None:
    from cluster.ray_init import start_or_join_ray
    from training.ep_train import EPTrainConfig, Job, fit, load_tokens

    start_or_join_ray(log_to_driver=False)
    cfg = EPTrainConfig(tiny=True, steps=o.steps, batch_size=o.batch_size, warmup=0).resolved()
    # tiny=False: the shape is the bench's own from here (resolving again would put the tiny one back)
    cfg = replace(cfg, tiny=False, seq_len=o.seq_len, dim=o.dim, hidden_dim=o.hidden_dim, n_layers=o.n_layers,
                  n_experts=o.n_experts)
    cfg, data, _ = load_tokens(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [Job(f"ep{e}", replace(cfg, ep=e, dp=o.world_size // e, out=Path(tmp) / f"ep{e}").resolved())
                for e in o.ep]
        fit(jobs, data, use_gpu=o.use_gpu, cpus_per_worker=o.cpus_per_worker)
        for job in jobs:
            s = json.loads((job.cfg.out / "training.json").read_text())
            rows.append({"ep": job.cfg.ep, "dp": job.cfg.dp, "backend": s["layout"]["backend"],
                         "step_ms": 1e3 * s["step_seconds"], "tokens_per_s_per_rank": s["tokens_per_second_per_rank"],
                         "all_to_all_share": s["all_to_all_share"]})
    o.out.parent.mkdir(parents=True, exist_ok=True)
    o.out.write_text(json.dumps({"options": {k: str(v) for k, v in vars(o).items()}, "runs": rows}, indent=1) + "\n")
    print(f"expert-parallel training, {o.world_size} ranks, {o.batch_size}x{o.seq_len} tokens per step, "
          f"dim {o.dim}, {o.n_layers} layers, {o.n_experts} experts top-2")
    print(f"{'E x D':>7} {'backend':>8} {'step ms':>8} {'tokens/s/rank':>14} {'all-to-all':>11}")
    for r in rows:
        print(f"{r['ep']:>3} x {r['dp']:<1} {r['backend']:>8} {r['step_ms']:>8.1f} {r['tokens_per_s_per_rank']:>14.0f} "
              f"{100 * r['all_to_all_share']:>10.1f}%")
    print(f"wrote {o.out}")
