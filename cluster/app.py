"""The Serve application raymoe's config names (`import_path: cluster.app:build_app`): the `Router`
ingress deployment, bound to the expert plane's deployments.

Serve calls `build_app(args)` with the config's flat `args` mapping, locally (`raymoe serve`) and on
KubeRay (the RayService's serveConfigV2) alike; the args are the fields of the settings dataclasses.
A configuration that cannot work fails there, at deploy time, with a ConfigError that Serve shows as the
application's status message (DEPLOY_FAILED): an unknown model, shards that do not cover the model, more GPUs
per replica than a node of the cluster has.
"""

import logging
import math
import os
import threading

import torch
from ray import serve

from checkpoint.args import parse_dtype
from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint, CheckpointError
from cluster.expert_plane import build_expert_plane, connect_experts, placement_plan
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


class ConfigError(ValueError):
    """A raymoe application's configuration that cannot be deployed; the message says what to change."""

    def __init__(self, what: str):
        super().__init__(f"raymoe: bad configuration: {what}")


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
                                          app_name=app_name, call_timeout_s=plane.call_timeout_s,
                                          locality_grouping=plane.locality_grouping)
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


def node_gpus() -> list[float]:
    """GPUs per node of the connected cluster: its live nodes, and the node groups its autoscaler may add
    where Ray publishes them (the GCS cluster config); empty when neither shows a GPU."""
    import ray

    if not ray.is_initialized():
        return []
    sizes = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an internal API: its absence only makes the check weaker
        config = None
    if config is not None:
        sizes += [float(g.resources.get("GPU", 0)) for g in config.node_group_configs]
    return [s for s in sizes if s > 0]


def check_config(engine: EngineConfig, plane: ExpertPlaneConfig) -> tuple[str, Checkpoint]:
    """The model's resolved path and checkpoint, once the configuration is known to be deployable here;
    else ConfigError, at deploy time, rather than replicas that fail or wait forever."""
    model = resolve_model(engine.model)
    try:
        ckpt = Checkpoint(model)
    except CheckpointError as e:
        raise ConfigError(f"model {engine.model!r}: {e} (a relative path is looked up in the working directory, "
                          f"then in the raymoe installation; in the image, /app/models)") from None
    if plane.expert_backend == "ray":
        try:
            placement_plan(plane, ckpt.args.n_layers, ckpt.args.n_experts)
        except ValueError as e:
            raise ConfigError(f"expert shards of {engine.model!r} ({ckpt.args.n_layers} layers x "
                              f"{ckpt.args.n_experts} experts): {e}") from None
        need = plane.num_gpus
        if need > 1 and need != math.floor(need):
            raise ConfigError(f"num_gpus={need} per expert replica: above 1 GPU Ray gives whole GPUs only")
        sizes = node_gpus()
        if need > 0 and sizes and max(sizes) < need:
            raise ConfigError(f"num_gpus={need} per expert replica, but no node of this cluster has more than "
                              f"{max(sizes):g} GPU(s) (nodes with GPUs: {sorted(sizes, reverse=True)}): no replica "
                              "could ever be placed; lower num_gpus or add a worker group with bigger GPU nodes")
        if need > 0 and not sizes:
            log.warning("num_gpus=%s per expert replica: no GPU node is up yet; replicas wait for the autoscaler",
                        need)
    return str(model), ckpt


def build_app(args: dict) -> serve.Application:
    try:
        engine, plane, server = settings_from_args(args)
    except ValueError as e:  # unknown arg names, out-of-range values
        raise ConfigError(str(e)) from None
    model, _ = check_config(engine, plane)
    engine = EngineConfig(**{**vars(engine), "model": model})
    expert_plane = None
    if plane.expert_backend == "ray":
        expert_plane = build_expert_plane(model, engine.dtype, plane,
                                          reserved_cpus=server.router_replicas * server.router_num_cpus)
    router = Router.options(num_replicas=server.router_replicas,
                            ray_actor_options={"num_cpus": server.router_num_cpus})
    return router.bind(engine, plane, server, expert_plane)
