import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole test session: fractional-CPU actors, a capped object store."""
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_RECORD_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    ray.init(num_cpus=8, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             configure_logging=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
