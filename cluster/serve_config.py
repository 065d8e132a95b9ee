"""`raymoe config`: the Ray Serve config YAML that `raymoe serve` deploys and KubeRay's RayService embeds."""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from cluster.app import BACKENDS, AppArgs
from experts.checkpoint import DTYPES

APP_NAME = "raymoe"
IMPORT_PATH = "cluster.app:build_app"
HEADER = "# Ray Serve config for raymoe, written by `raymoe config`; `raymoe serve` deploys the same.\n"


def add_app_arguments(p: argparse.ArgumentParser) -> None:
    """The options `raymoe config` and `raymoe serve` share."""
    d = AppArgs()
    p.add_argument("--model", default=d.model,
                   help="HF checkpoint directory (default: the bundled tiny Mixtral, relative to the repo)")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES),
                   help="weights and compute dtype (float32 on CPU by default)")
    p.add_argument("--expert-backend", default=d.expert_backend, choices=BACKENDS,
                   help="ray: expert shards as Serve deployments reached over gRPC; local: in the router")
    p.add_argument("--num-shards", type=int, default=d.num_shards,
                   help="expert shards (default: one per expert)")
    p.add_argument("--replicas-per-shard", type=int, default=d.replicas_per_shard)
    p.add_argument("--num-gpus", type=float, default=d.num_gpus, help="GPUs per expert replica")
    p.add_argument("--expert-num-cpus", type=float, default=d.expert_num_cpus,
                   help="CPUs per expert replica (default: 1, or 0.1 with GPUs)")
    p.add_argument("--served-model-name", default=d.served_model_name,
                   help="the model name clients send (default: the checkpoint directory's name)")
    p.add_argument("--router-replicas", type=int, default=d.router_replicas)
    p.add_argument("--router-num-cpus", type=float, default=d.router_num_cpus, help="CPUs per router replica")
    p.add_argument("--router-threads", type=int, default=d.router_threads,
                   help="torch threads per router replica (default: its CPUs)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences batched per router")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="context limit (default: the model's)")
    p.add_argument("--stream-chunks-per-s", type=float, default=d.stream_chunks_per_s,
                   help="streamed chunks per second per router, shared by its open streams: under load each "
                        "chunk carries several tokens (0: one chunk per engine step, as vLLM)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_app_arguments(p)
    p.add_argument("-o", "--output", help="write the YAML here (default: stdout)")


def parse(argv: list[str]) -> argparse.Namespace:
    """`raymoe config` options from a list, for code that builds configs (tests, benchmarks)."""
    p = argparse.ArgumentParser(prog="raymoe config")
    add_arguments(p)
    return p.parse_args(argv)


def app_args(args: argparse.Namespace) -> dict:
    """The builder's args from the command line; the API key never goes into a config file."""
    # The default stays relative (portable into a container); a path the user gives is theirs, from here.
    model = args.model if args.model == AppArgs.model else str(Path(args.model).expanduser().resolve())
    a = AppArgs(model=model, dtype=args.dtype, expert_backend=args.expert_backend, num_shards=args.num_shards,
                replicas_per_shard=args.replicas_per_shard, num_gpus=args.num_gpus,
                expert_num_cpus=args.expert_num_cpus, served_model_name=args.served_model_name,
                router_replicas=args.router_replicas, router_num_cpus=args.router_num_cpus,
                router_threads=args.router_threads,
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                stream_chunks_per_s=args.stream_chunks_per_s)
    return {k: v for k, v in asdict(a).items() if v is not None}


def serve_config(args: argparse.Namespace) -> dict:
    """A Serve config (the schema of `serve deploy` and of RayService's serveConfigV2), validated."""
    from ray.serve.schema import ServeDeploySchema

    cfg = {
        "proxy_location": "EveryNode",
        "http_options": {"host": args.host, "port": args.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": app_args(args)}],
    }
    ServeDeploySchema.model_validate(cfg)
    return cfg


def to_yaml(cfg: dict) -> str:
    return HEADER + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def run(args: argparse.Namespace) -> None:
    text = to_yaml(serve_config(args))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
