"""Deploying a Serve config as `serve deploy` would, and `raymoe serve`: start or join Ray, deploy router
and experts from one Serve config, serve until Ctrl-C."""

import importlib
import logging
import os
import signal
import socket
import threading

from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from cluster.ray_init import remove_apps, start_or_join_ray, start_serve
from cluster.serve_config import serve_config
from router.config import EngineConfig, ExpertPlaneConfig
from server.config import ServerConfig

log = logging.getLogger(__name__)


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


def serve_until_stopped(engine: EngineConfig, plane: ExpertPlaneConfig, server: ServerConfig, *,
                        address: str | None = None, num_cpus: int | None = None) -> None:
    """`raymoe serve`: deploy the config `raymoe config` prints, print the URL, remove it all on Ctrl-C.

    Raises CheckpointError (a ValueError) before starting anything when the checkpoint is unusable.
    """
    cfg = serve_config(engine, plane, server)
    Checkpoint(resolve_model(engine.model))  # a missing or broken checkpoint is the user's to fix: say so first
    started_ray = start_or_join_ray(address, num_cpus=num_cpus)
    started_serve = False
    names: list[str] = []
    try:
        started_serve = start_serve(cfg["http_options"], cfg["proxy_location"])
        port = http_port()
        if port != server.port:
            log.warning("Serve already runs on this cluster with its HTTP port %d; using it", port)
        names = deploy(cfg, server.api_key)
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
        url = f"http://{host}:{port}/v1"
        auth = " -H \"Authorization: Bearer $RAYMOE_API_KEY\"" if server.api_key else ""
        model = server.served_model_name or os.path.basename(os.path.normpath(engine.model))
        print(f"\nraymoe serves {model} at {url} (OpenAI API; experts: {plane.expert_backend}). Try:\n\n"
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
