"""KubeRay's deploy path on a real multi-node Ray: the serveConfigV2 of k8s/rayservice.yaml, PUT to the head's
dashboard as KubeRay's operator does, served by a head node and a worker node standing for the gpu-experts group.

The nodes are `ray start` processes of this test's own (tests/ray_nodes.py: own temp dir, free ports, Ray token
auth as KubeRay's `authOptions` sets it up), never the session's Ray. They take minutes on a busy machine, so
the module runs only with RAYMOE_KUBERAY_TESTS=1 (`make test-kuberay`).
"""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import RayNodes, free_port, wait_for

pytestmark = pytest.mark.skipif(not os.environ.get("RAYMOE_KUBERAY_TESTS"),
                                reason="multi-node Ray (minutes): RAYMOE_KUBERAY_TESTS=1, make test-kuberay")

REPO = Path(__file__).resolve().parent.parent
APP = "raymoe"
API_KEY = "test-api-key"  # as the secret raymoe-secrets puts it into every pod's env
DEPLOY_TIMEOUT_S = 300


def rayservice_config() -> tuple[str, dict]:
    """The serveConfigV2 text of k8s/rayservice.yaml and the JSON body KubeRay's operator makes of it (YAML
    parsed, sent as JSON); only the HTTP port differs, so that this test never shares a port with another
    Serve on the machine (Serve's proxies bind with SO_REUSEPORT)."""
    text = yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"]
    body = yaml.safe_load(text)
    body["http_options"]["port"] = free_port()
    return text, body


def details(nodes: RayNodes) -> dict:
    status, body = nodes.api("GET", "/api/serve/applications/?api_type=declarative")
    assert status == 200, body
    return json.loads(body)


def app_state(nodes: RayNodes, name: str = APP) -> dict | None:
    return details(nodes)["applications"].get(name)


def wait_running(nodes: RayNodes, name: str = APP, timeout_s: float = DEPLOY_TIMEOUT_S) -> dict:
    def running():
        app = app_state(nodes, name)
        if app and app["status"] == "DEPLOY_FAILED":
            raise AssertionError(f"{name} failed to deploy: {app['message']}")
        return app if app and app["status"] == "RUNNING" else None
    return wait_for(f"application {name} RUNNING", running, timeout_s, 1.0)


def replica_nodes(app: dict) -> dict[str, set[str]]:
    return {name: {r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
            for name, d in app["deployments"].items()}


def complete(port: int, timeout_s: float = 60.0, api_key: str = API_KEY):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, timeout=timeout_s,
                           max_retries=0)
    return client.completions.create(model="tiny-mixtral", prompt="def fibonacci(n):", max_tokens=8,
                                     temperature=0)


@pytest.fixture(scope="module")
def cluster():
    """Head (4 CPUs, no GPU, as the manifest's head group) with the config PUT while it is the only node, as
    when the gpu-experts group starts at zero: the Router runs, experts wait for a GPU; then a worker node
    with one (logical) GPU joins, as the pod KubeRay's autoscaler adds, and the experts land there."""
    nodes = RayNodes(env={"RAYMOE_API_KEY": API_KEY, "RAYMOE_DATA_PLANE_TOKEN": "test-data-plane-token"})
    timings = {}
    try:
        t0 = time.monotonic()
        nodes.start_head(num_cpus=4, num_gpus=0)
        text, body = rayservice_config()
        status, out = nodes.api("PUT", "/api/serve/applications/", body)
        assert status == 200, out
        worker, worker_id = nodes.start_worker(num_cpus=2, num_gpus=1)
        app = wait_running(nodes)
        timings["deploy_s"] = time.monotonic() - t0
        yield {"nodes": nodes, "body": body, "port": body["http_options"]["port"], "worker": worker,
               "worker_id": worker_id, "app": app, "timings": timings}
    finally:
        print("\nKubeRay multi-node timings:", {k: round(v, 1) for k, v in timings.items()})
        nodes.stop()


def test_rayservice_config_runs_router_on_head_and_experts_on_gpu_workers(cluster):
    nodes, app = cluster["nodes"], cluster["app"]
    head = next(n["node_id"] for n in nodes.nodes() if n["is_head_node"])
    where = replica_nodes(app)
    shards = sorted(name for name in where if name.startswith("ExpertShard-"))
    assert len(shards) == 8
    assert all(where[s] == {cluster["worker_id"]} for s in shards), where
    assert where["Router"] == {head}, where
    assert app["source"] == "declarative"  # deployed as KubeRay deploys it, so `raymoe scale` can update it


