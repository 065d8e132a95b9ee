"""`raymoe serve`: start or join Ray, deploy router and experts from one Serve config, serve until Ctrl-C."""

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
import threading

from cluster.app import AppArgs
from cluster.bringup import remove_apps
from cluster.serve_config import add_app_arguments, serve_config
from experts.checkpoint import Checkpoint, CheckpointError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_app_arguments(p)
    p.add_argument("--api-key", default=os.environ.get("RAYMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $RAYMOE_API_KEY; none: open)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster ('auto': the local one) instead of starting one (default: "
                        "$RAY_ADDRESS)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a Ray started here (default: enough for router and experts)")


def deploy(cfg: dict, api_key: str | None = None) -> list[str]:
    """Run every application of a Serve config on the connected cluster, as `serve deploy` would."""
    from ray import serve

    names = []
    for app in cfg["applications"]:
        args = dict(app.get("args", {}))
        if api_key:
            args["api_key"] = api_key
        module, _, attr = app["import_path"].partition(":")
        target = getattr(importlib.import_module(module), attr)
        built = target if isinstance(target, serve.Application) else target(args)  # an application builder
        serve.run(built, name=app["name"], route_prefix=app.get("route_prefix", "/"))
        names.append(app["name"])
    return names


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_port() -> int:
    """The port Serve's proxies actually listen on (a running Serve keeps its own)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.port


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    cfg = serve_config(args)
    try:  # a missing or broken checkpoint is the user's to fix: say so before starting anything
        Checkpoint(AppArgs.from_dict(cfg["applications"][0]["args"]).model_path())
    except (CheckpointError, ValueError) as e:
        sys.exit(f"raymoe serve: {e}")
    started_ray = not ray.is_initialized()
    if started_ray:
        if args.address:
            ray.init(address=args.address)
        else:
            # Logical CPUs are scheduling slots: the router and every expert replica need one each.
            ray.init(num_cpus=args.num_cpus or max(os.cpu_count() or 1, 16),
                     object_store_memory=200 * 1024 * 1024, include_dashboard=False)
    started_serve = _get_global_client(raise_if_no_controller_running=False) is None
    names: list[str] = []
    try:
        serve.start(http_options=cfg["http_options"], proxy_location=cfg["proxy_location"])
        port = http_port()
        if port != args.port:
            log.warning("Serve already runs on this cluster with its HTTP port %d; using it", port)
        names = deploy(cfg, args.api_key)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{port}/v1"
        auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
        model = args.served_model_name or os.path.basename(os.path.normpath(args.model))
        print(f"\nraymoe serves {model} at {url} (OpenAI API; experts: {args.expert_backend}). Try:\n\n"
              f"  curl {url}/completions -H 'Content-Type: application/json'{auth} \\\n"
              f"    -d '{{\"model\": \"{model}\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32, "
              f"\"temperature\": 0}}'\n\nCtrl-C stops it and removes everything it started.", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        print("\nshutting down", flush=True)
        remove_apps(names, started_serve, started_ray)
    return 0
