"""The one way raymoe starts or joins Ray and Serve, and fits expert replicas to what the cluster has."""

import logging
import math
import os

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 200 << 20  # raymoe moves tensors over gRPC, never through the object store
MIN_CPU_SHARE = 0.05  # below this a CPU replica would time out its calls under any load


def start_or_join_ray(address: str | None = None, *, num_cpus: int | None = None, **init_options) -> bool:
    """Join `address`, else $RAY_ADDRESS, else the Ray this process already runs, else start a local one.

    Returns True when this call started Ray (the caller shuts it down). A local Ray gets this machine's
    CPUs unless num_cpus says otherwise; expert replicas are fitted to them (`fit_cpus`).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **init_options)
        return True
    ray.init(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, **init_options)
    return True


def start_serve(http_options: dict | None = None, proxy_location: str | None = None) -> bool:
    """Start Serve unless it runs; True if started here. Without http_options, no HTTP proxies
    (an expert plane takes no HTTP); a running Serve keeps the options it was started with."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is not None:
        return False
    if http_options is None:
        serve.start(proxy_location="Disabled")
    else:
        serve.start(http_options=http_options, proxy_location=proxy_location or "EveryNode")
    return True


def remove_apps(names: list[str], started_serve: bool, started_ray: bool) -> None:
    """Delete Serve apps and their directory entries, then Serve and Ray if we started them."""
    import ray
    from ray import serve

    from cluster.directory import DirectoryClient

    if not ray.is_initialized():
        return
    for name in names:
        serve.delete(name)
        DirectoryClient(name).remove_app()
    if started_serve:
        serve.shutdown()
    if started_ray:
        ray.shutdown()


def fit_cpus(replicas: int, reserved: float = 0.0) -> float:
    """CPUs per expert replica when the user gave none: 1, or the cluster's free CPUs (less `reserved`
    for what deploys beside them) shared out, so that every replica can be scheduled at once.

    Fails at once, saying what to pass, when the share would be too small to serve.
    """
    import ray

    free = ray.available_resources().get("CPU", 0.0) - reserved
    share = min(1.0, math.floor(100 * free / replicas) / 100) if replicas else 1.0
    if share < MIN_CPU_SHARE:
        raise ValueError(
            f"{replicas} expert replicas do not fit the {max(free, 0):.2f} free CPUs of this Ray cluster "
            f"({MIN_CPU_SHARE} CPU each at least): pass fewer --num-shards/--replicas-per-shard, an explicit "
            "--expert-num-cpus, GPUs (--num-gpus), or a bigger cluster (--address / --num-cpus)")
    if share < 1.0:
        log.info("%d expert replicas share %.2f free CPUs: %.2f CPU each (--expert-num-cpus to set it)",
                 replicas, free, share)
    return share
