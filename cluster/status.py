"""`raymoe status`: the expert plane as the directory, Serve and the replicas themselves see it."""

import time

import grpc

from cluster.autoscaling import decisions, router_load, router_shares
from cluster.directory import DirectoryClient
from cluster.plane_token import app_token
from cluster.rebalance import current_placement, describe_pairs
from experts.replica import SERVICE
from experts.security import ClientTLS, call_metadata, replica_channel
from protos import expert_pb2

INFO_TIMEOUT_S = 2.0


def replica_info(entry: dict, token: str | None) -> expert_pb2.InfoResponse | None:
    """The replica's own Info (None if it does not answer, or the data-plane token is unknown here)."""
    if token is None:
        return None
    try:
        with replica_channel(entry["address"], ClientTLS.from_entry(entry), aio=False) as channel:
            call = channel.unary_unary(f"/{SERVICE}/Info", request_serializer=lambda b: b,
                                       response_deserializer=expert_pb2.InfoResponse.FromString)
            return call(b"", timeout=INFO_TIMEOUT_S, metadata=call_metadata(token))
    except grpc.RpcError:
        return None


def known_token(app: str) -> str | None:
    try:
        return app_token(app)
    except ValueError:
        return None


def plane_status(app: str) -> dict:
    """{"app", "version", "placement_version", "requests_waiting", "shards": [{"shard", "pairs", "standby", "critical",
    "replicas": [{"replica_id", "address", "node_id", "state", "busy", "tokens": {"<layer>.<expert>": n}}]}],
    "decisions": [{"time", "kind", "detail"}]}.

    States: starting (Serve started it, it has not registered yet), serving, suspect (a router could not
    reach it; being re-checked), draining (leaving: finishing its calls). A shard's pairs are those of the
    placement in force (placement_version 0: the deployed plan; higher: a rebalance's). A shard's critical is
    its share of the routers' layer waits over the last few seconds (None while routers are not under load),
    requests_waiting the most requests a router had waiting for a batch slot then (None without reports).
    """

    from ray.serve.context import _get_global_client

    snap = DirectoryClient(app).snapshot()
    token = known_token(app)
    details = _get_global_client().get_serve_details().get("applications", {}).get(app)
    if details is None and not snap["replicas"]:
        raise ValueError(f"no expert plane {app!r} in this cluster")
    placement_version, pairs, standby = 0, {}, {}
    try:
        placement_version, by_shard, spare, _ = current_placement(snap)
        pairs, standby = dict(enumerate(by_shard)), dict(enumerate(spare))
    except ValueError:  # no replica registered yet, or a deployment under way: each entry's own pairs
        pairs = {e["shard"]: e["pairs"] for e in snap["replicas"]}
    shards: dict[int, dict] = {}
    registered = set()
    for e in sorted(snap["replicas"], key=lambda e: (e["shard"], e["replica_id"])):
        registered.add(e["replica_id"])
        info = replica_info(e, token)
        held = [list(p) for p in pairs.get(e["shard"], [])]
        shard = shards.setdefault(e["shard"], {"shard": e["shard"], "pairs": held, "replicas": [],
                                               "standby": [list(p) for p in standby.get(e["shard"], [])]})
        shard["replicas"].append({
            "replica_id": e["replica_id"], "address": e["address"], "node_id": e.get("node_id"),
            # Without the token (a plane deployed by another process's LLM) Info is not asked: no news is not "down".
            "state": e.get("state", "serving") if info is not None or token is None else "unreachable",
            "busy": info.busy if info is not None else None,
            "tokens": {f"{p.layer}.{p.expert}": p.tokens for p in info.load} if info is not None else {}})
    for name, dep in (details or {}).get("deployments", {}).items():
        if not name.startswith("ExpertShard-"):
            continue
        s = int(name.rsplit("-", 1)[1])
        shard = shards.setdefault(s, {"shard": s, "pairs": [], "replicas": [], "standby": []})
        for r in dep.get("replicas", []):
            if r["replica_id"] not in registered and r["state"] in ("STARTING", "RUNNING", "UPDATING"):
                shard["replicas"].append({"replica_id": r["replica_id"], "address": None,
                                          "node_id": r.get("node_id"), "state": "starting", "busy": None,
                                          "tokens": {}})
    router = router_load(app)
    shares = router_shares(router)
    for s, shard in shards.items():
        shard["critical"] = shares.get(s)
    return {"app": app, "version": snap["version"], "placement_version": placement_version,
            "requests_waiting": router["waiting"] if router else None,
            "shards": [shards[s] for s in sorted(shards)],
            "decisions": decisions(app)}


def format_status(s: dict) -> str:
    lines = [f"expert plane {s['app']!r}, directory version {s['version']}, placement version "
             f"{s['placement_version']}"]
    if s["requests_waiting"] is not None:
        lines.append(f"requests waiting for a batch slot: {s['requests_waiting']}")
    for shard in s["shards"]:
        critical = "" if shard["critical"] is None else f", last in {shard['critical']:.0%} of layer waits"
        spare = f", standby for {describe_pairs(shard['standby'])}" if shard["standby"] else ""
        lines.append(f"shard {shard['shard']}: {len(shard['replicas'])} replicas, {len(shard['pairs'])} pairs "
                     f"({describe_pairs(shard['pairs'])}){spare}{critical}")
        for r in shard["replicas"]:
            busy = "-" if r["busy"] is None else f"{r['busy']:.0%}"
            top = sorted(r["tokens"].items(), key=lambda kv: -kv[1])[:4]
            tokens = ", ".join(f"{k}: {n}" for k, n in top)
            lines.append(f"  {r['replica_id']:<10} {r['state']:<11} busy {busy:>4}  {r['address'] or '':<22} "
                         f"node {(r['node_id'] or '')[:8]}  tokens {sum(r['tokens'].values())} ({tokens})")
    if s["decisions"]:
        lines.append("recent decisions:")
        for d in s["decisions"][-10:]:
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(d['time']))} {d['kind']:<9} {d['detail']}")
    return "\n".join(lines)
