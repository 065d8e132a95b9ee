"""One replica of an expert shard: its (layer, expert) weights behind ExpertService on gRPC.

Serve owns the replica's life (placement, health checks, restarts); the data plane bypasses
Serve's request path: routers call the replica's own grpc.aio server, whose address the replica
registers in a directory given to it (the cluster layer's, reached only through `Registry`).
"""

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ray import serve

from checkpoint.args import parse_dtype
from checkpoint.reader import Checkpoint
from experts.coalesce import Coalescer
from experts.ffn import ExpertSet
from experts.holdings import DRAIN_VIEW_S, Holdings
from experts.load import LoadMeter, LoadReport
from experts.pace import UNPACED, Pace
from experts.security import ReplicaSecurity, replica_channel
from experts.wire import WIRE_NAMES, WireError, from_wire, grpc_options, to_wire
from protos import expert_pb2

log = logging.getLogger(__name__)


class Registry(Protocol):
    """Where a replica announces its address; must survive pickling into the replica."""

    def register(self, entry: dict) -> None: ...

    def deregister(self, app: str, replica_id: str) -> None: ...

    def set_state(self, app: str, replica_id: str, state: str) -> None: ...

    def placement(self, app: str) -> dict: ...


REPORT_EVERY_S = 0.2
# Serve finds a dead replica only at its next health check, and starts the replacement only then: a short period
# is most of what a killed replica costs. Re-registering (which heals a directory restart or a router's false
# alarm) and publishing metrics need no such haste.
HEALTH_CHECK_PERIOD_S = 1.0
REGISTER_EVERY_S = 5.0
DRAIN_MAX_S = 10.0  # within Serve's graceful_shutdown_timeout_s
# Calls served at once: far above what routers send (one per layer per micro-batch each), far below what
# would exhaust the replica's memory with queued messages.
MAX_CONCURRENT_RPCS = 256
SERVICE = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


class NotHeld(WireError):
    """A pair of the model that this replica does not hold: a router on an old placement."""


@dataclass(frozen=True)
class Job:
    """One validated Forward call, bound to the ExpertSet it was checked against."""

    experts: ExpertSet
    x: torch.Tensor  # (N, dim)
    ids: torch.Tensor  # (N, k) int32
    w: torch.Tensor  # (N, k) float32


