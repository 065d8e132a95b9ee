"""The Serve application raymoe's config names (`import_path: cluster.app:build_app`): the `Router`
ingress deployment, bound to the expert plane's deployments.

Serve calls `build_app(args)` with the config's flat `args` mapping, locally (`raymoe serve`) and on
KubeRay (the RayService's serveConfigV2) alike; the args are the fields of the settings dataclasses.
"""

import logging
import os
import threading

import torch
from ray import serve

from checkpoint.args import parse_dtype
from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from cluster.expert_plane import build_expert_plane, connect_experts
from router.config import EngineConfig, ExpertPlaneConfig, split_settings
from server.api import OpenAIServer, build_fastapi
from server.config import ServerConfig
from server.starting import StartingGate

log = logging.getLogger(__name__)


RAYMOE_LOGGERS = ("attention", "checkpoint", "experts", "router", "server", "cluster")


def log_to_replica_log() -> None:
    """raymoe's INFO lines into the replica's log (stderr, which Ray keeps per worker and forwards to the
    driver); Serve configures only its own "ray.serve" logger, so they would otherwise be dropped."""
    for name in RAYMOE_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


READY_KEY = "raymoe/router-ready/{app}/{replica}"  # in the GCS key-value store while a router replica serves


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1}, health_check_period_s=5)
@serve.ingress()
class Router:
    """The Serve ingress: one engine per replica; experts in-process or behind the expert plane.

    expert_plane: the expert plane's ingress (bound by `build_app`); None runs every expert in this replica.
    The constructor returns at once and the replica answers 503 with Retry-After until its engine is ready
    (see server.starting); `cluster.deploy.apply` waits for that.
    """

    def __init__(self, engine: EngineConfig, plane: ExpertPlaneConfig, server: ServerConfig, expert_plane=None):
        log_to_replica_log()
        self.expert_plane = expert_plane  # kept so the plane's ingress lives as long as this router
        self.server: OpenAIServer | None = None
        self.gate = StartingGate()
        ctx = serve.get_replica_context()
        self.ready_key = READY_KEY.format(app=ctx.app_name, replica=ctx.replica_id.unique_id).encode()
        threading.Thread(target=self._start, args=(engine, plane, server, ctx.app_name, expert_plane is not None),
                         name="raymoe-router-start", daemon=True).start()

    def _start(self, engine: EngineConfig, plane: ExpertPlaneConfig, server: ServerConfig, app_name: str,
               remote_experts: bool) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        try:
            if server.router_threads:  # else Ray's default: as many as the replica's CPUs
                torch.set_num_threads(server.router_threads)
            backend = None
            if remote_experts:
                backend = connect_experts(Checkpoint(resolve_model(engine.model)), parse_dtype(engine.dtype),
                                          app_name=app_name, call_timeout_s=plane.call_timeout_s)
            if server.api_key is None and os.environ.get("RAYMOE_API_KEY"):
                server = ServerConfig(**{**vars(server), "api_key": os.environ["RAYMOE_API_KEY"]})
            self.server = OpenAIServer(engine, server, backend)
            self.gate.app = build_fastapi(self.server)
            _internal_kv_put(self.ready_key, b"1", overwrite=True)
        except Exception as e:
            log.exception("the router could not start")
            self.gate.failed = f"{type(e).__name__}: {e}"

    def __serve_build_asgi_app__(self) -> StartingGate:
        return self.gate

    def check_health(self) -> None:
        if self.gate.failed:  # Serve replaces the replica and shows this in the deployment's status
            raise RuntimeError(f"the router could not start: {self.gate.failed}")
        if self.server is not None and not self.server.runner.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized

        if getattr(self, "ready_key", None) and _internal_kv_initialized():
            _internal_kv_del(self.ready_key)
        server = getattr(self, "server", None)  # absent when __init__ failed
        if server is not None:
            server.close()


def routers_ready(app: str) -> tuple[int, int]:
    """(ready, running) Router replicas of an application."""
    from ray.experimental.internal_kv import _internal_kv_exists
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"].get(app, {})
    replicas = details.get("deployments", {}).get("Router", {}).get("replicas", [])
    running = [r["replica_id"] for r in replicas if r["state"] == "RUNNING"]
    ready = sum(_internal_kv_exists(READY_KEY.format(app=app, replica=r).encode()) for r in running)
    return ready, len(running)


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
