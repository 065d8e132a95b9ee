"""Deploying a Serve config as `serve deploy` would, and `raymoe serve`: start or join Ray, deploy router
and experts from one Serve config, serve until Ctrl-C."""

import copy
import logging
import os
import signal
import socket
import threading
import time

from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from cluster.plane_token import give_token
from cluster.ray_init import remove_apps, start_or_join_ray, start_serve
from cluster.serve_config import serve_config
from router.config import EngineConfig, ExpertPlaneConfig
from server.config import ServerConfig

log = logging.getLogger(__name__)


def deployed_configs() -> dict[str, dict]:
    """The configs of the applications running from a config (`serve deploy`, KubeRay, `deploy`), by name."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return {name: app["deployed_app_config"] for name, app in details.get("applications", {}).items()
            if app.get("source") == "declarative" and app.get("deployed_app_config")}


def apply(applications: list[dict], timeout_s: float = 300.0) -> None:
    """Apply app configs through the controller's declarative path, the one `serve deploy` and KubeRay's
    RayService take, beside the apps already deployed that way; wait until they run.

    A change to one deployment's options (a shard's num_replicas) is then a lightweight update of that
    deployment; only a change to an app's code or args rebuilds the app. A new app gets a data-plane token in
    its runtime_env; a running one keeps its own (cluster.plane_token).
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    deployed = deployed_configs()
    applications = copy.deepcopy(applications)
    for app in applications:
        give_token(app, deployed.get(app["name"]))
    apps = deployed | {app["name"]: app for app in applications}
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))
    for app in applications:
        deadline = time.monotonic() + timeout_s  # each app's own, as Serve's wait gives each one
        try:
            client._wait_for_application_running(app["name"], timeout_s=int(timeout_s))
            wait_routers_ready(app["name"], deadline - time.monotonic())
        except TimeoutError:
            raise TimeoutError(f"application {app['name']!r} is not running after {timeout_s:.0f}s: "
                               f"{not_running(app['name'])}") from None


def wait_routers_ready(app: str, timeout_s: float) -> None:
    """Wait until every running Router replica of the app has its engine ready (they answer 503 until then).

    Called once the app runs, so its routers run too; an app without routers (an expert plane) has none to wait for.
    """
    from cluster.app import routers_ready

    deadline = time.monotonic() + timeout_s
    while (state := routers_ready(app))[0] < state[1]:
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.2)


def not_running(app: str) -> str:
    """What Serve says of the app's deployments that are not healthy (pending replicas name the resources)."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return "; ".join(f"{name}: {d.status} {d.message}".strip() for name, d in deployments.items()
                     if d.status != "HEALTHY") or "no deployment reports a problem"


def deploy(cfg: dict, api_key: str | None = None) -> list[str]:
    """Run every application of a Serve config on the connected cluster, as `serve deploy` would; the API
    key goes to the replicas' environment, never into the app's args."""
    apps = copy.deepcopy(cfg["applications"])
    if api_key:
        for app in apps:
            env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env["RAYMOE_API_KEY"] = api_key
    apply(apps)
    return [app["name"] for app in apps]


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
    # Logical CPUs are scheduling slots: a Ray started here gets at least 16, so that `raymoe scale` and the
    # autoscaler have room to add replicas beside the router on a small machine.
    started_ray = start_or_join_ray(address, num_cpus=num_cpus or max(os.cpu_count() or 1, 16))
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


def scale_shard(app: str, shard: int, replicas: int, timeout_s: float = 120.0) -> None:
    """Set one expert shard's replica count through the app's own config: a lightweight update of that
    deployment alone (no other replica restarts). An autoscaled shard is pinned at `replicas`."""
    from cluster.autoscaling import log_decision

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    configs = deployed_configs()
    if app not in configs:
        raise ValueError(f"no application {app!r} deployed from a config here (running: {sorted(configs)}); "
                         "`raymoe serve` and KubeRay deploy that way")
    cfg = copy.deepcopy(configs[app])
    name = f"ExpertShard-{shard}"
    dep = next((d for d in cfg.get("deployments", []) if d.get("name") == name), None)
    if dep is None:
        shards = sorted(d["name"] for d in cfg.get("deployments", []) if d["name"].startswith("ExpertShard-"))
        raise ValueError(f"application {app!r} has no {name} (it has {shards})")
    if "autoscaling_config" in dep:
        dep["autoscaling_config"].update(min_replicas=replicas, max_replicas=replicas, initial_replicas=replicas)
    else:
        dep["num_replicas"] = replicas
    log_decision(app, "scale", f"{name}: {replicas} replicas (by hand)")
    apply([cfg], timeout_s)