class ExpertServicer:
    """ExpertService: validates every request against what this replica holds, then runs the experts.

    Requests arrive as raw bytes (the transport has refused any over the message limit), so bytes that are
    not a message get INVALID_ARGUMENT too. A pair of the model this replica does not hold (now) gets
    FAILED_PRECONDITION: the placement moved it, and the router should re-read where it went.
    Valid calls of one layer that wait together run as one batch on the math thread (experts.coalesce).
    """

    def __init__(self, experts: ExpertSet, dim: int, n_layers: int, n_experts: int, dtype: torch.dtype,
                 info: expert_pb2.InfoResponse, device: torch.device, pace: Pace = UNPACED):
        self.dim, self.n_layers, self.n_experts, self.dtype = dim, n_layers, n_experts, dtype
        self.info, self.device, self.pace = info, device, pace
        self.coalescer: Coalescer[Job, tuple[torch.Tensor, int]] = Coalescer(self.run_batch)
        self.load = LoadMeter(experts.pairs, queued=lambda: self.coalescer.waiting)
        self.set_experts(experts)
        self.inflight = 0  # Forward calls between arrival and reply (read by the drain)
        self.last_call = float("-inf")  # time.monotonic() of the last Forward call to arrive (read by the drain)
        self._report: LoadReport | None = None
        self._report_at = 0.0

    def set_experts(self, experts: ExpertSet) -> None:
        """Serve `experts` from the next call on (calls under way finish on the set they started with)."""
        # layer -> (1 + n_experts,) bool, indexed by expert id + 1: may a token name it here (-1: none)
        allowed: dict[int, torch.Tensor] = {}
        for layer, e in experts.pairs:
            allowed.setdefault(layer, torch.tensor([True] + [False] * self.n_experts))[e + 1] = True
        self.held = (experts, allowed)  # one assignment: a call sees both of one set
        del self.info.pairs[:]
        self.info.pairs.extend(expert_pb2.Pair(layer=l, expert=e) for l, e in experts.pairs)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Forward": grpc.unary_unary_rpc_method_handler(
                self.Forward, response_serializer=expert_pb2.ForwardResponse.SerializeToString),
            "Info": grpc.unary_unary_rpc_method_handler(
                self.Info, request_deserializer=expert_pb2.InfoRequest.FromString,
                response_serializer=expert_pb2.InfoResponse.SerializeToString),
            "Echo": grpc.unary_unary_rpc_method_handler(
                self.Echo, response_serializer=expert_pb2.EchoResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def decode(self, raw: bytes, cls):
        try:
            return cls.FromString(raw)
        except DecodeError as e:
            raise WireError(f"not a {cls.DESCRIPTOR.name} message: {e}") from None

    def parse(self, req: expert_pb2.ForwardRequest, held: dict[int, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= req.layer < self.n_layers:
            raise WireError(f"layer {req.layer} is not a layer of this model ({self.n_layers} layers)")
        allowed = held.get(req.layer)
        if allowed is None:
            raise NotHeld(f"layer {req.layer} is not held by shard {self.info.shard} "
                          f"(it holds layers {sorted(held)})")
        x = from_wire(req.hidden, "hidden", self.dtype, ndim=2)  # (N, dim)
        ids = from_wire(req.expert_ids, "expert_ids", torch.int32, ndim=2)  # (N, k)
        w = from_wire(req.weights, "weights", torch.float32, ndim=2)  # (N, k)
        n, dim = x.shape
        if dim != self.dim:
            raise WireError(f"hidden: shape {[n, dim]}, but this model's hidden size is {self.dim}")
        if ids.shape[0] != n or not 1 <= ids.shape[1] <= self.n_experts:
            raise WireError(f"expert_ids: shape {list(ids.shape)}, expected ({n}, k) with "
                            f"1 <= k <= {self.n_experts}")
        if w.shape != ids.shape:
            raise WireError(f"weights: shape {list(w.shape)} differs from expert_ids' {list(ids.shape)}")
        if n == 0:
            return x, ids, w
        lo, hi = (int(v) for v in ids.aminmax())  # few tensor ops: each costs more than its math here
        if lo < -1 or hi >= self.n_experts:
            raise WireError(f"expert_ids: {lo if lo < -1 else hi} is not an expert id "
                            f"(0 <= id < {self.n_experts}, or -1 for none)")
        ok = allowed[ids + 1]  # (N, k)
        if not ok.all():
            raise NotHeld(f"expert {int(ids[~ok][0])} of layer {req.layer} is not held by shard "
                            f"{self.info.shard} (it holds {allowed[1:].nonzero().flatten().tolist()} there)")
        return x, ids, w

    async def Forward(self, raw: bytes, context):
        experts, held = self.held
        try:
            req = self.decode(raw, expert_pb2.ForwardRequest)
            x, ids, w = self.parse(req, held)
        except NotHeld as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.inflight += 1
        self.last_call = time.monotonic()
        try:
            # Even a small call's math runs on the math thread: this loop must keep answering health checks
            # and Info however long a batch takes.
            out, ns = await self.coalescer.submit(req.layer, Job(experts, x, ids, w))
        finally:
            self.inflight -= 1
        load = self.load_report()
        return expert_pb2.ForwardResponse(output=to_wire(out), compute_ns=ns, busy=load.busy, queued=load.queued)

    def run_batch(self, layer: int, jobs: list[Job]) -> list[tuple[torch.Tensor, int]]:
        """On the math thread: the calls of `layer` as one run per ExpertSet (one, unless a placement switch
        came between their arrivals), each call's rows of the output back in order.

        A row's output equals its call's alone up to float32 rounding, not bit for bit: the matmul kernel (MKL's
        sgemm, or oneDNN's on packed weights) sums a row's products in an order that depends on the matmul's row
        count."""
        out: dict[int, tuple[torch.Tensor, int]] = {}
        for experts in dict.fromkeys(j.experts for j in jobs):  # first-seen order
            idx = [i for i, j in enumerate(jobs) if j.experts is experts]
            part = [jobs[i] for i in idx]
            y, ns = self.compute(experts, layer, *merge(part))
            for i, rows in zip(idx, y.split([len(j.x) for j in part]), strict=True):
                out[i] = (rows, ns)
        return [out[i] for i in range(len(jobs))]

    def compute(self, experts: ExpertSet, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                calls: int = 1) -> tuple[torch.Tensor, int]:
        t = time.perf_counter_ns()
        d = self.device
        out = experts.forward(layer, x.to(d), ids.to(d), w.to(d)).cpu()  # (N, dim)
        counts = np.bincount(ids.numpy().ravel() + 1, minlength=self.n_experts + 1)[1:]  # slot -1: not here
        if self.pace.on:  # the device this replica stands for is busy that long: the load meter sees it so
            self.pace.hold(t, counts.tolist())
        ns = time.perf_counter_ns() - t
        self.load.record(layer, {e: int(n) for e, n in enumerate(counts) if n}, ns / 1e9, calls)
        return out, ns

    def load_report(self) -> LoadReport:
        """The meter's report, recomputed at most every REPORT_EVERY_S (replies carry it on every call)."""
        now = time.monotonic()
        if self._report is None or now - self._report_at > REPORT_EVERY_S:
            self._report, self._report_at = self.load.report(), now
        return self._report

    async def Info(self, request, context):
        info = expert_pb2.InfoResponse()
        info.CopyFrom(self.info)
        r = self.load.report()
        info.busy, info.queued = r.busy, r.queued
        info.calls_per_batch, info.calls, info.math_batches = r.calls_per_batch, self.load.calls, self.load.batches
        info.expert_rows, info.expert_matmuls = sum(r.tokens.values()), self.load.expert_matmuls
        info.load.extend(expert_pb2.PairLoad(layer=l, expert=e, tokens=n, tokens_per_s=r.tokens_per_s.get((l, e), 0.0),
                                             busy=r.pair_busy.get((l, e), 0.0)) for (l, e), n in r.tokens.items())
        return info

    async def Echo(self, raw: bytes, context):
        try:
            req = self.decode(raw, expert_pb2.EchoRequest)
            # No bigger than what came in: a small request must not buy a large reply.
            if not 0 <= req.reply_bytes <= len(req.payload):
                raise WireError(f"reply_bytes {req.reply_bytes} is outside [0, {len(req.payload)}] (the payload's "
                                "size: a reply is no bigger than its request)")
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        payload = req.payload
        if req.reply_bytes != len(payload):
            payload = payload[: req.reply_bytes].ljust(req.reply_bytes, b"\0")
        return expert_pb2.EchoResponse(payload=payload)

    def close(self) -> None:
        """After the server stopped: let the math thread go."""
        self.coalescer.close()


def merge(jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(x (N, dim), ids (N, k), w (N, k), calls) of the jobs' rows stacked in order; k is the widest job's,
    narrower ones padded with id -1 (routed elsewhere) and weight 0."""
    if len(jobs) == 1:
        j = jobs[0]
        return j.x, j.ids, j.w, 1
    k = max(j.ids.shape[1] for j in jobs)
    ids = [F.pad(j.ids, (0, k - j.ids.shape[1]), value=-1) for j in jobs]
    w = [F.pad(j.w, (0, k - j.w.shape[1])) for j in jobs]
    return torch.cat([j.x for j in jobs]), torch.cat(ids), torch.cat(w), len(jobs)


class GrpcServer:
    """A grpc.aio server on an event loop of its own thread, apart from Serve's loops.

    security: the token every call but the health service's must carry, and TLS (default: neither, for
    in-process tests; a deployed replica always has a token). max_concurrent_rpcs: calls served at once,
    more get RESOURCE_EXHAUSTED at once (None: unbounded)."""

    def __init__(self, servicer: ExpertServicer, host: str, max_message_bytes: int,
                 security: ReplicaSecurity | None = None, max_concurrent_rpcs: int | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="expert-grpc", daemon=True)
        self.thread.start()
        self.server, port = asyncio.run_coroutine_threadsafe(
            self._start(servicer, host, max_message_bytes, security or ReplicaSecurity(), max_concurrent_rpcs),
            self.loop).result()
        self.address = f"{host}:{port}"

    @staticmethod
    async def _start(servicer: ExpertServicer, host: str, max_message_bytes: int, security: ReplicaSecurity,
                     max_concurrent_rpcs: int | None):
        server = grpc.aio.server(options=grpc_options(max_message_bytes), interceptors=security.interceptors(),
                                 maximum_concurrent_rpcs=max_concurrent_rpcs)
        servicer.add_to_server(server)
        # The standard health service, so grpc_health_probe and load balancers can check replicas too.
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        for name in ("", SERVICE):
            await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
        if security.tls:
            port = server.add_secure_port(f"{host}:0", security.server_credentials())
        else:
            port = server.add_insecure_port(f"{host}:0")
        await server.start()
        return server, port

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=None), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)


class ReplicaMetrics:
    """The replica's load on Ray's Prometheus endpoint (Serve adds deployment, replica and app tags)."""

    def __init__(self, shard: int):
        from ray.serve.metrics import Gauge

        pair = ("layer", "expert", "shard")
        self.busy = Gauge("raymoe_expert_busy", "fraction of the replica's recent wall time spent on this "
                          "(layer, expert)", tag_keys=pair)
        self.rate = Gauge("raymoe_expert_tokens_per_second", "tokens this replica ran through this (layer, expert)",
                          tag_keys=pair)
        self.replica_busy = Gauge("raymoe_expert_replica_busy", "fraction of recent wall time in expert math",
                                  tag_keys=("shard",))
        self.queued = Gauge("raymoe_expert_queued_calls", "Forward calls waiting for the expert math",
                            tag_keys=("shard",))
        self.calls_per_batch = Gauge("raymoe_expert_calls_per_batch", "Forward calls merged into one run of "
                                     "expert math, recent average (1: none merged, 0: no math)", tag_keys=("shard",))
        self.shard = str(shard)

    def publish(self, r: LoadReport) -> None:
        for l, e in r.tokens:  # every pair held, so an idle one reads 0
            tags = {"layer": str(l), "expert": str(e), "shard": self.shard}
            self.busy.set(r.pair_busy.get((l, e), 0.0), tags=tags)
            self.rate.set(r.tokens_per_s.get((l, e), 0.0), tags=tags)
        self.replica_busy.set(r.busy, tags={"shard": self.shard})
        self.queued.set(r.queued, tags={"shard": self.shard})
        self.calls_per_batch.set(r.calls_per_batch, tags={"shard": self.shard})


@serve.deployment(name="ExpertShard", health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=15, graceful_shutdown_wait_loop_s=0.5,
                  ray_actor_options={"num_cpus": 1})
class ExpertShard:
    """Holds the weights of one shard's (layer, expert) pairs, read from the checkpoint one by one."""

    def __init__(self, model: str, dtype: str, shard: int, pairs: list[tuple[int, int]], num_shards: int,
                 registry: Registry, max_message_bytes: int, plan_id: str, security: ReplicaSecurity,
                 max_concurrent_rpcs: int, pace: Pace = UNPACED):
        """pairs: what the deployed plan (plan_id) gives this shard, until a rebalance gives it others.
        security: the application's data-plane token (required) and TLS. pace: the device this replica stands
        for in experiments (experts.pace; default: none, real time only)."""
        import ray

        if not security.token:
            raise ValueError("an expert replica needs its application's data-plane token")
        self.security, self.max_concurrent_rpcs, self.pace = security, max_concurrent_rpcs, pace
        ctx = serve.get_replica_context()
        self.app, self.replica_id = ctx.app_name, ctx.replica_id.unique_id
        self.registry = registry
        ckpt = Checkpoint(model)
        a = ckpt.args
        torch_dtype = parse_dtype(dtype)
        # A replica given a GPU keeps its weights there; the wire stays host memory.
        device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        self.holdings = Holdings(ckpt, torch_dtype, device, self.app, shard, num_shards, plan_id,
                                 [(int(l), int(e)) for l, e in pairs], registry, self._install)
        self.servicer: ExpertServicer | None = None
        self.entry = dict(app=self.app, shard=shard, num_shards=num_shards, plan_id=plan_id,
                          replica_id=self.replica_id, actor_name=ray.get_runtime_context().get_actor_name(),
                          dtype=dtype, max_message_bytes=max_message_bytes,
                          node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid())
        tls = security.client_tls()
        if tls is not None:  # callers learn from the directory how to check this replica's certificate
            self.entry.update(tls.to_entry())
        self.info = expert_pb2.InfoResponse(app=self.app, shard=shard, replica_id=self.replica_id,
                                             max_message_bytes=max_message_bytes, dtype=WIRE_NAMES[torch_dtype],
                                             dim=a.dim)
        self.holdings.sync()  # loads (and warms) the pairs of the placement in force, then registers
        self.holdings.start()
        log.info("shard %d replica %s serves %d experts (placement version %d) at %s", shard, self.replica_id,
                 len(self.entry["pairs"]), self.entry["version"], self.server.address)

    def _install(self, experts: ExpertSet, fields: dict) -> None:
        """Holdings' callback: serve `experts` and register the entry that says which placement they cover."""
        import ray

        self.info.bytes_loaded = self.holdings.ckpt.bytes_loaded  # read from disk so far: only what it held
        if self.servicer is None:  # the first set: start the server on it
            a = self.holdings.ckpt.args
            self.servicer = ExpertServicer(experts, a.dim, a.n_layers, a.n_experts, self.holdings.dtype, self.info,
                                           self.holdings.device, self.pace)
            self.server = GrpcServer(self.servicer, ray.util.get_node_ip_address(), self.entry["max_message_bytes"],
                                     self.security, self.max_concurrent_rpcs)
            self.metrics = ReplicaMetrics(self.entry["shard"])
            self.channel = replica_channel(self.server.address, self.security.client_tls(), aio=False)
            self.health = health_pb2_grpc.HealthStub(self.channel)
            self.entry["address"] = self.server.address
        else:
            self.servicer.set_experts(experts)
        self.entry.update(fields, bytes_loaded=self.info.bytes_loaded)
        self.registry.register(self.entry)
        self.registered_at = time.monotonic()

    def check_health(self) -> None:
        """Serve's health check: the gRPC server answers; re-registering now and then heals a router's false
        alarm."""
        try:
            status = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            status = health_pb2.HealthCheckResponse.SERVING  # every call slot taken: busy, not broken
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"expert gRPC server at {self.server.address} reports {status}")
        if time.monotonic() - self.registered_at >= REGISTER_EVERY_S:  # and Prometheus scrapes no faster
            self.registry.register(self.entry)
            self.registered_at = time.monotonic()
            self.metrics.publish(self.servicer.load.report())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler sees of this replica (its request path never carries our traffic)."""
        r = self.servicer.load.report()
        self.metrics.publish(r)
        return {"busy": r.busy, "queued": float(r.queued), "tokens_per_s": r.total_tokens_per_s}

    def __del__(self):
        """Serve stops the replica: drain, then exit. Routers learn it is draining at their next view refresh
        and send it nothing new; calls already in flight finish; only then does the server stop. A replica no
        call reached for DRAIN_VIEW_S has no router sending to it (an idle one that calls later fails over to
        another replica), so it does not wait for their views: deleting an idle app takes no drain."""
        if not hasattr(self, "channel"):  # __init__ failed before the server started
            return
        self.holdings.stop()
        try:
            self.registry.set_state(self.app, self.replica_id, "draining")
            start = time.monotonic()
            deadline = start + DRAIN_MAX_S
            while max(time.monotonic() - start, time.monotonic() - self.servicer.last_call) < DRAIN_VIEW_S:
                time.sleep(0.05)
            while self.servicer.inflight and time.monotonic() < deadline:
                time.sleep(0.05)
            self.registry.deregister(self.app, self.replica_id)
        except Exception as e:  # the directory may be gone with the cluster: stopping matters more
            log.warning("replica %s could not drain cleanly: %r", self.replica_id, e)
        finally:
            self.channel.close()
            self.server.stop()
            self.servicer.close()
