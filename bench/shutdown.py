"""`raymoe bench shutdown`: `LLM(expert_backend="ray")` created, used and shut down many times in one process,
checking after each shutdown that nothing it started is left: threads, listening ports, gRPC channels and
connections to its replicas, child processes, Ray actors, Serve apps, directory entries, the LLM object itself.

Two settings: by default a Ray is started here first and every LLM joins it (as in a notebook or the tests,
where the plane is a Serve app the LLM deploys and deletes); `--own-ray` leaves Ray to each LLM, which then
starts Ray and Serve and stops both on shutdown (as a script run on a bare machine).
"""

import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from bench.leaks import Snapshot, connections_to, leaks, snapshot
from checkpoint.bundled import BUNDLED_MODEL


@dataclass
class ShutdownBenchOptions:
    """How many LLMs, of what size."""

    model: Path | None = field(default=None, metadata={"help": "checkpoint (default: the bundled one)"})
    cycles: int = field(default=20, metadata={"help": "LLMs created, used and shut down, one after another"})
    num_shards: int = field(default=2, metadata={"help": "expert shards of each LLM's plane"})
    expert_num_cpus: float = field(default=0.25, metadata={"help": "CPUs per expert replica"})
    max_tokens: int = field(default=4, metadata={"help": "tokens each LLM generates before its shutdown"})
    own_ray: bool = field(default=False, metadata={
        "help": "each LLM starts and stops Ray itself (default: one Ray started here, joined by every LLM)"})
    out: Path | None = field(default=None, metadata={"help": "results (JSON)"})


def one_cycle(model: Path, o: ShutdownBenchOptions, before: Snapshot) -> dict:
    """Create an LLM with Ray experts, generate, shut it down; what it left behind compared with `before`."""
    from cluster.directory import DIRECTORY_NAME, DirectoryClient
    from router import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model, expert_backend="ray", num_shards=o.num_shards, expert_num_cpus=o.expert_num_cpus)
    try:
        app = llm.experts.app_name
        addresses = {r.address for reps in llm.experts.backend.view.values() for r in reps}
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=o.max_tokens,
                                                          ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == o.max_tokens
    finally:
        llm.shutdown()
    seconds = time.perf_counter() - t
    ref = weakref.ref(llm)
    del llm
    after = snapshot()  # collects garbage first
    found = leaks(before, after, allowed_actors={DIRECTORY_NAME})
    if ref() is not None:
        found.append("the LLM is still referenced after shutdown")
    if conns := connections_to(addresses):
        found.append(f"connections to its replicas: {conns}")
    import ray

    if ray.is_initialized() and app in DirectoryClient().app_names():
        found.append(f"directory entries of {app}")
    return dict(seconds=seconds, leaks=found, threads=len(after.threads), channels=after.channels,
                fds=after.fds, rss_mb=after.rss / 2**20)


def check_cycles(model: Path, o: ShutdownBenchOptions, progress: bool = False) -> list[dict]:
    """o.cycles LLMs one after another, each checked against the process as it was before the first."""
    from tqdm import tqdm

    # The bar first: a tqdm starts tqdm's monitor thread, which must be in the picture taken before.
    bar = tqdm(total=o.cycles, desc="LLM create/shutdown") if progress else None
    before = snapshot()
    results = []
    for i in range(o.cycles):
        results.append({"cycle": i, **one_cycle(model, o, before)})
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return results


def report(results: list[dict], own_ray: bool) -> None:
    print(f"\n{'cycle':>5}{'seconds':>9}{'threads':>8}{'channels':>9}{'fds':>5}{'RSS MiB':>9}  leaks")
    for r in results:
        print(f"{r['cycle']:>5}{r['seconds']:>9.1f}{r['threads']:>8}{r['channels']:>9}{r['fds']:>5}"
              f"{r['rss_mb']:>9.1f}  {'; '.join(r['leaks']) or '-'}")
    leaky = sum(bool(r["leaks"]) for r in results)
    print(f"{len(results)} LLMs ({'each on its own Ray' if own_ray else 'joining one Ray'}): "
          f"{leaky} left something behind")


def run(o: ShutdownBenchOptions) -> None:
    import os

    import ray

    from cluster.ray_init import start_or_join_ray

    model = o.model or BUNDLED_MODEL
    os.environ.pop("RAY_ADDRESS", None)  # this process's own Ray, never a cluster the machine happens to run
    started = False if o.own_ray else start_or_join_ray(num_cpus=8, log_to_driver=False)
    try:
        results = check_cycles(model, o, progress=True)
    finally:
        if started:
            ray.shutdown()
    report(results, o.own_ray)
    if o.out:
        o.out.parent.mkdir(parents=True, exist_ok=True)
        o.out.write_text(json.dumps({"options": {k: str(v) for k, v in vars(o).items()}, "cycles": results},
                                    indent=1))
        print(f"results: {o.out}")
    if any(r["leaks"] for r in results):
        raise SystemExit(1)
