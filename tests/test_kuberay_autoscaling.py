"""Node autoscaling as on KubeRay: an expert shard scaled beyond the GPUs of the nodes the cluster has makes
Ray's autoscaler add a worker node; scaled back, the node goes once it has been idle for the idle timeout.

Ray's fake multi-node autoscaling cluster (tests/ray_nodes.py: AutoscalingCluster run safely beside other
Rays) runs the autoscaler KubeRay's in-tree autoscaler runs, with local raylets for pods. The app is deployed
and scaled through the dashboard's Serve REST API, as KubeRay's operator applies a RayService's serveConfigV2
(a shard's num_replicas changed: a lightweight update of that deployment). Minutes: RAYMOE_KUBERAY_TESTS=1.
"""

import copy
import os
import time

import pytest
from ray_nodes import autoscaling_cluster_class, free_port, wait_for
from test_kuberay import details, replica_nodes, wait_running

pytestmark = pytest.mark.skipif(not os.environ.get("RAYMOE_KUBERAY_TESTS"),
                                reason="multi-node Ray (minutes): RAYMOE_KUBERAY_TESTS=1, make test-kuberay")

IDLE_TIMEOUT_MINUTES = 0.1  # KubeRay's autoscalerOptions.idleTimeoutSeconds (default 60) in the fake cluster


def put(nodes, cfg):
    status, out = nodes.api("PUT", "/api/serve/applications/", cfg)
    assert status == 200, out


def test_expert_shard_scale_up_adds_a_node_and_scale_down_returns_it():
    from cli.main import parse_settings
    from cluster.serve_config import serve_config

    port = free_port()
    # Two shards of half a GPU each: one GPU node holds both; a second replica of shard 0 needs another node.
    cfg = serve_config(*parse_settings(["--num-shards", "2", "--num-gpus", "0.5", "--host", "127.0.0.1",
                                        "--port", str(port), "--max-num-seqs", "8"]))
    cfg["proxy_location"] = "HeadOnly"
    cluster = autoscaling_cluster_class()(
        head_resources={"CPU": 2},
        worker_node_types={"gpu-experts": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100_000_000},
                                           "node_config": {}, "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    timings = {}
    try:
        cluster.start()
        nodes = cluster.nodes
        t0 = time.monotonic()
        put(nodes, cfg)  # no GPU node yet: the autoscaler adds the first for the two shards' replicas
        app = wait_running(nodes)
        timings["first_node_and_deploy_s"] = time.monotonic() - t0
        workers = {n["node_id"] for n in nodes.nodes() if not n["is_head_node"]}
        assert len(workers) == 1 and replica_nodes(app)["ExpertShard-0"] == workers

        scaled = copy.deepcopy(cfg)
        shard0 = next(d for d in scaled["applications"][0]["deployments"] if d["name"] == "ExpertShard-0")
        shard0["num_replicas"] = 2
        t0 = time.monotonic()
        put(nodes, scaled)
        new = wait_for("a second worker node", lambda: {n["node_id"] for n in nodes.nodes()
                                                        if not n["is_head_node"]} - workers, 180)
        timings["scale_up_node_alive_s"] = time.monotonic() - t0

        def on_new_node():
            where = replica_nodes(details(nodes)["applications"]["raymoe"])
            return where["ExpertShard-0"] & new
        wait_for("shard 0's second replica RUNNING on the new node", on_new_node, 180)
        timings["scale_up_replica_running_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        put(nodes, cfg)  # back to one replica: Serve stops the one on the emptier node
        wait_for("the added node gone", lambda: new & {n["node_id"] for n in nodes.nodes("DEAD")}, 180)
        timings["scale_down_node_gone_s"] = time.monotonic() - t0
        app = wait_running(nodes, timeout_s=60)
        assert all(ids <= workers for name, ids in replica_nodes(app).items() if name.startswith("ExpertShard-"))
    finally:
        print(f"\nnode autoscaling (idle timeout {IDLE_TIMEOUT_MINUTES * 60:.0f} s):",
              {k: round(v, 1) for k, v in timings.items()})
        cluster.shutdown()
