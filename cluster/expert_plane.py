"""The expert plane as one Serve application; how a router (driver or Serve replica) connects to it; and
the "ray" expert backend that `LLM(..., expert_backend="ray")` gets through the entry point."""

import json
import logging
import os
import uuid
import zlib

import numpy as np
import torch
from ray import serve

from checkpoint.args import parse_dtype
from checkpoint.reader import Checkpoint
from cluster.directory import DirectoryClient
from cluster.placement import PlacementPlan
from cluster.plane_ingress import ExpertPlane
from cluster.plane_token import TOKEN_ENV, app_token, env_token, new_token
from cluster.ray_init import fit_cpus, remove_apps, start_or_join_ray, start_serve
from experts.pace import Pace
from experts.replica import MAX_CONCURRENT_RPCS, ExpertShard
from experts.security import ClientTLS, ReplicaSecurity
from experts.wire import WIRE_NAMES
from router.config import ExpertPlaneConfig
from router.dispatch import ExpertBackend
from router.grpc_dispatch import GrpcExperts

log = logging.getLogger(__name__)


def placement_plan(plane: ExpertPlaneConfig, n_layers: int, n_experts: int) -> PlacementPlan:
    if plane.placement is not None:
        plan = PlacementPlan.from_sets(plane.placement, plane.replicas_per_shard)
    else:
        plan = PlacementPlan.expert_parallel(n_layers, n_experts, plane.num_shards, plane.replicas_per_shard)
    return plan.validate(n_layers, n_experts)


AUTOSCALING_POLICY = "cluster.autoscaling:ExpertPlanePolicy"
METRICS_INTERVAL_S, LOOK_BACK_S = 0.5, 2.0  # replicas push load twice a second; policies see 2 s means


def shard_options(plane: ExpertPlaneConfig, replicas: int) -> dict:
    """A shard deployment's replica options: a fixed count, or Serve autoscaling between the plane's bounds
    (decided by the application's AUTOSCALING_POLICY on the load the replicas report)."""
    if not plane.autoscaling:
        return {"num_replicas": replicas}
    return {"autoscaling_config": {
        "min_replicas": replicas, "initial_replicas": replicas, "max_replicas": plane.max_replicas_per_shard,
        "upscale_delay_s": plane.upscale_delay_s, "downscale_delay_s": plane.downscale_delay_s,
        "metrics_interval_s": METRICS_INTERVAL_S, "look_back_period_s": LOOK_BACK_S}}


def autoscaling_policy(plane: ExpertPlaneConfig) -> dict | None:
    """The application-level policy of a plane that autoscales: one decision over all shards, so that the
    replica budget goes to the hottest."""
    if not plane.autoscaling:
        return None
    return {"policy_function": AUTOSCALING_POLICY,
            "policy_kwargs": {"target_busy": plane.target_busy, "max_total_replicas": plane.max_total_replicas}}


def replica_security(plane: ExpertPlaneConfig, token: str) -> ReplicaSecurity:
    client = None
    if plane.data_plane_tls_cert:
        client = ClientTLS(plane.data_plane_tls_ca, plane.data_plane_tls_server_name)
    return ReplicaSecurity(token, plane.data_plane_tls_cert, plane.data_plane_tls_key, client)


def build_expert_plane(model: str, dtype: str, plane: ExpertPlaneConfig, reserved_cpus: float = 0.0,
                       token: str | None = None) -> serve.Application:
    """ExpertPlane bound to one ExpertShard-<i> deployment per shard of the plan.

    Replicas get plane.num_gpus GPUs and plane.expert_num_cpus CPUs each; without a CPU count, 0.1 with
    GPUs, else 1 fitted to the cluster's free CPUs less `reserved_cpus` (what deploys beside them).
    token: the data-plane token the replicas require (default: the app's, from the environment it is built
    in); bound into the deployments' args, so that every replica Serve starts or restarts has the same one.
    """
    parse_dtype(dtype)
    security = replica_security(plane, token or env_token())
    a = Checkpoint(model).args
    plan = placement_plan(plane, a.n_layers, a.n_experts)
    num_cpus = plane.expert_num_cpus
    if num_cpus is None:
        most = plane.max_total_replicas or sum(plane.max_replicas_per_shard or s.replicas for s in plan.shards)
        num_cpus = 0.1 if plane.num_gpus else fit_cpus(most, reserved_cpus)
    actor_options = {"num_cpus": num_cpus}
    if plane.num_gpus:
        actor_options["num_gpus"] = plane.num_gpus
    registry = DirectoryClient()
    pace = Pace((plane.paced_expert_ms or 0.0) / 1e3, (plane.paced_row_ms or 0.0) / 1e3)
    sets = [[list(p) for p in shard.pairs] for shard in plan.shards]
    plan_id = f"{zlib.crc32(json.dumps(sets).encode()):08x}"  # a rebalanced placement applies to this plan only
    shards = [
        ExpertShard.options(name=f"ExpertShard-{i}", ray_actor_options=actor_options,
                            **shard_options(plane, shard.replicas))
        .bind(str(model), dtype, i, pairs, len(plan.shards), registry, plane.max_message_bytes, plan_id, security,
              plane.max_concurrent_rpcs or MAX_CONCURRENT_RPCS, pace)
        for i, (shard, pairs) in enumerate(zip(plan.shards, sets, strict=True))
    ]
    return ExpertPlane.bind(plane.rebalance_interval_s, plane.redundant_experts, plane.min_copies, plane.standby,
                            *shards)


