"""The directory of live expert replicas: a named Ray actor that replicas register with and routers read.

Entries are keyed by Serve application name, so two expert planes in one Ray cluster never mix.
Snapshots travel as msgpack (compact records, no tensors).

It takes churn: Ray restarts the actor if its process dies, and a client whose actor is gone for good
looks it up (or creates it) again. Either way it starts empty and refills within REGISTER_EVERY_S of experts.replica,
since every replica re-registers every few seconds from Serve's health checks; entries not renewed within
ENTRY_TTL_S (a replica that died without deregistering) are dropped. A router's failure report makes a
replica suspect, not dead: the directory asks the replica's gRPC health service and keeps it if it answers.

It also holds each app's placement (which shard holds which (layer, expert) pairs, when a rebalance has
changed it from the deployed plan): the active one routers follow, and a target that replicas load
before the rebalancer makes it active. Placements live in Ray's GCS key-value store too, so a restarted
directory, and a replica started later, find the placement in force. Routers report the tokens they
route per (layer, expert), which the rebalancer sums over a recent window, and which shard each layer
waited for last, which the autoscaling policy reads.
"""

import asyncio
import json
import logging
import time
from collections import deque
from itertools import zip_longest

import msgpack
import numpy as np
import ray

from cluster.autoscaling import ROUTER_LOAD_KEY
from experts.security import ClientTLS, replica_channel

log = logging.getLogger(__name__)

