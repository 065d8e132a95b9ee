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
    from ray import serve

    from cluster.deploy import free_port
    from cluster.ray_init import start_or_join_ray, start_serve

    os.environ.pop("RAY_ADDRESS", None)  # the tests' own Ray, never a cluster the machine happens to run
    start_or_join_ray(num_cpus=8, configure_logging=False, log_to_driver=False,
                      _system_config={"metrics_report_interval_ms": 1000})  # metrics tests need not wait 10 s
    # Serve starts here, with its HTTP proxy on a free port, so whichever test deploys first cannot
    # start it without one (Serve's options are fixed for its life); get the port from cluster.deploy.http_port().
    start_serve({"host": "127.0.0.1", "port": free_port()})
    # The driver knows the data-plane token, as an operator would; set only now, so that Ray's worker processes
    # do not inherit it: the apps' replicas must get it the way they do on a cluster (runtime_env or args).
    os.environ.setdefault("RAYMOE_DATA_PLANE_TOKEN", "test-data-plane-token")
    yield ray
    serve.shutdown()
    ray.shutdown()