def build_expert_plane_app(args: dict) -> serve.Application:
    """The expert plane alone, from a raymoe app's args (`import_path: cluster.expert_plane:build_expert_plane_app`):
    for routers outside Serve, such as the hot-experts experiment's driver or `LLM` processes joining a cluster."""
    from checkpoint.bundled import resolve_model
    from cluster.app import settings_from_args

    engine, plane, _ = settings_from_args(args)
    return build_expert_plane(str(resolve_model(engine.model)), engine.dtype, plane)


def current_app_name() -> str | None:
    """The Serve application of the calling replica, or None outside Serve."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # RayServeException outside a replica
        return None


def connect_experts(ckpt: Checkpoint, dtype: torch.dtype, app_name: str | None = None, *,
                    timeout_s: float = 300.0, call_timeout_s: float = ExpertPlaneConfig.call_timeout_s,
                    token: str | None = None, locality_grouping: bool = ExpertPlaneConfig.locality_grouping
                    ) -> ExpertBackend:
    """The gRPC backend to the expert plane `app_name`, once every shard has a live replica.

    app_name defaults to the caller's own Serve application, else to the only plane in the cluster; token
    to the app's (cluster.plane_token.app_token). TLS is as the replicas registered it. locality_grouping:
    ExpertPlaneConfig's.
    """
    directory = DirectoryClient()
    if app_name is None:
        app_name = current_app_name()
    if app_name is None:
        names = directory.app_names()
        if len(names) != 1:
            raise ValueError(f"pass app_name: the cluster runs expert planes {names}")
        app_name = names[0]
    directory.app = app_name
    entries = directory.wait_for_shards(timeout_s)
    want = WIRE_NAMES[dtype]
    bad = {e["dtype"] for e in entries} - {want}
    if bad:
        raise ValueError(f"expert plane {app_name!r} serves {sorted(bad)} experts, this router runs {want}")
    a = ckpt.args
    return GrpcExperts(directory, a.n_layers, a.n_experts, timeout_s=call_timeout_s,
                       token=token or app_token(app_name), group_by_expert=locality_grouping)


class RayExperts(ExpertBackend):
    """The gRPC backend to an expert plane this process deployed; close() removes the plane again."""

    def __init__(self, backend: GrpcExperts, app_name: str, started_serve: bool, started_ray: bool):
        self.backend, self.app_name = backend, app_name
        self.started_serve, self.started_ray = started_serve, started_ray

    overlaps_calls = True

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                keys: np.ndarray | None = None) -> torch.Tensor:
        return self.backend.forward(layer, x, expert_ids, weights, keys)

    def forward_async(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                      keys: np.ndarray | None = None):
        return self.backend.forward_async(layer, x, expert_ids, weights, keys)

    def note_waiting(self, n: int) -> None:
        self.backend.note_waiting(n)

    def close(self) -> None:
        self.backend.close()
        remove_apps([self.app_name], self.started_serve, self.started_ray)


def ray_expert_backend(plane: ExpertPlaneConfig, ckpt: Checkpoint, dtype: torch.dtype) -> ExpertBackend:
    """`LLM(..., expert_backend="ray")`: start or join Ray, deploy the experts as a Serve application of
    their own, and return the gRPC backend to it. Its data-plane token is $RAYMOE_DATA_PLANE_TOKEN, else a
    new one that only this process and the plane's replicas know."""
    placement_plan(plane, ckpt.args.n_layers, ckpt.args.n_experts)  # a bad plan fails before Ray starts
    started_ray = start_or_join_ray()
    started_serve = False
    name = f"raymoe-experts-{uuid.uuid4().hex[:8]}"
    try:
        token = os.environ.get(TOKEN_ENV) or new_token()
        app = build_expert_plane(str(ckpt.path), WIRE_NAMES[dtype], plane, token=token)
        started_serve = start_serve()
        serve.run(app, name=name, route_prefix=None)
        log.info("expert plane %r is up", name)
        backend = connect_experts(ckpt, dtype, name, call_timeout_s=plane.call_timeout_s, token=token,
                                  locality_grouping=plane.locality_grouping)
        return RayExperts(backend, name, started_serve, started_ray)
    except BaseException:
        remove_apps([name], started_serve, started_ray)
        raise
