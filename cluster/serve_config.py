"""The Ray Serve config that `raymoe serve` deploys, `raymoe config` prints and KubeRay's RayService embeds."""

from dataclasses import fields
from pathlib import Path

import yaml

from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from cluster.expert_plane import autoscaling_policy, placement_plan, shard_options
from router.config import EngineConfig, ExpertPlaneConfig
from server.config import ServerConfig

APP_NAME = "raymoe"
IMPORT_PATH = "cluster.app:build_app"
HEADER = "# Ray Serve config for raymoe, written by `raymoe config`; `raymoe serve` deploys the same.\n"


def app_args(engine: EngineConfig, plane: ExpertPlaneConfig, server: ServerConfig) -> dict:
    """The builder's flat args: every setting that is set, less the HTTP options and the API key (a secret
    never goes into a config file)."""
    out = {}
    for config in (engine, plane, server):
        for f in fields(config):
            v = getattr(config, f.name)
            if v is not None and not f.metadata.get("http") and f.name != "api_key":
                out[f.name] = v
    if out["model"] != EngineConfig.model:
        # The default stays relative (portable into a container); a path the user gives is theirs, from here.
        out["model"] = str(Path(out["model"]).expanduser().resolve())
    return out


def serve_config(engine: EngineConfig, plane: ExpertPlaneConfig, server: ServerConfig) -> dict:
    """A Serve config (the schema of `serve deploy` and of RayService's serveConfigV2), validated.

    Each expert shard's replica count (or autoscaling bounds) is a deployment option, not an app arg:
    editing one shard's `num_replicas` and applying the config again is a lightweight update of that
    deployment alone, while a change to `args` rebuilds the whole application (Router included).
    """
    from ray.serve.schema import ServeDeploySchema

    app = {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": app_args(engine, plane, server)}
    if plane.expert_backend == "ray":
        a = Checkpoint(resolve_model(engine.model)).args
        plan = placement_plan(plane, a.n_layers, a.n_experts)
        policy = autoscaling_policy(plane)
        if policy:
            app["autoscaling_policy"] = policy
        app["deployments"] = [{"name": f"ExpertShard-{i}", **shard_options(plane, s.replicas)}
                              for i, s in enumerate(plan.shards)]
    cfg = {
        "proxy_location": "EveryNode",
        "http_options": {"host": server.host, "port": server.port},
        "applications": [app],
    }
    ServeDeploySchema.model_validate(cfg)
    return cfg


def to_yaml(cfg: dict) -> str:
    return HEADER + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