NAMESPACE = "raymoe"
DIRECTORY_NAME = "raymoe-directory"
ENTRY_TTL_S = 30.0  # six of the replicas' re-registrations (experts.replica.REGISTER_EVERY_S)
PROBE_TIMEOUT_S = 2.0
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0  # a new directory actor's process start, on a node that may be busy
PLACEMENT_KEY = "raymoe/placement/{app}"  # GCS key-value store: msgpack {"active": record, "target": record}
TOKEN_HISTORY_S = 600.0  # routers' token reports kept this long
CRITICAL_WINDOW_S = 5.0  # the autoscaler sees the routers' critical path over this window


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ReplicaDirectory:
    def __init__(self):
        self.apps: dict[str, dict[str, dict]] = {}  # app -> replica_id -> entry
        self.seen: dict[tuple[str, str], float] = {}  # (app, replica_id) -> last registration
        # Bumps on every change; starts from the clock so that a restarted directory never goes back.
        self.version = time.time_ns() // 1_000_000
        # app -> {"active": record | None, "target": record | None}; a record is {"version", "plan_id", "shards",
        # "standby"} (standby: per shard, pairs it loads but routers use only while their holders are down)
        self.placements: dict[str, dict] = {}
        self.tokens: dict[str, deque] = {}  # app -> (time, (L, E) tokens) reports of routers
        self.critical: dict[str, deque] = {}  # app -> (time, per-shard critical seconds, waiting) reports

    def _changed(self) -> None:
        self.version += 1

    # --- placement --------------------------------------------------------------------------------

    def _placement(self, app: str) -> dict:
        if app not in self.placements:
            raw = _kv_get(PLACEMENT_KEY.format(app=app))
            self.placements[app] = msgpack.unpackb(raw) if raw else {"active": None, "target": None}
        return self.placements[app]

    def _save(self, app: str) -> None:
        _kv_put(PLACEMENT_KEY.format(app=app), msgpack.packb(self.placements[app]))
        self._changed()

    async def placement(self, app: str) -> bytes:
        """msgpack of {"active": record | None, "target": record | None}."""
        return msgpack.packb(self._placement(app))

    async def propose(self, app: str, record: dict) -> None:
        """Replicas load `record`'s pairs beside what they serve, and say so in their entries' "ready"."""
        p = self._placement(app)
        active = p["active"]["version"] if p["active"] else 0
        if record["version"] <= active:
            raise ValueError(f"placement version {record['version']} is not newer than the active {active}")
        p["target"] = record
        self._save(app)

    async def commit(self, app: str, version: int) -> None:
        """The target becomes the placement routers follow; replicas drop what it no longer holds."""
        p = self._placement(app)
        if not p["target"] or p["target"]["version"] != version:
            raise ValueError(f"placement version {version} is not the target")
        p["active"], p["target"] = p["target"], None
        self._save(app)

    async def abort(self, app: str, version: int) -> None:
        p = self._placement(app)
        if p["target"] and p["target"]["version"] == version:
            p["target"] = None
            self._save(app)

    # --- routers' token counts ----------------------------------------------------------------------

    async def report_load(self, app: str, tokens: list, critical_s: list, waiting: int) -> None:
        """A router's report (see ReplicaSource.report_load). The shards' critical-path seconds and the waiting
        requests over the last CRITICAL_WINDOW_S go to the GCS key-value store, where the autoscaling policy,
        running in Serve's controller, reads them."""
        now = time.monotonic()
        history = self.tokens.setdefault(app, deque())
        if np.any(tokens):
            history.append((now, np.asarray(tokens, dtype=np.int64)))
        while history and history[0][0] < now - TOKEN_HISTORY_S:
            history.popleft()
        recent = self.critical.setdefault(app, deque())
        recent.append((now, list(critical_s), int(waiting)))
        while recent and recent[0][0] < now - CRITICAL_WINDOW_S:
            recent.popleft()
        per_shard = [sum(s) for s in zip_longest(*(c for _, c, _ in recent), fillvalue=0.0)]
        _kv_put(ROUTER_LOAD_KEY.format(app=app), json.dumps({
            "time": time.time(), "window_s": CRITICAL_WINDOW_S, "critical_s": per_shard,
            "waiting": max(w for _, _, w in recent)}).encode())

    async def token_counts(self, app: str, window_s: float) -> list | None:
        """(L, E) tokens the app's routers routed to each (layer, expert) over the last window_s, or None."""
        since = time.monotonic() - window_s
        recent = [c for t, c in self.tokens.get(app, ()) if t >= since]
        return np.sum(recent, axis=0).tolist() if recent else None

    async def register(self, entry: dict) -> None:
        app, rid = entry["app"], entry["replica_id"]
        replicas = self.apps.setdefault(app, {})
        self.seen[(app, rid)] = time.monotonic()
        old = replicas.get(rid)
        state = old.get("state", "serving") if old else "serving"
        new = {**entry, "state": "draining" if state == "draining" else "serving"}
        if old != new:
            replicas[rid] = new
            self._changed()

    async def set_state(self, app: str, replica_id: str, state: str) -> None:
        entry = self.apps.get(app, {}).get(replica_id)
        if entry is not None and entry.get("state") != state:
            entry["state"] = state
            self._changed()

    async def deregister(self, app: str, replica_id: str) -> None:
        self.seen.pop((app, replica_id), None)
        if self.apps.get(app, {}).pop(replica_id, None) is not None:
            self._changed()

    async def report_failure(self, app: str, address: str) -> None:
        """A router could not reach `address`: suspect until its health service answers, else drop it."""
        for rid, e in list(self.apps.get(app, {}).items()):
            if e["address"] == address and e.get("state") == "serving":
                e["state"] = "suspect"
                self._changed()
                asyncio.get_running_loop().create_task(self._probe(app, rid, address, ClientTLS.from_entry(e)))

    async def _probe(self, app: str, replica_id: str, address: str, tls: ClientTLS | None) -> None:
        """The health service needs no data-plane token (as Kubernetes probes carry none), but TLS if served."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        serving = False
        try:
            async with replica_channel(address, tls) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                         timeout=PROBE_TIMEOUT_S)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as e:  # every call slot taken: it answered, busy rather than gone
            serving = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        entry = self.apps.get(app, {}).get(replica_id)
        if entry is None or entry.get("state") != "suspect":
            return
        if serving:
            entry["state"] = "serving"
            self._changed()
        else:
            log.warning("replica %s at %s does not answer its health check: dropped until it registers again",
                        replica_id, address)
            await self.deregister(app, replica_id)

    def _expire(self, app: str) -> None:
        now = time.monotonic()
        for rid in [rid for rid in self.apps.get(app, {}) if now - self.seen.get((app, rid), now) > ENTRY_TTL_S]:
            del self.apps[app][rid]
            self.seen.pop((app, rid), None)
            self._changed()

    async def remove_app(self, app: str) -> None:
        self.tokens.pop(app, None)
        self.critical.pop(app, None)
        _kv_del(ROUTER_LOAD_KEY.format(app=app))
        self.placements.pop(app, None)
        _kv_del(PLACEMENT_KEY.format(app=app))
        if self.apps.pop(app, None) is not None:
            self.seen = {k: v for k, v in self.seen.items() if k[0] != app}
            self._changed()

    async def snapshot(self, app: str) -> bytes:
        """msgpack of {"version": int, "replicas": [entry with its "state", ...], "placement": the active
        record or None} for one app."""
        self._expire(app)
        return msgpack.packb({"version": self.version, "replicas": list(self.apps.get(app, {}).values()),
                              "placement": self._placement(app)["active"]})

    async def app_names(self) -> list[str]:
        return sorted(app for app, replicas in self.apps.items() if replicas)


def _kv_get(key: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key.encode())


def _kv_put(key: str, value: bytes) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key.encode(), value, overwrite=True)


def _kv_del(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key.encode())


def get_directory():
    """The cluster's directory actor, created on first use; it outlives whoever created it."""
    return ReplicaDirectory.options(name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True,
                                    lifetime="detached").remote()


