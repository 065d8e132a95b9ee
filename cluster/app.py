"""The Serve application builder that raymoe's config names (`import_path: cluster.app:build_app`).

Serve calls `build_app(args)` with the config's `args` mapping, locally (`raymoe serve`) and on
KubeRay (the RayService's serveConfigV2) alike.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ray import serve

from experts.checkpoint import DTYPES
from router.bundled import REPO
from router.server import Router

BACKENDS = ("ray", "local")


@dataclass
class AppArgs:
    model: str = "models/tiny-mixtral"  # relative paths are resolved against the installed repo
    dtype: str = "float32"
    expert_backend: str = "ray"  # ray: every expert shard its own Serve deployment; local: in the router
    served_model_name: str | None = None  # default: the model directory's name
    num_shards: int | None = None  # default: one shard per expert index (expert-parallel)
    replicas_per_shard: int = 1
    num_gpus: float = 0.0  # per expert replica
    expert_num_cpus: float | None = None  # per expert replica; default 1 (0.1 with GPUs)
    router_replicas: int = 1
    router_num_cpus: float = 1.0
    router_threads: int | None = None  # torch threads per router replica (default: its CPUs, as Ray sets)
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    stream_chunks_per_s: float = 200.0  # per router; under load a streamed chunk carries more tokens; 0: off
    api_key: str | None = None  # better given as RAYMOE_API_KEY in the replicas' environment

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.expert_backend not in BACKENDS:
            raise ValueError(f"expert_backend must be one of {BACKENDS}, got {self.expert_backend!r}")
        if self.router_replicas < 1 or self.replicas_per_shard < 1:
            raise ValueError("router_replicas and replicas_per_shard must be >= 1")

    @classmethod
    def from_dict(cls, args: dict) -> "AppArgs":
        unknown = sorted(set(args) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown raymoe app args {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**args)

    def model_path(self) -> Path:
        p = Path(self.model).expanduser()
        return p if p.is_absolute() else REPO / p


def build_app(args: dict) -> serve.Application:
    a = AppArgs.from_dict(args)
    model = str(a.model_path())
    experts = None
    if a.expert_backend == "ray":
        from cluster.experts_app import build_expert_plane

        experts = build_expert_plane(model, a.dtype, a.num_shards, a.replicas_per_shard, a.num_gpus,
                                     num_cpus=a.expert_num_cpus)
    engine = {k: v for k, v in asdict(a).items()
              if k in ("max_num_seqs", "max_model_len", "max_num_batched_tokens")}
    router = Router.options(num_replicas=a.router_replicas, ray_actor_options={"num_cpus": a.router_num_cpus})
    return router.bind(model, dtype=a.dtype, served_model_name=a.served_model_name, api_key=a.api_key,
                       experts=experts, engine=engine, torch_threads=a.router_threads,
                       stream_chunks_per_s=a.stream_chunks_per_s)
