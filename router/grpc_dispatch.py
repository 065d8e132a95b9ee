"""The gRPC dispatch backend: per layer, scatter tokens to the replicas owning their experts, gather sums.

One message per replica touched per layer, all in flight at once, each with a deadline. A replica that
is unreachable or too slow is dropped from this router's view, reported to the directory, and its
tokens go to another replica of the same shard: a dying replica costs latency, not a request.

The calls run on grpc.aio channels of a private event loop that the calling (engine) thread itself
runs for the length of each layer's gather: no hand-off to another Python thread on the hot path,
which on a busy CPU costs more than the whole transport.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
import torch

from experts.wire import WIRE_NAMES, array_to_wire, from_wire, grpc_options, raw_rows
from protos import expert_pb2, expert_pb2_grpc
from router.dispatch import ExpertBackend

log = logging.getLogger(__name__)

RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class ExpertDispatchError(RuntimeError):
    """A replica refused a request (not a transport failure), or a shard has no live replica left."""


class ReplicaSource(Protocol):
    """Where the router learns replica addresses (the cluster's directory) and reports dead ones."""

    def replicas(self) -> list[dict]:
        """Entries with shard, replica_id, address, max_message_bytes and pairs [[layer, expert], ...]."""

    def report_dead(self, address: str) -> None: ...


@dataclass(frozen=True)
class Replica:
    replica_id: str
    address: str
    rank_seed: int  # for rendezvous hashing: a layer goes to the live replica ranking highest


def owner_table(entries: list[dict], n_layers: int, n_experts: int) -> torch.Tensor:
    """(n_layers, n_experts) long: the shard holding each (layer, expert), checked to cover the model."""
    owner = torch.full((n_layers, n_experts), -1, dtype=torch.long)
    for e in entries:
        for l, x in e["pairs"]:
            if not (0 <= l < n_layers and 0 <= x < n_experts):
                raise ExpertDispatchError(f"shard {e['shard']} claims ({l}, {x}), outside this model's "
                                          f"{n_layers} layers x {n_experts} experts")
            if owner[l, x] not in (-1, e["shard"]):
                raise ExpertDispatchError(f"({l}, {x}) is claimed by shards {int(owner[l, x])} and "
                                          f"{e['shard']}")
            owner[l, x] = e["shard"]
    missing = (owner < 0).nonzero().tolist()
    if missing:
        raise ExpertDispatchError(f"no replica holds (layer, expert) {missing[:4]}: the plan does not cover "
                                  "this model")
    return owner


class GrpcExperts(ExpertBackend):
    def __init__(self, source: ReplicaSource, n_layers: int, n_experts: int, *, timeout_s: float = 10.0,
                 refresh_s: float = 2.0, wait_s: float = 120.0, max_message_bytes: int | None = None):
        """timeout_s: deadline of each call; refresh_s: how often the view is re-read from the source;
        wait_s: how long a call waits for a shard whose replicas all failed to get a new one."""
        self.source, self.timeout_s, self.wait_s = source, timeout_s, wait_s
        entries = source.replicas()
        if not entries:
            raise ExpertDispatchError("the replica source lists no expert replicas")
        self.owner = owner_table(entries, n_layers, n_experts)
        self.owner_np = self.owner.numpy()
        self.max_message_bytes = max_message_bytes or min(e["max_message_bytes"] for e in entries)
        self._loop = asyncio.new_event_loop()
        self._loop_lock = threading.Lock()  # one thread at a time runs the loop
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None  # for callers inside a running loop
        # address -> (channel, stub), used on the private loop only
        self._channels: dict[str, tuple[grpc.aio.Channel, expert_pb2_grpc.ExpertServiceStub]] = {}
        self.view = self._view(entries)
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, args=(refresh_s,), name="expert-view",
                                           daemon=True)
        self._refresher.start()

    # --- the view of live replicas --------------------------------------------------------------

    @staticmethod
    def _view(entries: list[dict]) -> dict[int, list[Replica]]:
        view: dict[int, list[Replica]] = {}
        for e in entries:
            view.setdefault(e["shard"], []).append(
                Replica(e["replica_id"], e["address"], zlib.crc32(e["replica_id"].encode())))
        return view

    def refresh(self) -> None:
        self.view = self._view(self.source.replicas())

    def _refresh_loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.refresh()
            except Exception as e:  # the directory may be briefly unreachable; the old view still works
                log.warning("could not refresh the expert replica view: %r", e)

    def _drop(self, rep: Replica, shard: int, why: str) -> None:
        log.warning("expert replica %s (shard %d) dropped: %s", rep.address, shard, why)
        view = dict(self.view)
        view[shard] = [r for r in view.get(shard, []) if r != rep]
        self.view = view
        chan = self._channels.pop(rep.address, None)
        if chan is not None:
            self._loop.create_task(chan[0].close())
        try:
            self.source.report_dead(rep.address)
        except Exception as e:  # the retry matters more than the report
            log.warning("could not report %s dead: %r", rep.address, e)

    def _stub(self, address: str) -> expert_pb2_grpc.ExpertServiceStub:
        """Only on the private loop: aio channels belong to the loop that made them."""
        chan = self._channels.get(address)
        if chan is None:
            channel = grpc.aio.insecure_channel(address, options=grpc_options(self.max_message_bytes))
            chan = self._channels[address] = (channel, expert_pb2_grpc.ExpertServiceStub(channel))
        return chan[1]

    def _run(self, coro):
        """Run `coro` to completion on the private loop, in this thread unless it already runs a loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            with self._loop_lock:
                return self._loop.run_until_complete(coro)
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-dispatch")
        return self._helper.submit(self._run, coro).result()

    def pick(self, shard: int, layer: int, tried: set[str] | frozenset = frozenset()) -> Replica:
        """The live replica of `shard` ranking highest for `layer`; waits for one if none is left."""
        deadline = time.monotonic() + self.wait_s
        while True:
            live = [r for r in self.view.get(shard, []) if r.replica_id not in tried]
            if live:
                return max(live, key=lambda r: zlib.crc32(layer.to_bytes(4, "little"), r.rank_seed))
            if time.monotonic() > deadline:
                raise ExpertDispatchError(f"shard {shard}: no live replica after waiting {self.wait_s:.0f}s")
            time.sleep(0.1)
            try:
                self.refresh()
            except Exception as e:
                log.warning("could not refresh the expert replica view: %r", e)

    # --- scatter / gather -------------------------------------------------------------------------

    def requests(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
                 ) -> list[tuple[int, np.ndarray, expert_pb2.ForwardRequest]]:
        """(shard, rows, request) per message: the tokens of x bound for each shard touched.

        Index work and row gathers run in numpy, single-threaded: a torch op this small would wake
        torch's worker threads, asleep after the last gRPC wait, which on a busy CPU costs milliseconds.
        """
        ids = expert_ids.cpu().numpy()  # (T, k)
        w = weights.float().cpu().numpy()  # (T, k)
        x_raw = raw_rows(x)  # (T, dim) of same-size integers: rows of raw bytes
        shard_of = self.owner_np[layer][ids]  # (T, k)
        row_bytes = x.shape[1] * x.element_size() + ids.shape[1] * 8
        max_rows = max(1, (self.max_message_bytes - 4096) // row_bytes)
        name = WIRE_NAMES[x.dtype]
        out = []
        for s in np.unique(shard_of).tolist():
            here = shard_of == s  # (T, k)
            rows = np.flatnonzero(here.any(axis=1))  # (N,)
            sub_ids = np.where(here, ids, -1)[rows].astype(np.int32)  # (N, k)
            for i in range(0, len(rows), max_rows):
                r = rows[i : i + max_rows]
                hidden = expert_pb2.Tensor(dtype=name, shape=[len(r), x.shape[1]], data=x_raw[r].tobytes())
                out.append((s, r, expert_pb2.ForwardRequest(
                    layer=layer, hidden=hidden, expert_ids=array_to_wire(sub_ids[i : i + max_rows]),
                    weights=array_to_wire(w[r]))))
        return out

    async def _gather(self, layer: int, messages: list[tuple[int, expert_pb2.ForwardRequest]]
                      ) -> list[expert_pb2.ForwardResponse]:
        results: list[expert_pb2.ForwardResponse | None] = [None] * len(messages)
        tried: list[set[str]] = [set() for _ in messages]
        pending = list(range(len(messages)))
        while pending:
            reps = [self.pick(messages[i][0], layer, tried[i]) for i in pending]
            replies = await asyncio.gather(
                *[self._stub(rep.address).Forward(messages[i][1], timeout=self.timeout_s)
                  for i, rep in zip(pending, reps, strict=True)], return_exceptions=True)
            failed = []
            for i, rep, reply in zip(pending, reps, replies, strict=True):
                if not isinstance(reply, BaseException):
                    results[i] = reply
                    continue
                shard = messages[i][0]
                if not isinstance(reply, grpc.RpcError):
                    raise reply
                if reply.code() not in RETRIABLE:
                    raise ExpertDispatchError(f"shard {shard} replica {rep.address} refused layer "
                                              f"{layer}: {reply.code().name}: {reply.details()}") from None
                tried[i].add(rep.replica_id)
                self._drop(rep, shard, f"{reply.code().name}: {reply.details()}")
                failed.append(i)
            pending = failed
        return results

    def gather(self, layer: int, messages: list[tuple[int, expert_pb2.ForwardRequest]]
               ) -> list[expert_pb2.ForwardResponse]:
        """Send every (shard, request) at once; retry transport failures on other replicas of the shard."""
        return self._run(self._gather(layer, messages))

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        msgs = self.requests(layer, x, expert_ids, weights)
        replies = self.gather(layer, [(s, req) for s, _, req in msgs])
        outputs = [(rows, from_wire(reply.output, "output", x.dtype, ndim=2))
                   for (_, rows, _), reply in zip(msgs, replies, strict=True)]
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(x.dtype)
        if np_dtype is None:  # bfloat16: numpy has none
            out = torch.zeros_like(x)  # (T, dim)
            for rows, y in outputs:
                out.index_add_(0, torch.from_numpy(rows), y)
            return out
        out_np = np.zeros(tuple(x.shape), dtype=np_dtype)  # (T, dim), summed in x's dtype
        for rows, y in outputs:
            out_np[rows] += y.numpy()  # rows are distinct within a message
        return torch.from_numpy(out_np)

    def close(self) -> None:
        self._stop.set()
        channels, self._channels = list(self._channels.values()), {}

        async def close_all():
            for channel, _ in channels:
                await channel.close()
        if not self._loop.is_closed():
            self._run(close_all())
            self._loop.close()
        if self._helper is not None:
            self._helper.shutdown()
