"""What the benchmarks share: the benchmark checkpoint and a timer."""

import time
from collections.abc import Callable
from pathlib import Path

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


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall-clock seconds of `repeats` calls (after one warm-up call)."""
    return best_of_pair(fn, lambda: None, repeats)[0]


def best_of_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest seconds of a and of b, their runs interleaved so that noise on a shared machine hits both."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(ta), min(tb)
