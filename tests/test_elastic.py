"""The elastic expert plane on a real local Ray: token spreading, the load signal, and churn."""

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest
import ray
import torch
from hf_reference import build_checkpoint

from checkpoint.reader import Checkpoint
from cluster.directory import DirectoryClient, get_directory
from cluster.plane_token import TOKEN_ENV, app_token
from cluster.status import replica_info
from protos import expert_pb2
from router import LLM, SamplingParams
from router.dispatch import ExpertBackend
from router.grpc_dispatch import around, copy_of, spread
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


def info(entry: dict) -> expert_pb2.InfoResponse:
    reply = replica_info(entry, app_token(entry["app"]))
    assert reply is not None, f"replica {entry['address']} does not answer Info"
    return reply


def pair_tokens(entries: list[dict]) -> dict[tuple[int, int], int]:
    """Tokens each (layer, expert) ran, summed over the replicas' own counters."""
    out: dict[tuple[int, int], int] = {}
    for e in entries:
        for p in info(e).load:
            out[(p.layer, p.expert)] = out.get((p.layer, p.expert), 0) + p.tokens
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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


def test_copies_of_a_pair_split_each_call_within_one_and_share_evenly_over_small_calls():
    n_holders = np.array([1, 2, 3, 1])  # (E,) expert 1 has two copies, expert 2 three
    rng = np.random.default_rng(0)
    ids = np.stack([np.full(7, 1), np.full(7, 2)], 1)  # (T, k): 7 tokens of experts 1 and 2
    pick = copy_of(0, ids, rng.integers(0, 1 << 40, 7), n_holders)
    assert sorted(np.bincount(pick[:, 0], minlength=2)) == [3, 4]
    assert sorted(np.bincount(pick[:, 1], minlength=3)) == [2, 2, 3]
    assert (copy_of(0, np.array([[0, 3]]), np.array([5]), n_holders) == 0).all()  # one copy: always it
    # Calls of one or two tokens, as decode steps carry of a cold pair: every copy gets its share, not the first.
    counts = np.zeros(3)
    for _ in range(3000):
        t = int(rng.integers(1, 3))
        pick = copy_of(1, np.full((t, 1), 2), rng.integers(0, 1 << 40, t), n_holders)
        counts += np.bincount(pick.ravel(), minlength=3)
    assert np.abs(counts / counts.sum() - 1 / 3).max() < 0.03


def test_copies_of_unlike_weight_split_each_call_in_proportion_and_alike_ones_as_before():
    n_holders = np.array([1, 2, 3])  # (E,)
    share = np.array([[1.0, 0, 0], [1.0, 0.5, 0], [2.0, 1.0, 1.0]])  # (E, H): a copy's shard down to half its replicas
    rng = np.random.default_rng(1)
    for t in (1, 2, 7, 60):
        ids = np.stack([np.full(t, 1), np.full(t, 2)], 1)  # (T, k)
        keys = rng.integers(0, 1 << 40, t)
        pick = copy_of(0, ids, keys, n_holders, share)
        for col, w in ((0, share[1, :2]), (1, share[2])):  # within one of each copy's part, in every call
            got, want = np.bincount(pick[:, col], minlength=len(w)), t * w / w.sum()
            assert (np.abs(got - want) < 1).all(), (t, col, got, want)
        assert (copy_of(0, ids, keys, n_holders, np.ones((3, 3))) == copy_of(0, ids, keys, n_holders)).all()
    # Calls of one token, as decode steps carry of a cold pair: each copy still gets its share on average.
    counts = np.zeros(3)
    for _ in range(3000):
        counts += np.bincount(copy_of(1, np.full((1, 1), 2), rng.integers(0, 1 << 40, 1), n_holders, share).ravel(),
                              minlength=3)
    assert np.abs(counts / counts.sum() - [0.5, 0.25, 0.25]).max() < 0.03


def test_a_shard_that_is_down_loses_its_pairs_to_their_other_holders():
    holders = np.array([[2, 5], [5, -1], [0, 1]])  # (E, H) one layer: the docstring's example plus a bystander
    n = np.array([2, 1, 2])
    h, c = around(holders, n, {5})
    assert h.tolist() == [[2, -1], [5, -1], [0, 1]] and c.tolist() == [1, 1, 2]
    assert holders.tolist() == [[2, 5], [5, -1], [0, 1]]  # the routing's own table is left alone
    h, c = around(holders, n, {0, 1})  # expert 2 has no holder up: it keeps both (its call fails, is retried)
    assert h.tolist() == holders.tolist() and c.tolist() == n.tolist()