class DirectoryClient:
    """A picklable way to the directory, handed to replicas (as their `Registry`) and routers.

    Holds no actor handle across pickling, so it can travel inside Serve deployment arguments and
    config-built apps; a call that finds the actor gone for good looks it up (or creates it) again.
    """

    def __init__(self, app: str | None = None):
        self.app = app
        self._actor = None

    def __getstate__(self):
        return {"app": self.app}

    def __setstate__(self, state):
        self.app, self._actor = state["app"], None

    @property
    def actor(self):
        if self._actor is None:
            actor = get_directory()
            # A directory created just now starts a process of its own, which on a busy node takes longer than
            # a call's timeout: wait for it once here, not in every caller's first call.
            ray.get(actor.__ray_ready__.remote(), timeout=START_TIMEOUT_S)
            self._actor = actor
        return self._actor

    def _call(self, method: str, *args, timeout: float = CALL_TIMEOUT_S, wait: bool = True):
        for attempt in range(2):
            try:
                ref = getattr(self.actor, method).remote(*args)
                return ray.get(ref, timeout=timeout) if wait else ref
            except ray.exceptions.RayActorError:
                if attempt:
                    raise
                self._actor = None  # killed for good: find or create the directory anew

    # --- Registry (replica side) --------------------------------------------------------------

    def register(self, entry: dict) -> None:
        self._call("register", entry, timeout=60)

    def deregister(self, app: str, replica_id: str) -> None:
        self._call("deregister", app, replica_id, timeout=5)

    def set_state(self, app: str, replica_id: str, state: str) -> None:
        self._call("set_state", app, replica_id, state)

    def placement(self, app: str) -> dict:
        """{"active": record | None, "target": record | None} of `app` (replicas poll it)."""
        return msgpack.unpackb(self._call("placement", app))

    # --- ReplicaSource (router side) ----------------------------------------------------------

    def snapshot(self) -> dict:
        return msgpack.unpackb(self._call("snapshot", self.app))

    def replicas(self) -> list[dict]:
        """The entries routers may send to: serving or suspect (a suspect is re-checked, not dropped)."""
        return [e for e in self.snapshot()["replicas"] if e.get("state") != "draining"]

    def view(self) -> dict:
        """{"replicas": what replicas() lists, "placement": the active placement record or None}."""
        snap = self.snapshot()
        return {"replicas": [e for e in snap["replicas"] if e.get("state") != "draining"],
                "placement": snap["placement"]}

    def report_failure(self, address: str) -> None:
        self._call("report_failure", self.app, address, wait=False)  # fire and forget: the caller has moved on

    def report_load(self, tokens: list, critical_s: list, waiting: int) -> None:
        self._call("report_load", self.app, tokens, critical_s, waiting, wait=False)

    # --- rebalancer ---------------------------------------------------------------------------------

    def token_counts(self, window_s: float) -> list | None:
        return self._call("token_counts", self.app, window_s)

    def propose(self, record: dict) -> None:
        self._call("propose", self.app, record)

    def commit(self, version: int) -> None:
        self._call("commit", self.app, version)

    def abort(self, version: int) -> None:
        self._call("abort", self.app, version)

    def remove_app(self) -> None:
        self._call("remove_app", self.app)

    def app_names(self) -> list[str]:
        return self._call("app_names")

    def wait_for_shards(self, timeout_s: float, poll_s: float = 0.2) -> list[dict]:
        """Entries once every shard of the plan has a registered replica; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            entries = self.replicas()
            if entries:
                want = set(range(entries[0]["num_shards"]))
                missing = want - {e["shard"] for e in entries}
                if not missing:
                    return entries
            else:
                missing = "all"
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert plane {self.app!r}: no live replica for shards {missing} after "
                                   f"{timeout_s:.0f}s (are its replicas pending for want of CPUs or GPUs? "
                                   "`ray status` shows demands; lower --expert-num-cpus or add nodes)")
            time.sleep(poll_s)
