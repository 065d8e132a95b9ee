"""The expert plane as one Serve application, and how a router (driver or Serve replica) connects to it."""

import torch
from ray import serve

from cluster.directory import DirectoryClient
from cluster.placement import PlacementPlan
from experts.checkpoint import DTYPES, Checkpoint
from experts.replica import DEFAULT_MAX_MESSAGE_BYTES, ExpertShard
from experts.wire import WIRE_NAMES
from router.dispatch import ExpertBackend
from router.grpc_dispatch import GrpcExperts


@serve.deployment(name="ExpertPlane", ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=2)
class ExpertPlane:
    """Ingress of the expert plane: binds every ExpertShard deployment so that one app deploys them all.

    Routers do not call through it (they speak gRPC to the replicas); it answers what the plan is.
    """

    def __init__(self, plan: list[dict], *shards):
        self.plan = plan
        self.shards = shards  # DeploymentHandles, kept so the shards belong to this application

    def get_plan(self) -> list[dict]:
        return self.plan


def build_expert_plane(model: str, dtype: str = "float32", num_shards: int | None = None,
                       replicas_per_shard: int = 1, num_gpus: float = 0.0, *, num_cpus: float | None = None,
                       plan: PlacementPlan | None = None,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> serve.Application:
    """ExpertPlane bound to one ExpertShard-<i> deployment per shard of `plan` (default: expert-parallel).

    num_gpus goes to each replica's ray_actor_options; num_cpus defaults to 1 (0.1 with GPUs).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if num_gpus < 0 or (num_cpus is not None and num_cpus < 0):
        raise ValueError(f"num_gpus and num_cpus must be >= 0, got {num_gpus} and {num_cpus}")
    a = Checkpoint(model).args
    if plan is None:
        plan = PlacementPlan.expert_parallel(a.n_layers, a.n_experts, num_shards, replicas_per_shard)
    plan.validate(a.n_layers, a.n_experts)
    actor_options = {"num_cpus": num_cpus if num_cpus is not None else (0.1 if num_gpus else 1.0)}
    if num_gpus:
        actor_options["num_gpus"] = num_gpus
    registry = DirectoryClient()
    shards = [
        ExpertShard.options(name=f"ExpertShard-{i}", num_replicas=shard.replicas,
                            ray_actor_options=actor_options)
        .bind(str(model), dtype, i, [list(p) for p in shard.pairs], len(plan.shards), registry,
              max_message_bytes)
        for i, shard in enumerate(plan.shards)
    ]
    summary = [{"shard": i, "replicas": s.replicas, "pairs": [list(p) for p in s.pairs]}
               for i, s in enumerate(plan.shards)]
    return ExpertPlane.bind(summary, *shards)


def current_app_name() -> str | None:
    """The Serve application of the calling replica, or None outside Serve."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # RayServeException outside a replica
        return None


def connect_experts(ckpt: Checkpoint, dtype: torch.dtype, app_name: str | None = None, *,
                    timeout_s: float = 300.0, call_timeout_s: float = 10.0) -> ExpertBackend:
    """The gRPC backend to the expert plane `app_name`, once every shard has a live replica.

    app_name defaults to the caller's own Serve application, else to the only plane in the cluster.
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
    return GrpcExperts(directory, a.n_layers, a.n_experts, timeout_s=call_timeout_s)