def test_a_pair_whose_holders_are_all_down_goes_to_its_standby_holders_that_are_up():
    holders = np.array([[2, 5], [5, -1], [5, -1], [4, -1]])  # (E, H): the docstring's example plus a bystander
    n = np.array([2, 1, 1, 1])
    standby = np.array([[-1, -1], [-1, -1], [3, 6], [5, -1]])  # (E, S): expert 2 on standby on shards 3 and 6
    h, c = around(holders, n, {5, 6}, standby)
    assert h.tolist() == [[2, -1], [5, -1], [3, -1], [4, -1]] and c.tolist() == [1, 1, 1, 1]
    h, c = around(holders, n, {4}, standby)  # expert 3's standby is up: routed there
    assert h[3].tolist() == [5, -1] and c[3] == 1 and h[:3].tolist() == holders[:3].tolist()
    h, c = around(np.array([[5]]), np.array([1]), {5}, np.array([[1, 2]]))  # wider standby than holders
    assert h.tolist() == [[1, 2]] and c.tolist() == [2]
    h, c = around(holders, n, {2}, standby)  # a holder up for every pair: the standby stays out of it
    assert h[0].tolist() == [5, -1] and h[2].tolist() == [5, -1]


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
        # Bounded loads cap a replica at 1.25x its share of each call's rows (rounded up per call); with a dozen
        # sequences, hashing alone decides how little the last replica gets.
        assert len(sent) == 3 and min(sent) > 0 and max(sent) <= 0.5 * sum(sent)
    load = info(entries[0])
    assert load.busy > 0 and any(p.tokens_per_s > 0 for p in load.load)


def test_directory_death_mid_generate_loses_nothing(three, local):
    app = three.experts.app_name
    killed = []

    class KillDirectory(ExpertBackend):
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
            await asyncio.sleep(0.3)  # the engine is now (or soon) waiting on the stopped replica
            t = time.monotonic()  # a request submitted now is accepted at once: the engine is not asleep
            streams += [await runner.submit([Submission(p, params)], stream=False) for p in PROMPTS[6:]]
            accept_s = time.monotonic() - t
            while runner.degraded is None:  # the step meets the stopped replica
                await asyncio.sleep(0.05)
            seen_degraded.append(runner.degraded)
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
        assert accept_s < 3.0  # at most a call deadline and a backoff, not the outage
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


# --- autoscaling and lightweight updates, deployed as `raymoe serve` and KubeRay deploy ----------


