"""`raymoe experiment hot-experts`: autoscaling policies compared on hot-expert workloads, in one run.

Every (workload, policy) pair runs on an expert plane reset to the same starting state and replica budget,
live on this Ray cluster (local, or `--address`), or with `--simulate` against a cost model of Mixtral-8x7B
on N GPUs running the same policy code. Output: `result.json`, PNGs and a table (see experiment/report.py).
"""

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoint.bundled import BUNDLED_MODEL
from experiment import report
from experiment.workloads import POLICIES, WORKLOADS, workload

log = logging.getLogger(__name__)

PACE_MS = (1.0, 8.0)  # per expert, per row: see HotExpertsOptions.paced_expert_ms
QUICK = {"workloads": ["zipf-1.2"], "duration_s": 8.0, "num_shards": 2, "budget": 4, "max_batch": 32,
         "replace_every_s": 3.0}


@dataclass
class HotExpertsOptions:
    """What to run."""

    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS), metadata={
        "help": f"workloads, of {', '.join(WORKLOADS)}"})
    policies: list[str] = field(default_factory=lambda: list(POLICIES), metadata={
        "help": f"policies compared, of {', '.join(POLICIES)}"})
    quick: bool = field(default=False, metadata={
        "help": "zipf-1.2 only, 2 shards and a budget of 4 replicas, 8 s per policy (under a minute and a half)"})
    simulate: bool = field(default=False, metadata={
        "help": "replay the workloads against a cost model of Mixtral-8x7B on --gpus GPUs (every number simulated)"})
    gpus: int = field(default=64, metadata={"help": "simulation: GPUs, one replica each (the replica budget)"})
    duration_s: float = field(default=60.0, metadata={"help": "seconds per (workload, policy) run"})
    rate: float | None = field(default=None, metadata={
        "help": "requests per second, Poisson (default, live: 70% of what the starting plane serves with full "
                "batches, closed loop, measured before the first synthetic and the first `real` run; for `real` "
                "prefills included)"})
    tokens_per_request: int = field(default=16, metadata={"help": "tokens generated per request"})
    num_shards: int | None = field(default=None, metadata={"help": "live: expert shards (default: one per expert)"})
    budget: int | None = field(default=None, metadata={
        "help": "live: replicas of all shards together, every policy (default: two per shard)"})
    max_batch: int = field(default=64, metadata={"help": "live: sequences decoded together"})
    kill_at: float | None = field(default=None, metadata={
        "help": "kill a replica of the hottest shard this many seconds into every run"})
    replace_every_s: float = field(default=5.0, metadata={"help": "raymoe+replace: seconds between rebalances"})
    expert_num_cpus: float = field(default=0.1, metadata={"help": "live: CPUs per expert replica"})
    paced_expert_ms: float = field(default=PACE_MS[0], metadata={
        "help": "live: every replica stands for a device of its own, whose run of expert math lasts at least this "
                "per expert it touches plus --paced-row-ms per (token, expert) row; the replicas of a machine share "
                "its cores, so without it more replicas of a shard add no compute (0 and 0: real time only)"})
    paced_row_ms: float = field(default=PACE_MS[1], metadata={
        "help": "live: the modelled time of one (token, expert) row on a replica (see --paced-expert-ms)"})
    address: str | None = field(default=None, metadata={
        "help": "live: the Ray cluster to run on (default: start a local one)"})
    out: Path | None = field(default=None, metadata={
        "help": "output folder (default: results/hot-experts/<timestamp>/)"})
    seed: int = field(default=0, metadata={"help": "seed of arrivals and expert choices"})


