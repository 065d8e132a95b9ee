"""The engine benchmark's roof: bytes a decode step must read and FLOPs it must do, on the bench config."""

import pytest
from transformers import MixtralConfig

from bench.engine import flops_per_token, roof_tokens_per_s, weight_bytes_per_step
from bench.harness import BENCH_CONFIG


def test_a_step_reads_the_dense_weights_and_the_experts_its_tokens_touch():
    cfg = MixtralConfig(**BENCH_CONFIG)
    d, E, I, L = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.num_hidden_layers
    expert = 4 * 3 * d * I
    one, many = weight_bytes_per_step(cfg, 1), weight_bytes_per_step(cfg, 10_000)
    assert many - one == L * (E - 2) * expert  # batch 1 touches its 2 experts a layer, a big batch all E
    assert one > L * 2 * expert + 4 * d * cfg.vocab_size  # plus attention, gate and LM head
    assert weight_bytes_per_step(cfg, 1) < weight_bytes_per_step(cfg, 8) < weight_bytes_per_step(cfg, 32)


def test_the_roof_is_the_slower_of_reading_and_multiplying():
    cfg = MixtralConfig(**BENCH_CONFIG)
    rate, bound = roof_tokens_per_s(cfg, 32, 10.6e9, 130e9)
    assert bound == "memory" and rate == pytest.approx(32 * 10.6e9 / weight_bytes_per_step(cfg, 32))
    rate, bound = roof_tokens_per_s(cfg, 32, 10.6e9, 1e9)  # a machine that barely multiplies
    assert bound == "compute" and rate == pytest.approx(1e9 / flops_per_token(cfg))


def test_list_flags_take_several_values_or_none():
    """`--long-tokens` with no value skips the long runs, as its help says (argparse refused it with nargs '+')."""
    from cli.main import build_parser

    args = build_parser().parse_args(["bench", "engine", "--long-tokens", "--batch-sizes", "1", "8"])
    assert args.long_tokens == [] and args.batch_sizes == [1, 8]


def test_cores_busy_counts_the_core_a_busy_loop_takes():
    import os
    import time

    from bench.harness import cores_busy

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    # Whatever else runs beside it (so no "sleeping < spinning" machine-wide): at least this process's core, at most
    # them all; this process's own share is its core while it spins, none while it sleeps.
    machine, mine = cores_busy(lambda: spin(0.5))
    assert 0.7 <= machine <= os.cpu_count() + 0.1 and 0.7 <= mine <= 1.05
    machine, mine = cores_busy(lambda: time.sleep(0.5))
    assert 0.0 <= machine <= os.cpu_count() + 0.1 and mine < 0.1


def test_the_expert_kernel_rate_is_measured_on_the_configs_shapes():
    from bench.engine import expert_matmul_bandwidth

    cfg = MixtralConfig(**{**BENCH_CONFIG, "hidden_size": 64, "intermediate_size": 128})
    rate = expert_matmul_bandwidth(cfg, rows=2, n_experts=4, repeats=1)
    assert 1e6 < rate < 1e13  # bytes/s of 4 experts' 3 * 64 * 128 float32 weights: some, and finite