def running(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def replica_ids(app: str, deployment: str) -> set[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][app]["deployments"][deployment]
    return {r["replica_id"] for r in details["replicas"] if r["state"] == "RUNNING"}


def test_a_hot_shard_scales_up_then_down_without_failures(ray_session, ckpt):
    import torch

    from cli.main import parse_settings
    from cluster.autoscaling import decisions
    from cluster.deploy import deploy
    from cluster.expert_plane import connect_experts
    from cluster.ray_init import remove_apps
    from cluster.serve_config import serve_config
    from cluster.status import plane_status

    app = "raymoe-autoscale"
    cfg = serve_config(*parse_settings([
        "--model", str(ckpt), "--num-shards", "2", "--replicas-per-shard", "1", "--max-replicas-per-shard", "3",
        "--target-busy", "0.02", "--upscale-delay-s", "0.5", "--downscale-delay-s", "3", "--expert-num-cpus", "0.1",
        "--router-num-cpus", "0.1", "--rebalance-interval-s", "3600", "--min-copies", "2"]))
    cfg["applications"][0].update(name=app, route_prefix="/autoscale")
    deploy(cfg)
    backend = connect_experts(Checkpoint(ckpt), torch.float32, app)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 64, generator=g)
        hot = torch.zeros(512, 2, dtype=torch.long)
        hot[:, 1] = 2  # experts 0 and 2: both on shard 0
        w = torch.full((512, 2), 0.5)
        keys = np.arange(512, dtype=np.int64)
        calls = 0

        def load_until(cond, timeout_s):
            nonlocal calls
            deadline = time.monotonic() + timeout_s
            while not cond():
                assert time.monotonic() < deadline, f"timed out: replicas report busy {backend.busy}"
                for _ in range(10):
                    for layer in (0, 1):
                        backend.forward(layer, x, hot, w, keys)  # raises on any failed call
                        calls += 1

        load_until(lambda: running(app, "ExpertShard-0") >= 2, 60)
        assert running(app, "ExpertShard-1") == 1  # the idle shard did not grow
        load_until(lambda: len({r.replica_id for r in backend.view.get(0, [])}) >= 2, 30)
        # Shard 0's new replica changed its count: the plane re-placed on the routed load at once (its interval is
        # an hour), every pair on both shards (min_copies 2 of 4 experts on 2 shards).
        load_until(lambda: backend.routing.version >= 1, 30)
        pairs = [(l, e) for l in range(2) for e in range(4)]
        assert [sorted(map(tuple, sh["pairs"])) for sh in plane_status(app)["shards"]] == [pairs, pairs]
        # The placement records the replicas it was planned for. A replica of shard 0 that this router stops
        # trusting (as after a failure) takes shard 0's share of the pairs both shards hold down in proportion, in
        # the next call, before any re-placement.
        planned = backend.routing.planned
        assert planned is not None and planned[0] >= 2 and planned[1] == 1

        def shard0_share() -> float:
            msgs = backend.requests(0, x[:400], hot[:400], w[:400], keys[:400])
            slots = Counter()
            for shard, _, _, req in msgs:
                slots[shard] += int((np.frombuffer(req.expert_ids.data, dtype=np.int32) >= 0).sum())
            return slots[0] / (slots[0] + slots[1])

        def expected() -> float:
            w0, w1 = (len(backend.live(s)) / planned[s] for s in (0, 1))
            return w0 / (w0 + w1)
        before = expected()
        assert abs(shard0_share() - before) < 0.02
        distrusted = backend.live(0)[0].replica_id
        backend.suspect[distrusted] = time.monotonic() + 60
        try:
            assert expected() < before - 0.05 and abs(shard0_share() - expected()) < 0.02
        finally:
            del backend.suspect[distrusted]
        # Shard 1's replicas all die (the autoscaler may have grown it once the re-placement gave it load): its
        # pairs' other holder, shard 0, runs them; no call fails.
        ids = torch.tensor([[0, 1], [2, 3], [1, 3], [3, 0]])
        want = backend.forward(1, x[:4], ids, w[:4])
        for entry in [e for e in DirectoryClient(app).replicas() if e["shard"] == 1]:
            ray.kill(ray.get_actor(entry["actor_name"], namespace="serve"), no_restart=True)  # Serve starts another
            wait_for(lambda e=entry: not pid_alive(e["pid"]), what="the killed replica's process to exit")
        zeros = [r.replica_id for r in backend.view[0]]
        before = sum(backend.slots_sent.get(r, 0) for r in zeros)
        assert torch.allclose(backend.forward(1, x[:4], ids, w[:4]), want, atol=1e-6)
        assert sum(backend.slots_sent.get(r, 0) for r in zeros) - before == ids.numel()  # shard 0 ran every slot
        # With the load gone, the shard drains back to its minimum; calls meanwhile keep succeeding.
        deadline = time.monotonic() + 60
        while running(app, "ExpertShard-0") > 1:
            assert time.monotonic() < deadline, "did not scale down"
            backend.forward(1, x[:8], hot[:8], w[:8], keys[:8])
            time.sleep(0.2)
        assert any(d["kind"] == "autoscale" and "ExpertShard-0" in d["detail"] for d in decisions(app))
        assert calls > 0
    finally:
        backend.close()
        remove_apps([app], False, False)


