"""Bring up Ray (local, or join RAY_ADDRESS), deploy the expert plane on Serve, tear down what we started."""

import logging
import os
import uuid

import torch

from cluster.directory import DirectoryClient
from cluster.experts_app import build_expert_plane, connect_experts
from experts.checkpoint import Checkpoint
from experts.wire import WIRE_NAMES
from router.dispatch import ExpertBackend

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Join RAY_ADDRESS or an initialised Ray, else start a local one; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
    return True


def ensure_serve() -> bool:
    """Start Serve, without HTTP proxies (experts take no HTTP), unless it runs; True if started here."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is not None:
        return False
    serve.start(proxy_location="Disabled")
    return True


def remove_apps(names: list[str], started_serve: bool, started_ray: bool) -> None:
    """Delete Serve apps and their directory entries, then Serve and Ray if we started them."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    for name in names:
        serve.delete(name)
        DirectoryClient(name).remove_app()
    if started_serve:
        serve.shutdown()
    if started_ray:
        ray.shutdown()


class RayExperts(ExpertBackend):
    """The gRPC backend to an expert plane this process deployed; close() removes the plane again."""

    def __init__(self, backend: ExpertBackend, app_name: str, started_serve: bool, started_ray: bool):
        self.backend, self.app_name = backend, app_name
        self.started_serve, self.started_ray = started_serve, started_ray

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        return self.backend.forward(layer, x, expert_ids, weights)

    def close(self) -> None:
        self.backend.close()
        remove_apps([self.app_name], self.started_serve, self.started_ray)


def ray_expert_backend(ckpt: Checkpoint, dtype: torch.dtype, *, num_shards: int | None = None,
                       replicas_per_shard: int = 1, num_gpus: float = 0.0, num_cpus: float | None = None,
                       app_name: str | None = None, ray_num_cpus: int | None = None, **plane_options
                       ) -> ExpertBackend:
    """Deploy the checkpoint's experts as a Serve application and return the gRPC backend to it.

    This is `LLM(..., expert_backend="ray", ...)`: its options are the LLM's extra keyword arguments
    (num_shards, replicas_per_shard, num_gpus, num_cpus per replica, app_name, plan, max_message_bytes).
    """
    from ray import serve

    app = build_expert_plane(str(ckpt.path), WIRE_NAMES[dtype], num_shards, replicas_per_shard, num_gpus,
                             num_cpus=num_cpus, **plane_options)
    started_ray = ensure_ray(ray_num_cpus)
    started_serve = False
    name = app_name or f"raymoe-experts-{uuid.uuid4().hex[:8]}"
    try:
        started_serve = ensure_serve()
        serve.run(app, name=name, route_prefix=None)
        log.info("expert plane %r is up", name)
        return RayExperts(connect_experts(ckpt, dtype, name), name, started_serve, started_ray)
    except BaseException:
        remove_apps([name], started_serve, started_ray)
        raise
