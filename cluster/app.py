"""The Serve application raymoe's config names (`import_path: cluster.app:build_app`): the `Router`
ingress deployment, bound to the expert plane's deployments.

Serve calls `build_app(args)` with the config's flat `args` mapping, locally (`raymoe serve`) and on
KubeRay (the RayService's serveConfigV2) alike; the args are the fields of the settings dataclasses.
"""

import os

import torch
from fastapi import FastAPI
from ray import serve

from checkpoint.args import parse_dtype
from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from cluster.expert_plane import build_expert_plane, connect_experts
from router.config import EngineConfig, ExpertPlaneConfig, split_settings
from server.api import OpenAIServer, build_fastapi
from server.config import ServerConfig


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1}, health_check_period_s=5)
@serve.ingress()
class Router:
    """The Serve ingress: one engine per replica; experts in-process or behind the expert plane.

    expert_plane: the expert plane's ingress (bound by `build_app`); None runs every expert in this replica.
    """

    def __init__(self, engine: EngineConfig, plane: ExpertPlaneConfig, server: ServerConfig, expert_plane=None):
        if server.router_threads:  # else Ray's default: as many as the replica's CPUs
            torch.set_num_threads(server.router_threads)
        backend = None
        if expert_plane is not None:
            backend = connect_experts(Checkpoint(resolve_model(engine.model)), parse_dtype(engine.dtype),
                                      app_name=serve.get_replica_context().app_name,
                                      call_timeout_s=plane.call_timeout_s)
        self.expert_plane = expert_plane  # kept so the plane's ingress lives as long as this router
        if server.api_key is None and os.environ.get("RAYMOE_API_KEY"):
            server = ServerConfig(**{**vars(server), "api_key": os.environ["RAYMOE_API_KEY"]})
        self.server = OpenAIServer(engine, server, backend)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self.server)

    def check_health(self) -> None:
        if not self.server.runner.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        server = getattr(self, "server", None)  # absent when __init__ failed
        if server is not None:
            server.close()


def settings_from_args(args: dict) -> tuple[EngineConfig, ExpertPlaneConfig, ServerConfig]:
    """The application's flat args as the three settings dataclasses (unknown names: ValueError)."""
    try:
        engine, plane, server = split_settings(args, EngineConfig, ExpertPlaneConfig, ServerConfig)
    except TypeError as e:
        raise ValueError(f"raymoe app args: {e}") from None
    return EngineConfig(**engine), ExpertPlaneConfig(**plane), ServerConfig(**server)


def build_app(args: dict) -> serve.Application:
    engine, plane, server = settings_from_args(args)
    model = str(resolve_model(engine.model))
    engine = EngineConfig(**{**vars(engine), "model": model})
    expert_plane = None
    if plane.expert_backend == "ray":
        expert_plane = build_expert_plane(model, engine.dtype, plane,
                                          reserved_cpus=server.router_replicas * server.router_num_cpus)
    router = Router.options(num_replicas=server.router_replicas,
                            ray_actor_options={"num_cpus": server.router_num_cpus})
    return router.bind(engine, plane, server, expert_plane)