def test_routers_critical_path_reaches_the_policy_through_the_directory(ray_session):
    """Routers' reports go through the real directory into the GCS key-value store, where the policy (as Serve's
    controller runs it) reads them: while requests wait, the shard most layers wait for grows and none shrinks,
    however idle the replicas look; without the report, busy alone shrinks them all."""
    from test_autoscaling_policy import by_name, contexts, ctx

    from cluster.autoscaling import ExpertPlanePolicy, router_load

    app = "raymoe-critical"
    directory = DirectoryClient(app)
    try:
        for _ in range(3):  # three routers' reports within the window: seconds of layer waits per shard
            directory.report_load([[1, 1]], [3.0, 1.4, 0.1], 0)
        directory.report_load([[1, 1]], [0.0, 0.0, 0.0], 4)  # one router has requests waiting
        wait_for(lambda: (router_load(app) or {}).get("waiting") == 4, what="the directory's summary")
        load = router_load(app)
        assert load["critical_s"] == pytest.approx([9.0, 4.2, 0.3]) and load["window_s"] == 5.0
        shards = [ctx(f"ExpertShard-{i}", 2, busy=[0.1, 0.1], app=app) for i in range(3)]
        decided, state = ExpertPlanePolicy(target_busy=0.6)(contexts(*shards))
        assert by_name(decided) == {"ExpertShard-0": 4, "ExpertShard-1": 2, "ExpertShard-2": 2}
        assert [s["critical"] for s in state.values()] == pytest.approx([9 / 13.5, 4.2 / 13.5, 0.3 / 13.5])
        directory.remove_app()
        assert router_load(app) is None
        decided, _ = ExpertPlanePolicy(target_busy=0.6)(contexts(*shards))
        assert by_name(decided) == {f"ExpertShard-{i}": 1 for i in range(3)}  # busy alone: all idle
    finally:
        directory.remove_app()


def test_scaling_one_shard_by_config_keeps_the_router_and_its_stream(ray_session, ckpt, monkeypatch):
    """Deployed as `raymoe serve` deploys, with no data-plane token given: the app gets a new one, which its
    Router and replicas share, scaling keeps, and a driver finds in its config (plane_status asks replicas)."""
    import openai

    from cli.main import parse_settings
    from cluster.deploy import deploy, deployed_configs, http_port, scale_shard
    from cluster.ray_init import remove_apps
    from cluster.serve_config import serve_config
    from cluster.status import format_status, plane_status

    app = "raymoe-scale"
    cfg = serve_config(*parse_settings([
        "--model", str(ckpt), "--num-shards", "2", "--expert-num-cpus", "0.1", "--router-num-cpus", "0.1",
        "--served-model-name", "tiny", "--stream-chunks-per-s", "50"]))
    cfg["applications"][0].update(name=app, route_prefix="/scale")
    monkeypatch.delenv(TOKEN_ENV)
    deploy(cfg)
    try:
        token = deployed_configs()[app]["runtime_env"]["env_vars"][TOKEN_ENV]
        assert len(token) >= 32 and app_token(app) == token
        routers = replica_ids(app, "Router")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port()}/scale/v1", api_key="x", max_retries=0,
                               timeout=120)
        for replicas in (2, 1):  # up, then down: the removed replica drains while the stream goes on
            stream = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=400, temperature=0.0,
                                               stream=True, extra_body={"ignore_eos": True},
                                               stream_options={"include_usage": True})
            done = threading.Event()
            errors = []

            def rescale(n=replicas, done=done, errors=errors):
                try:
                    scale_shard(app, 1, n)
                except Exception as e:  # reported by the assertion below
                    errors.append(e)
                done.set()

            chunks, usage, finish = 0, None, None
            for chunk in stream:
                chunks += 1
                if chunks == 3:
                    threading.Thread(target=rescale).start()
                if chunk.usage:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            assert done.wait(120) and not errors
            assert finish == "length" and usage.completion_tokens == 400
            wait_for(lambda n=replicas: running(app, "ExpertShard-1") == n, what=f"{replicas} replicas")
            assert replica_ids(app, "Router") == routers  # the Router was never replaced
            assert deployed_configs()[app]["runtime_env"]["env_vars"][TOKEN_ENV] == token
        s = plane_status(app)
        assert [sh["shard"] for sh in s["shards"]] == [0, 1]
        assert {r["state"] for sh in s["shards"] for r in sh["replicas"]} == {"serving"}
        assert [len(sh["replicas"]) for sh in s["shards"]] == [1, 1]
        assert sum(sum(r["tokens"].values()) for sh in s["shards"] for r in sh["replicas"]) > 0
        assert [d["detail"] for d in s["decisions"] if d["kind"] == "scale"] == [
            "ExpertShard-1: 2 replicas (by hand)", "ExpertShard-1: 1 replicas (by hand)"]
        assert f"expert plane '{app}'" in format_status(s)
        with pytest.raises(ValueError, match="has no ExpertShard-7"):
            scale_shard(app, 7, 2)
        with pytest.raises(ValueError, match="no application 'nope' deployed from a config"):
            scale_shard("nope", 0, 2)
    finally:
        remove_apps([app], False, False)


