"""What every benchmark shares: the benchmark checkpoint, interleaved best-of timing, one percentile."""

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# The model-core benchmark shape: small enough for 2 CPU cores, Mixtral's structure otherwise.
BENCH_CONFIG = dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=128, max_position_embeddings=4096, initializer_range=0.02,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def bench_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the seeded random benchmark checkpoint (HF layout) to `path` unless it is there."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        MixtralForCausalLM(MixtralConfig(**BENCH_CONFIG)).save_pretrained(path)
    return path


def two_distinct(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) distinct experts per token: the first drawn by popularity p (E,), the second among the rest, as a
    top-2 gate picks them."""
    first = rng.choice(len(p), size=n, p=p)
    q = np.tile(p, (n, 1))
    q[np.arange(n), first] = 0
    q /= q.sum(1, keepdims=True)
    second = (q.cumsum(1) > rng.random((n, 1))).argmax(1)
    return np.stack([first, second], 1)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, numpy's default; NaN for no samples."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def best_of_each(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each function after one warm-up call each, their runs interleaved so that
    noise on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def best_of_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    best = best_of_each({"a": a, "b": b}, repeats)
    return best["a"], best["b"]


def best_of(fn: Callable[[], object], repeats: int) -> float:
    return best_of_each({"fn": fn}, repeats)["fn"]


def with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run with n torch threads (a router whose experts run elsewhere needs fewer)."""
    def run() -> object:
        torch.set_num_threads(n)
        return fn()
    return run


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def cores_busy(fn: Callable[[], object]) -> tuple[float, float]:
    """(machine, this process): how many cores were busy, on average, while fn ran; machine-wide every process
    counts (the replicas beside this one too), NaN where /proc/stat is missing. Where the first nears
    os.cpu_count(), nothing is left for overlapping work to use; where neither does, the work waits on a chain
    of processes (this one's share is the router's)."""
    before, own, wall = _cpu_jiffies(), time.process_time(), time.perf_counter()
    fn()
    after, own, wall = _cpu_jiffies(), time.process_time() - own, time.perf_counter() - wall
    mine = own / wall if wall > 0 else float("nan")
    if before is None or after is None or after[1] == before[1]:
        return float("nan"), mine
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1), mine
