"""The elastic expert plane on a real local Ray: token spreading, the load signal, and churn."""

import asyncio
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import ray
from hf_reference import build_checkpoint

from cluster.directory import DirectoryClient, get_directory
from experts.replica import SERVICE
from protos import expert_pb2
from router import LLM, SamplingParams
from router.grpc_dispatch import spread
from server.async_engine import AsyncEngine, Submission

PROMPTS = [[i + 1, 2 * i + 3, 7, 11] for i in range(12)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("elastic") / "ckpt"
    build_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def local(ckpt):
    llm = LLM(ckpt, expert_backend="local")
    yield llm
    llm.shutdown()


def info(address: str) -> expert_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Info", request_serializer=lambda b: b,
                                   response_deserializer=expert_pb2.InfoResponse.FromString)
        return call(b"", timeout=10)


def pair_tokens(entries: list[dict]) -> dict[tuple[int, int], int]:
    """Tokens each (layer, expert) ran, summed over the replicas' own counters."""
    out: dict[tuple[int, int], int] = {}
    for e in entries:
        for p in info(e["address"]).load:
            out[(p.layer, p.expert)] = out.get((p.layer, p.expert), 0) + p.tokens
    return out


def wait_for(cond, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- the spreading rule alone ----------------------------------------------------------------------


def test_spread_bounds_loads_and_keeps_sequences_in_place():
    keys = np.arange(1000, 1064, dtype=np.int64)
    seeds3 = np.array([11, 22, 33], dtype=np.int64)
    three = spread(keys, seeds3, np.ones(3))
    counts = np.bincount(three, minlength=3)
    assert counts.max() <= np.ceil(1.25 * 64 / 3) and counts.min() > 0
    assert np.array_equal(three, spread(keys, seeds3, np.ones(3)))  # every router decides alike
    four = spread(keys, np.array([11, 22, 33, 44], dtype=np.int64), np.ones(4))
    moved = (four != three).mean()
    assert 0.1 < moved < 0.45  # about a quarter moves to the new replica, the rest stays put
    assert np.bincount(four, minlength=4).min() > 0
    rows = np.repeat(keys[:8], 5)  # a prompt chunk's rows travel together
    where = spread(rows, seeds3, np.ones(3))
    assert all(len(set(where[rows == k])) == 1 for k in keys[:8])
    busy = spread(keys, seeds3, np.array([0.1, 1.0, 1.0]))  # a loaded replica gets less
    assert np.bincount(busy, minlength=3)[0] <= np.ceil(1.25 * 64 * 0.1 / 2.1)


# --- a plane of 2 shards x 3 replicas --------------------------------------------------------------


@pytest.fixture(scope="module")
def three(ray_session, ckpt):
    llm = LLM(ckpt, expert_backend="ray", num_shards=2, replicas_per_shard=3, expert_num_cpus=0.1)
    yield llm
    llm.shutdown()


def test_every_replica_takes_tokens_and_outputs_do_not_change(three, local):
    backend = three.experts.backend
    entries = DirectoryClient(three.experts.app_name).replicas()
    assert len(entries) == 6
    before, routed_before = pair_tokens(entries), three.engine.expert_tokens.clone()
    outs = three.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY)]
    # The replicas' own counters add up to what the router's gate chose, pair by pair.
    after, routed = pair_tokens(entries), three.engine.expert_tokens - routed_before
    ran = {p: after[p] - before.get(p, 0) for p in after}
    assert ran == {(l, e): int(routed[l, e]) for l in range(routed.shape[0]) for e in range(routed.shape[1])}
    # Each shard's rows spread over all three of its replicas.
    for shard in (0, 1):
        sent = [backend.rows_sent.get(e["replica_id"], 0) for e in entries if e["shard"] == shard]
        assert len(sent) == 3 and min(sent) > 0 and max(sent) <= 3 * min(sent)
    load = info(entries[0]["address"])
    assert load.busy > 0 and any(p.tokens_per_s > 0 for p in load.load)


def test_directory_death_mid_generate_loses_nothing(three, local):
    app = three.experts.app_name
    killed = []

    class KillDirectory:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def forward(self, layer, x, expert_ids, weights, keys=None):
            self.calls += 1
            if self.calls == 10:
                ray.kill(get_directory(), no_restart=True)  # gone for good, not restarted by Ray
                killed.append(time.monotonic())
            return self.inner.forward(layer, x, expert_ids, weights, keys)

    engine = three.engine
    engine.experts = KillDirectory(three.experts)
    try:
        outs = three.generate(PROMPTS, GREEDY)
    finally:
        engine.experts = three.experts
    assert killed
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY)]
    # A new directory refills from the replicas' health checks; the router's view follows it.
    wait_for(lambda: len(DirectoryClient(app).replicas()) == 6, what="replicas to re-register")
    backend = three.experts.backend
    wait_for(lambda: sum(len(v) for v in backend.view.values()) == 6, what="the router's view")


# --- a plane with one replica per shard ------------------------------------------------------------


def test_stopping_the_only_replica_of_a_shard_costs_time_not_requests(ray_session, ckpt, local):
    llm = LLM(ckpt, expert_backend="ray", num_shards=2, replicas_per_shard=1, expert_num_cpus=0.1,
              call_timeout_s=1.0)
    runner = AsyncEngine(llm.engine)
    try:
        want = [o.outputs[0].token_ids for o in local.generate(PROMPTS, SamplingParams(
            temperature=0.0, max_tokens=48, ignore_eos=True))]
        victim = next(e for e in DirectoryClient(llm.experts.app_name).replicas() if e["shard"] == 0)
        stopped = threading.Event()
        seen_degraded = []

        async def run() -> tuple[list, float]:
            params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
            streams = [await runner.submit([Submission(p, params)], stream=False) for p in PROMPTS[:6]]
            while not stopped.is_set():
                await asyncio.sleep(0.01)
            while runner.degraded is None:  # the next call meets the stopped replica
                await asyncio.sleep(0.05)
            seen_degraded.append(runner.degraded)
            t = time.monotonic()  # a request submitted now is accepted at once: the engine is not asleep
            streams += [await runner.submit([Submission(p, params)], stream=False) for p in PROMPTS[6:]]
            accept_s = time.monotonic() - t
            out = []
            for s in streams:
                async with s:
                    while not s.done:
                        out += await s.next_batch()
            return out, accept_s

        def stop_and_resume():
            time.sleep(0.5)
            os.kill(victim["pid"], signal.SIGSTOP)
            stopped.set()
            time.sleep(4.0)  # four call deadlines
            os.kill(victim["pid"], signal.SIGCONT)

        t = threading.Thread(target=stop_and_resume)
        t.start()
        updates, accept_s = asyncio.run(asyncio.wait_for(run(), 120))
        t.join()
        assert seen_degraded and "shard 0" in seen_degraded[0]
        assert accept_s < 2.0
        assert [u.finish_reason for u in updates] == ["length"] * len(PROMPTS)
        got = {}
        for u in updates:
            got.setdefault(u.index, []).extend(u.token_ids)
        assert len(updates) == len(PROMPTS) and all(u.error is None for u in updates)
        assert sorted(tuple(u.token_ids) for u in updates) == sorted(tuple(w) for w in want)
        assert runner.degraded is None
    finally:
        runner.close()
        llm.shutdown()