def test_a_pair_held_by_two_shards_shares_its_tokens(ray_session, ckpt, local):
    pairs = [(l, e) for l in range(2) for e in range(4)]
    first = [p for p in pairs if p[1] in (0, 1)]
    second = [p for p in pairs if p[1] in (2, 3)] + [(1, 0), (1, 1)]  # redundant copies of layer 1's experts 0, 1
    llm = LLM(ckpt, expert_backend="ray", placement=[first, second], expert_num_cpus=0.1)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in local.generate(PROMPTS,
                                                                                                         GREEDY)]
        by_shard = {e["shard"]: {(p.layer, p.expert): p.tokens for p in info(e).load}
                    for e in DirectoryClient(llm.experts.app_name).replicas()}
        for pair in [(1, 0), (1, 1)]:
            assert by_shard[0][pair] > 0 and by_shard[1][pair] > 0  # both copies took tokens
        routed = llm.engine.expert_tokens
        assert by_shard[0][(1, 0)] + by_shard[1][(1, 0)] == int(routed[1, 0])
    finally:
        llm.shutdown()


# --- hot-expert re-placement -----------------------------------------------------------------------


def test_rebalance_switches_placement_live_and_outputs_do_not_change(ray_session, ckpt, local):
    """A rebalance started mid-generate: decode goes on through it, tokens equal the local run's, every
    replica ends up holding exactly its shard's pairs of the new placement, and a router that missed the
    switch (it never refreshes its view) finds the new placement when a replica turns its old pairs away
    (without standby copies, which would let every replica take every pair here)."""
    from cluster.rebalance import RebalanceOptions, rebalance
    from cluster.status import plane_status
    from router.grpc_dispatch import GrpcExperts

    long = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in local.generate(PROMPTS, long)]
    llm = LLM(ckpt, expert_backend="ray", num_shards=2, expert_num_cpus=0.1)
    app = llm.experts.app_name
    a = llm.args
    stale = GrpcExperts(DirectoryClient(app), a.n_layers, a.n_experts, refresh_s=3600, token=app_token(app))
    try:
        llm.generate(PROMPTS, GREEDY)
        wait_for(lambda: DirectoryClient(app).token_counts(60) is not None, what="the router's token report")
        # On top of the router's own reports, a skew as another router would report it: experts 0 and 2 hot, both
        # on shard 0, so the rebalance moves or copies one of them to shard 1.
        DirectoryClient(app).report_load([[100_000, 1_000, 90_000, 1_000]] * a.n_layers, [], 0)
        result, calls = {}, []

        class RebalanceMidway(ExpertBackend):
            def __init__(self, inner):
                self.inner = inner

            def forward(self, layer, x, expert_ids, weights, keys=None):
                calls.append(time.monotonic())
                if len(calls) == 10:
                    result["start"] = time.monotonic()
                    threading.Thread(target=lambda: result.update(r=rebalance(app, RebalanceOptions(standby=False)),
                                                                  end=time.monotonic())).start()
                return self.inner.forward(layer, x, expert_ids, weights, keys)

        llm.engine.experts = RebalanceMidway(llm.experts)
        try:
            outs = llm.generate(PROMPTS, long)
            wait_for(lambda: "r" in result, timeout_s=60, what="the rebalance")
        finally:
            llm.engine.experts = llm.experts
        assert [o.outputs[0].token_ids for o in outs] == want
        r = result["r"]
        assert r["switched"] and r["version"] == 1 and r["pairs_moved"] > 0
        assert any(result["start"] < t < result["end"] for t in calls)  # decode did not wait for the switch
        new = {s: sorted(map(tuple, pairs)) for s, pairs in enumerate(r["shards"])}
        assert all(len(pairs) <= 2 * 3 for pairs in new.values())  # 4 experts + up to 2 copies a layer, 3 a shard
        assert all(any((l, e) in new[s] for e in (0, 2)) for s in (0, 1) for l in range(a.n_layers))
        assert r["imbalance_after"] <= 0.1 < r["imbalance_before"]
        assert r["standby"] == [[], []]
        entries = DirectoryClient(app).replicas()

        def holds_new() -> bool:
            return all(sorted((p.layer, p.expert) for p in info(e).pairs) == new[e["shard"]]
                       for e in entries)
        wait_for(holds_new, what="replicas to drop the old placement's pairs")
        wait_for(lambda: llm.experts.backend.routing.version == 1, what="the router's switch")
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, long)] == want
        s = plane_status(app)
        assert s["placement_version"] == 1
        assert {sh["shard"]: sorted(map(tuple, sh["pairs"])) for sh in s["shards"]} == new
        assert any(d["kind"] == "rebalance" for d in s["decisions"])
        # The stale router still routes by version 0: the replicas it picks turn pairs away, it re-reads.
        assert stale.routing.version == 0
        x = torch.randn(6, a.dim)
        ids = torch.tensor([[0, 1], [2, 3], [1, 3], [3, 0], [1, 2], [3, 1]])  # every expert: one moved away
        weights = torch.softmax(torch.randn(6, 2), -1)
        out = stale.forward(1, x, ids, weights)
        assert stale.routing.version == 1
        assert torch.allclose(out, local.engine.experts.forward(1, x, ids, weights), atol=1e-5)
    finally:
        stale.close()
        llm.shutdown()