def resolve(o: HotExpertsOptions) -> HotExpertsOptions:
    """Apply --quick and fill the defaults that depend on others."""
    if o.quick:
        o = HotExpertsOptions(**{**asdict(o), **QUICK})
    for w in o.workloads:
        workload(w, o.duration_s)  # an unknown name fails before anything starts
    unknown = sorted(set(o.policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    if o.out is None:
        o.out = Path("results/hot-experts") / time.strftime("%Y%m%d-%H%M%S")
    return o


def real_routing_shares(model: Path) -> np.ndarray:
    """(L, E) share of routing slots per (layer, expert) when the model reads its held-out text."""
    from bench.routing import RecordingExperts
    from router.llm import LLM
    from training.evaluate import held_out_texts

    llm = LLM(model, expert_backend="local")
    recorder = RecordingExperts(llm.engine.experts, llm.args.n_layers)
    llm.engine.experts = recorder
    for text in list(held_out_texts().values())[:2]:
        llm.logprobs([llm.encode(text)[0][:1024]])
    ids, _ = recorder.take()  # (L, T, k)
    counts = np.stack([np.bincount(ids[l].flatten().numpy(), minlength=llm.args.n_experts)
                       for l in range(llm.args.n_layers)])
    return counts / counts.sum(1, keepdims=True)


def held_out_prompts(model: Path, n: int = 64, length: int = 32) -> list[list[int]]:
    from router.tokenizer import Tokenizer
    from training.evaluate import held_out_texts

    tok = Tokenizer.maybe(model)
    ids = [i for text in held_out_texts().values() for i in tok.encode(text)]
    return [ids[k * length : (k + 1) * length] for k in range(min(n, len(ids) // length))]


def run(o: HotExpertsOptions) -> dict:
    o = resolve(o)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
    result = {"simulated": o.simulate, "config": config, "workloads": {}}
    # Policies that share a plane run back to back (see experiment.live.group).
    runs = [(w, p) for p in sorted(o.policies, key=lambda p: p.startswith("raymoe")) for w in o.workloads]
    bar = tqdm(runs, desc="hot-experts", unit="run")
    if o.simulate:
        from experiment.simulate import SimCluster, default_rate, simulate

        cluster = SimCluster(gpus=o.gpus)
        rate = o.rate or default_rate(cluster, o.tokens_per_request)
        real = real_routing_shares(BUNDLED_MODEL) if "real" in o.workloads else None  # (4, 8): simulate maps layers
        config.update(rate=rate, cluster=asdict(cluster))
        for w, p in bar:
            bar.set_postfix_str(f"{w} / {p}")
            result["workloads"].setdefault(w, {})[p] = simulate(
                workload(w, o.duration_s), p, cluster, duration_s=o.duration_s, base_rate=rate,
                tokens_per_request=o.tokens_per_request, kill_at_s=o.kill_at, seed=o.seed, real_shares=real,
                replace_every_s=o.replace_every_s)
    else:
        result["workloads"] = run_live(o, runs, bar, config)
    files = report.write(result, o.out)
    print(report.table(result))
    print("wrote " + ", ".join(str(f) for f in files))
    return result


def run_live(o: HotExpertsOptions, runs: list[tuple[str, str]], bar, config: dict) -> dict:
    from checkpoint.reader import Checkpoint
    from cluster.deploy import free_port
    from cluster.ray_init import start_or_join_ray, start_serve
    from experiment.live import LiveRun, deploy_planes, group, remove, run_policy

    a = Checkpoint(BUNDLED_MODEL).args
    shards = o.num_shards or a.n_experts
    budget = o.budget or 2 * shards
    if budget < shards:
        raise ValueError(f"a budget of {budget} replicas cannot give each of {shards} shards one")
    r = LiveRun(model=str(BUNDLED_MODEL), num_shards=shards, budget=budget, duration_s=o.duration_s, rate=o.rate,
                tokens_per_request=o.tokens_per_request, max_batch=o.max_batch, expert_num_cpus=o.expert_num_cpus,
                replace_every_s=o.replace_every_s, kill_at_s=o.kill_at, seed=o.seed,
                paced_ms=(o.paced_expert_ms, o.paced_row_ms))
    if any(w == "real" for w, _ in runs):
        r.prompts = held_out_prompts(BUNDLED_MODEL)
    config.update(num_shards=shards, budget=budget)
    started_ray = start_or_join_ray(o.address, num_cpus=max(16, 2 * budget), log_to_driver=False)
    started_serve = start_serve({"host": "127.0.0.1", "port": free_port()})
    out: dict = {}
    planes: dict[str, str] = {}
    try:
        planes = deploy_planes(o.policies, r)
        for w, p in bar:
            bar.set_postfix_str(f"{w} / {p}")
            out.setdefault(w, {})[p] = run_policy(workload(w, o.duration_s), p, r, planes[group(p)])
    finally:
        for name in planes.values():
            remove(name)
        from cluster.ray_init import remove_apps

        remove_apps([], started_serve, started_ray)
    config["rate"] = r.rates
    return out


