"""Replica-side coalescing: concurrent Forward calls of a layer run as one batch, off the gRPC event loop.

The gRPC tests run a real ExpertServicer behind its own grpc.aio server on loopback (no Ray); the
Coalescer tests drive it on a real event loop and worker thread with plain functions as the math.
"""

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from experts.coalesce import Coalescer
from experts.ffn import ExpertSet
from experts.pace import UNPACED, Pace
from experts.replica import SERVICE, ExpertServicer, GrpcServer
from experts.wire import from_wire, to_wire
from protos import expert_pb2

MAX_MESSAGE = 16 << 20
N_EXPERTS = 4


def expert_set(dim: int, hidden: int, layers: int = 2, seed: int = 0) -> ExpertSet:
    g = torch.Generator().manual_seed(seed)
    return ExpertSet({l: (list(range(N_EXPERTS)), list(torch.randn(N_EXPERTS, 2 * hidden, dim, generator=g) * 0.05),
                          list(torch.randn(N_EXPERTS, dim, hidden, generator=g) * 0.05)) for l in range(layers)},
                     N_EXPERTS)


def tokens(n: int, dim: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, dim), ids (n, k) int32, weights (n, k): a router's top-k of random gate logits."""
    g = torch.Generator().manual_seed(seed)
    top = torch.randn(n, N_EXPERTS, generator=g).topk(k)
    return torch.randn(n, dim, generator=g), top.indices.int(), torch.softmax(top.values, -1)