def test_periodic_rebalance_follows_the_load(ray_session, ckpt, local):
    """With rebalance_interval_s set, the plane re-places on its own once the routers' load calls for it, each pair
    that one replica serves gets a standby copy on the other shard, and when a shard's only replica dies its pairs go
    to their other holders and standby copies at once: no call fails, no output changes."""
    from cluster.status import plane_status

    llm = LLM(ckpt, expert_backend="ray", num_shards=2, expert_num_cpus=0.1, rebalance_interval_s=1.0)
    app = llm.experts.app_name
    try:
        directory = DirectoryClient(app)
        skew = [[100_000, 1_000, 90_000, 1_000]] * llm.args.n_layers  # experts 0 and 2 (both on shard 0) hot

        def switched() -> bool:
            directory.report_load(skew, [], 0)  # as a router under this load would, every refresh
            return plane_status(app)["placement_version"] >= 1
        wait_for(switched, timeout_s=60, what="a periodic rebalance")
        s = plane_status(app)
        assert any(d["kind"] == "rebalance" for d in s["decisions"])
        assert all(any((l, e) in map(tuple, sh["pairs"]) for e in (0, 2)) for sh in s["shards"]
                   for l in range(llm.args.n_layers))  # the hot experts no longer both on shard 0 alone
        pairs = sorted((l, e) for l in range(llm.args.n_layers) for e in range(4))
        assert all(sorted(map(tuple, sh["pairs"] + sh["standby"])) == pairs for sh in s["shards"])
        want = [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY)]
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        backend = llm.experts.backend
        wait_for(lambda: backend.routing.version >= 1, what="the router's switch")
        # Shard 1's only replica dies: shard 0 runs every slot, its standby copies included; no call fails.
        x = torch.randn(6, llm.args.dim)
        ids = torch.tensor([[0, 1], [2, 3], [1, 3], [3, 0], [1, 2], [3, 1]])
        weights = torch.softmax(torch.randn(6, 2), -1)
        victim = next(e for e in directory.replicas() if e["shard"] == 1)
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)  # Serve starts another
        wait_for(lambda: not pid_alive(victim["pid"]), what="the killed replica's process to exit")
        zeros = [rep.replica_id for rep in backend.view[0]]
        before = sum(backend.slots_sent.get(rid, 0) for rid in zeros)
        assert torch.allclose(backend.forward(1, x, ids, weights), local.engine.experts.forward(1, x, ids, weights),
                              atol=1e-5)
        assert sum(backend.slots_sent.get(rid, 0) for rid in zeros) - before == ids.numel()
    finally:
        llm.shutdown()
