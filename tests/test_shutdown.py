"""`LLM(expert_backend="ray")` created and shut down repeatedly in one process leaves nothing behind.

On the test session's Ray (already running, with Serve), so each LLM joins it: its plane is a Serve app it
deploys and deletes, and it must neither stop the session's Ray nor leave threads, listening ports, gRPC
channels or connections, actors (beyond the cluster's shared replica directory), Serve apps or directory
entries. CYCLES fit twenty seconds on two cores; `raymoe bench shutdown` runs 20 (and `--own-ray`, where
each LLM starts and stops Ray itself).
"""

import pytest
from hf_reference import build_checkpoint

from bench.shutdown import ShutdownBenchOptions, check_cycles

CYCLES = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("shutdown-model")
    build_checkpoint(path)
    return path


def test_llm_create_shutdown_leaves_nothing(ray_session, tiny):
    from ray.serve.context import _get_global_client

    from cluster.ray_init import start_or_join_ray

    o = ShutdownBenchOptions(cycles=CYCLES, num_shards=2, expert_num_cpus=0.25, max_tokens=3)
    results = check_cycles(tiny, o)
    assert [r["leaks"] for r in results] == [[]] * CYCLES
    # The LLMs joined the session's Ray and Serve, and left both running.
    assert ray_session.is_initialized() and not start_or_join_ray()
    assert _get_global_client(raise_if_no_controller_running=False) is not None