def request(layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> bytes:
    return expert_pb2.ForwardRequest(layer=layer, hidden=to_wire(x), expert_ids=to_wire(ids),
                                     weights=to_wire(w)).SerializeToString()


class Replica:
    """An ExpertServicer on its own grpc.aio server (loopback), as an ExpertShard runs it."""

    def __init__(self, experts: ExpertSet, dim: int, layers: int = 2, pace: Pace = UNPACED):
        self.experts = experts
        self.servicer = ExpertServicer(experts, dim, layers, N_EXPERTS, torch.float32,
                                       expert_pb2.InfoResponse(shard=0), torch.device("cpu"), pace)
        self.server = GrpcServer(self.servicer, "127.0.0.1", MAX_MESSAGE)
        self.channel = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.forward = self.channel.unary_unary(f"/{SERVICE}/Forward", request_serializer=lambda b: b,
                                                response_deserializer=expert_pb2.ForwardResponse.FromString)
        self.info = self.channel.unary_unary(f"/{SERVICE}/Info", request_serializer=lambda b: b,
                                             response_deserializer=expert_pb2.InfoResponse.FromString)

    def concurrently(self, requests: list[bytes]) -> list:
        """All requests in flight at once over one channel; each call's reply, or its RpcError."""
        futures = [self.forward.future(r, timeout=60) for r in requests]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except grpc.RpcError as e:
                out.append(e)
        return out

    def close(self) -> None:
        self.channel.close()
        self.server.stop()
        self.servicer.close()


@pytest.fixture
def replica() -> Iterator[Replica]:
    # Calls of 256 tokens through 4096-wide experts: tens of ms of math each, so the calls of one burst all
    # arrive while the first computes.
    r = Replica(expert_set(64, 2048), 64)
    yield r
    r.close()


def output(reply: expert_pb2.ForwardResponse) -> torch.Tensor:
    return from_wire(reply.output, "output", torch.float32, ndim=2)


def assert_solo(replica: Replica, layer: int, call: tuple, reply) -> None:
    """The reply is what the call's tokens give alone. Not bit for bit: the matmul kernel (MKL's sgemm, or
    oneDNN's on packed weights) sums a row's products in an order that depends on how many rows the matmul has,
    so a row merged with others may round differently; the tolerance is a few float32 ulps of the output."""
    assert not isinstance(reply, grpc.RpcError), reply
    torch.testing.assert_close(output(reply), replica.experts.forward(layer, *call), rtol=1e-5, atol=1e-6)


def test_concurrent_calls_merge_into_fewer_batches_and_each_gets_its_own_rows(replica):
    calls = [tokens(256, 64, 1 + i % 2, seed=i) for i in range(8)]  # k 1 and 2 mixed: merged calls are padded
    replies = replica.concurrently([request(1, *c) for c in calls])
    stats = replica.servicer.coalescer.stats
    assert stats.calls == 8
    assert stats.batches < 8 and stats.max_calls >= 2
    for c, r in zip(calls, replies, strict=True):
        assert_solo(replica, 1, c, r)
    info = replica.info(b"", timeout=10)
    assert (info.calls, info.math_batches) == (8, stats.batches)
    assert info.calls_per_batch == pytest.approx(8 / stats.batches)
    # The load meter counts each batch's math once: the tokens of every call, one busy interval per batch.
    assert sum(p.tokens for p in info.load if p.layer == 1) == sum(c[1].numel() for c in calls)


def test_a_lone_caller_is_never_held_by_a_window(replica):
    # A burst first, so that layer 0's recent arrival gaps are short: the window still stays shut for a call
    # that is alone.
    replica.concurrently([request(0, *tokens(256, 64, 2, seed=i)) for i in range(4)])
    before = replica.servicer.coalescer.stats
    before = (before.calls, before.batches, before.windows, before.window_s)
    for i in range(20):
        call = tokens(4, 64, 2, seed=100 + i)
        assert_solo(replica, 0, call, replica.forward(request(0, *call), timeout=10))
    s = replica.servicer.coalescer.stats
    assert (s.calls - before[0], s.batches - before[1]) == (20, 20)  # every call its own batch
    assert (s.windows, s.window_s) == before[2:]  # and none waited for company


def test_health_and_info_answer_while_a_long_forward_computes():
    # 1024 tokens of dim 256 (a call the replica used to run on its event loop, being small on the wire)
    # through 8192-wide experts: ~13 GFLOP, far longer than a health check takes.
    r = Replica(expert_set(256, 4096, layers=1), 256, layers=1)
    try:
        call = tokens(1024, 256, 2, seed=7)
        sent = time.monotonic()
        pending = r.forward.future(request(0, *call), timeout=120)
        while not r.servicer.inflight and time.monotonic() < sent + 30:
            time.sleep(0.001)
        assert r.servicer.inflight == 1
        with grpc.insecure_channel(r.server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=30).status
        info = r.info(b"", timeout=30)
        answered = time.monotonic() - sent
        # Two more calls wait behind the long one; Info counts them as queued, and they run as one batch.
        small = [tokens(8, 256, 2, seed=s) for s in (1, 2)]
        waiting = [r.forward.future(request(0, *c), timeout=120) for c in small]
        queued = 0
        while queued < 2 and not pending.done():
            queued = r.info(b"", timeout=30).queued
        reply = pending.result()
        math_s = reply.compute_ns / 1e9
        assert status == health_pb2.HealthCheckResponse.SERVING
        # Both answered before the math could have ended: the event loop did not wait for it.
        assert answered < math_s / 2, f"health and Info took {answered:.3f}s of a {math_s:.3f}s Forward"
        assert info.calls == 0  # Info's figures: no batch had finished yet
        assert queued == 2
        assert_solo(r, 0, call, reply)
        for c, f in zip(small, waiting, strict=True):
            assert_solo(r, 0, c, f.result())
        after = r.info(b"", timeout=30)
        assert (after.calls, after.math_batches, after.queued) == (3, 2, 0)
        assert after.busy > 0
    finally:
        r.close()


def test_a_bad_call_among_merged_good_ones_fails_alone(replica):
    good = [tokens(256, 64, 2, seed=i) for i in range(6)]
    x, ids, w = tokens(4, 64, 2, seed=99)
    bad = {2: request(7, x, ids, w),  # not a layer of this model
           4: request(1, x[:, :63], ids, w),  # hidden size 63
           6: request(1, x, ids[:3], w[:3])}  # 3 rows of ids for 4 tokens
    requests = [request(1, *c) for c in good]
    for at, raw in sorted(bad.items()):
        requests.insert(at, raw)
    replies = replica.concurrently(requests)
    for at in bad:
        e = replies[at]
        assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    ok = [r for i, r in enumerate(replies) if i not in bad]
    for c, r in zip(good, ok, strict=True):
        assert_solo(replica, 1, c, r)
    stats = replica.servicer.coalescer.stats
    assert stats.calls == len(good)  # the bad calls never joined a batch
    assert stats.batches < len(good)


# --- the Coalescer on its own ----------------------------------------------------------------------------


class GatedMath:
    """The math: each payload's (key, payload); the first batch waits for `release`, so later calls queue."""

    def __init__(self, fail_on: object = None):
        self.release, self.started = threading.Event(), threading.Event()
        self.batches: list[tuple[object, list]] = []
        self.fail_on = fail_on

    def __call__(self, key, payloads: list) -> list:
        self.started.set()
        self.release.wait(10)
        self.batches.append((key, list(payloads)))
        if self.fail_on in payloads:
            raise ValueError(f"bad payload {self.fail_on}")
        return [(key, p) for p in payloads]


async def first_call_running(c: Coalescer, math: GatedMath, key, payload) -> asyncio.Task:
    task = asyncio.create_task(c.submit(key, payload))
    await asyncio.get_running_loop().run_in_executor(None, math.started.wait, 10)
    return task


def test_calls_queued_behind_the_worker_merge_per_layer_in_order():
    async def main():
        math = GatedMath()
        c = Coalescer(math)
        first = await first_call_running(c, math, 0, "a")
        later = [asyncio.create_task(c.submit(k, p)) for k, p in [(0, "b"), (1, "x"), (0, "c"), (1, "y"),
                                                                  (0, "d")]]
        await asyncio.sleep(0.05)
        assert c.waiting == 5
        math.release.set()
        results = await asyncio.gather(first, *later)
        c.close()
        return math.batches, results, c

    batches, results, c = asyncio.run(main())
    # The lone first call ran at once; then layer 0's three (queued first), then layer 1's two: never mixed.
    assert batches == [(0, ["a"]), (0, ["b", "c", "d"]), (1, ["x", "y"])]
    assert results == [(0, "a"), (0, "b"), (1, "x"), (0, "c"), (1, "y"), (0, "d")]
    assert (c.stats.calls, c.stats.batches, c.stats.max_calls, c.waiting) == (6, 3, 3, 0)


def test_a_failing_batch_is_rerun_call_by_call():
    async def main():
        math = GatedMath(fail_on="bad")
        c = Coalescer(math)
        first = await first_call_running(c, math, 0, "a")
        later = [asyncio.create_task(c.submit(0, p)) for p in ("b", "bad", "c")]
        await asyncio.sleep(0.05)
        math.release.set()
        results = await asyncio.gather(first, *later, return_exceptions=True)
        c.close()
        return math.batches, results

    batches, results = asyncio.run(main())
    assert batches == [(0, ["a"]), (0, ["b", "bad", "c"]), (0, ["b"]), (0, ["bad"]), (0, ["c"])]
    assert results[:2] == [(0, "a"), (0, "b")] and results[3] == (0, "c")
    assert isinstance(results[2], ValueError) and "bad payload bad" in str(results[2])


def test_a_window_holds_a_batch_while_its_layer_keeps_arriving_and_no_longer_than_the_cap():
    cap = 0.1  # wide, so that a slow machine's sleeps still count as dense arrivals

    async def main():
        math = GatedMath()
        c = Coalescer(math, cap_s=cap)
        first = await first_call_running(c, math, 0, 0)
        stream = []
        for i in range(1, 4):  # queued behind the busy worker, 5 ms apart
            stream.append(asyncio.create_task(c.submit(0, i)))
            await asyncio.sleep(0.005)
        math.release.set()
        released = time.monotonic()
        for i in range(4, 40):  # the layer keeps arriving after the worker frees
            stream.append(asyncio.create_task(c.submit(0, i)))
            await asyncio.sleep(0.005)
        await asyncio.gather(first, *stream)
        c.close()
        return math.batches, c.stats, released

    batches, stats, released = asyncio.run(main())
    second = batches[1][1]
    assert second[:3] == [1, 2, 3] and len(second) > 3  # held open, it took calls that came after the release
    assert stats.windows >= 1
    assert stats.window_s <= stats.windows * (cap + 0.05)  # held at most the cap (plus timer slack) each time
    assert stats.batches < stats.calls == 40


def test_the_math_runs_on_one_worker_thread_not_the_loop():
    async def main():
        loop_thread = threading.get_ident()
        c = Coalescer(lambda key, ps: [threading.get_ident() for _ in ps])
        threads = await asyncio.gather(*[c.submit(0, i) for i in range(5)])
        c.close()
        return loop_thread, set(threads)

    loop_thread, threads = asyncio.run(main())
    assert len(threads) == 1 and loop_thread not in threads


def test_a_caller_that_gives_up_while_queued_is_dropped_from_its_batch():
    async def main():
        math = GatedMath()
        c = Coalescer(math)
        first = await first_call_running(c, math, 0, "a")
        keep, gone = asyncio.create_task(c.submit(0, "b")), asyncio.create_task(c.submit(0, "gone"))
        await asyncio.sleep(0.01)
        gone.cancel()
        math.release.set()
        results = await asyncio.gather(first, keep)
        with pytest.raises(asyncio.CancelledError):
            await gone
        c.close()
        return math.batches, results, c.waiting

    batches, results, waiting = asyncio.run(main())
    assert batches == [(0, ["a"]), (0, ["b"])] and results == [(0, "a"), (0, "b")] and waiting == 0



def test_a_paced_replica_is_busy_for_its_modelled_time_and_its_load_meter_sees_it():
    """Paced (a device of its own in an experiment), a run of math lasts at least per expert touched plus per row,
    and that is what the replica reports as busy: Serve's autoscaler and the routers see a device's load."""
    pace = Pace(per_expert_s=0.05, per_row_s=0.01)
    r = Replica(expert_set(16, 32), 16, pace=pace)
    try:
        x, _, w = tokens(6, 16, 2, seed=1)
        ids = torch.tensor([[0, 1], [1, 0], [0, -1], [1, -1], [0, 1], [-1, 0]], dtype=torch.int32)  # 9 rows, 2 experts
        modelled = pace.seconds([5, 4])
        assert modelled == pytest.approx(2 * 0.05 + 9 * 0.01)
        reply = r.forward(request(0, x, ids, w), timeout=60)
        assert reply.compute_ns >= modelled * 1e9
        assert_solo(r, 0, (x, ids, w), reply)  # pacing changes when, never what
        assert sum(b.busy for b in r.servicer.load.buckets) >= modelled  # busy seconds, as reported to Serve
    finally:
        r.close()


def test_pace_rejects_negative_times():
    with pytest.raises(ValueError, match=">= 0"):
        Pace(per_row_s=-1e-3)