def test_openai_client_completes_with_the_secret_api_key(cluster):
    import openai

    r = complete(cluster["port"])
    assert r.choices[0].text and r.usage.completion_tokens == 8
    with pytest.raises(openai.AuthenticationError):  # the key from the pods' env is required
        complete(cluster["port"], api_key="wrong")


def test_raymoe_status_reads_the_cluster_with_rays_token(cluster):
    """`raymoe status` joins the cluster as from the head pod (RAY_AUTH_TOKEN in its env, as KubeRay sets it)."""
    nodes = cluster["nodes"]
    out = subprocess.run([sys.executable, "-m", "cli.main", "status", "--address", nodes.address, "--json"],
                         env=nodes.env, cwd=nodes.temp_dir, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert [sh["shard"] for sh in s["shards"]] == list(range(8))
    for shard in s["shards"]:
        assert [(r["state"], r["node_id"]) for r in shard["replicas"]] == [("serving", cluster["worker_id"])]


def bad_app(good: dict, name: str, **args) -> dict:
    """An application with the good one's import path and args, a few of them changed."""
    return {"name": name, "route_prefix": f"/{name}", "import_path": good["import_path"],
            "args": {**good["args"], **args}}


def test_bad_configuration_fails_at_deploy_time_with_a_clear_status(cluster):
    """Each bad app fails to deploy (DEPLOY_FAILED) with a message that says what is wrong; the good app beside
    them keeps running untouched."""
    nodes, body = cluster["nodes"], copy.deepcopy(cluster["body"])
    good = body["applications"][0]
    bad = {
        "bad-model": (bad_app(good, "bad-model", model="models/no-such-model"),
                      ["model 'models/no-such-model'", "does not exist"]),
        "bad-shards": (bad_app(good, "bad-shards", placement=[[[0, 0], [0, 1]], [[1, 0]]]),
                       ["expert shards of", "no shard holds"]),
        "bad-gpus": (bad_app(good, "bad-gpus", num_gpus=2.0),
                     ["num_gpus=2.0 per expert replica", "no node of this cluster has more than 1 GPU"]),
    }
    body["applications"] += [app for app, _ in bad.values()]
    t0 = time.monotonic()
    status, out = nodes.api("PUT", "/api/serve/applications/", body)
    assert status == 200, out

    def failed():
        apps = details(nodes)["applications"]
        return all(apps.get(n, {}).get("status") == "DEPLOY_FAILED" for n in bad) and apps
    apps = wait_for("the bad apps DEPLOY_FAILED", failed, 180, 1.0)
    cluster["timings"]["bad_configs_failed_s"] = time.monotonic() - t0
    for name, (_, phrases) in bad.items():
        message = apps[name]["message"]
        assert "raymoe: bad configuration" in message, message
        for phrase in phrases:
            assert phrase in message, message
    assert apps[APP]["status"] == "RUNNING"
    body["applications"] = body["applications"][:1]  # KubeRay's next PUT: the manifest's config again
    status, out = nodes.api("PUT", "/api/serve/applications/", body)
    assert status == 200, out
    wait_for("the bad apps removed", lambda: not set(bad) & set(details(nodes)["applications"]), 60)
    assert complete(cluster["port"]).choices[0].text


def test_experts_come_back_on_a_new_node_after_theirs_dies(cluster):
    """The GPU worker's raylet dies (its pod is gone); KubeRay starts a new pod, Serve reschedules the expert
    replicas there, and requests succeed again."""
    nodes, old = cluster["nodes"], cluster["worker_id"]
    t0 = time.monotonic()
    nodes.kill_raylet(cluster["worker"])
    wait_for("the worker node DEAD", lambda: old in {n["node_id"] for n in nodes.nodes("DEAD")}, 120)
    cluster["timings"]["node_dead_s"] = time.monotonic() - t0
    _, new = nodes.start_worker(num_cpus=2, num_gpus=1)  # the replacement pod
    cluster["timings"]["new_node_s"] = time.monotonic() - t0

    def rescheduled():
        app = app_state(nodes)
        where = replica_nodes(app)
        shards = [s for s in where if s.startswith("ExpertShard-")]
        return app["status"] == "RUNNING" and all(where[s] == {new} for s in shards) and app
    wait_for("expert replicas RUNNING on the new node", rescheduled, DEPLOY_TIMEOUT_S, 1.0)
    cluster["timings"]["reschedule_s"] = time.monotonic() - t0
    r = complete(cluster["port"], timeout_s=120)  # the router finds the new replicas through the directory
    cluster["timings"]["first_request_after_kill_s"] = time.monotonic() - t0
    assert r.choices[0].text
    for _ in range(3):
        assert complete(cluster["port"]).choices[0].text
