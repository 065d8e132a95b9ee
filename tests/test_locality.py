"""Locality-aware grouping: a shard's (token, expert) slots go to its replicas by expert, so each replica's call
holds fewer experts and runs more tokens per expert matmul; outputs do not change.

The plane tests run real ExpertServicers behind their own grpc.aio servers on loopback (no Ray): one shard of
the bundled model, all its experts, two replicas, counted by their own Info counters.
"""

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bench.locality import ARMS, KEYS, compare, held_out_prompts, save
from checkpoint.bundled import BUNDLED_MODEL
from checkpoint.reader import Checkpoint
from cluster.eplb import imbalance
from experts.ffn import ExpertSet
from experts.replica import ExpertServicer, GrpcServer
from protos import expert_pb2
from router import LLM
from router.grpc_dispatch import GrpcExperts, nudge
from router.rendezvous import group_by_expert, room, spread

MAX_MESSAGE = 16 << 20


# --- the rule alone -----------------------------------------------------------------------------------


def skewed_slots(rng: np.random.Generator, tokens: int, n_experts: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, 2) distinct experts per token, popularity falling 1/(rank+1), and the slots' (rows, experts)."""
    p = 1.0 / np.arange(1, n_experts + 1)
    ids = np.stack([rng.choice(n_experts, 2, replace=False, p=p / p.sum()) for _ in range(tokens)])
    rows = np.repeat(np.arange(tokens), 2)
    return ids, rows


def test_group_by_expert_keeps_experts_whole_within_bounded_loads():
    rng = np.random.default_rng(0)
    seeds, w = np.array([101, 202, 303], dtype=np.int64), np.ones(3)
    distinct = {"grouped": 0, "spread": 0}
    for call in range(20):
        ids, rows = skewed_slots(rng, 24)
        experts, keys = ids.ravel(), 1000 + rows
        where = group_by_expert(call % 4, experts, keys, rows, seeds, w)
        assert np.array_equal(where, group_by_expert(call % 4, experts, keys, rows, seeds, w))  # every router alike
        assert (np.bincount(where, minlength=3) <= room(len(experts), w, 0.25)).all()
        for e in np.unique(experts):  # an expert that fits its first choice stays whole
            if (experts == e).sum() <= room(len(experts), w, 0.25)[0] / 2:
                assert len(set(where[experts == e])) == 1, (call, e)
        by_row = spread(keys[::2], seeds, w)  # the sequence rule, for comparison: whole rows
        for r in range(3):
            distinct["grouped"] += len(np.unique(experts[where == r]))
            distinct["spread"] += len(np.unique(ids[by_row == r]))
    assert distinct["grouped"] < 0.7 * distinct["spread"]  # fewer matmuls for the same slots


def test_a_lone_slot_joins_its_rows_other_slot():
    """A token's two experts, each its only slot: one replica takes both (one message, the weighted sum back)."""
    seeds, w = np.array([101, 202], dtype=np.int64), np.ones(2)
    for layer in range(8):
        where = group_by_expert(layer, np.array([3, 6]), np.array([7, 7]), np.array([0, 0]), seeds, w)
        assert where[0] == where[1]


# --- on real gRPC replicas ---------------------------------------------------------------------------


class StaticSource:
    def __init__(self, entries):
        self.entries = entries

    def view(self):
        return {"replicas": self.entries, "placement": None}

    def report_failure(self, address):
        pass

    def report_load(self, tokens, critical_s, waiting):
        pass


@pytest.fixture(scope="module")
def plane() -> Iterator[tuple[ExpertSet, GrpcExperts]]:
    """One shard of the bundled model's experts, two replicas on loopback, and a router's backend to them."""
    c = Checkpoint(BUNDLED_MODEL)
    a = c.args
    pairs = [(l, e) for l in range(a.n_layers) for e in range(a.n_experts)]
    experts = ExpertSet.load(c, pairs, torch.float32)
    servers = [GrpcServer(ExpertServicer(experts, a.dim, a.n_layers, a.n_experts, torch.float32,
                                         expert_pb2.InfoResponse(shard=0, replica_id=rid), torch.device("cpu")),
                          "127.0.0.1", MAX_MESSAGE) for rid in ("replica-a", "replica-b")]
    source = StaticSource([dict(shard=0, num_shards=1, replica_id=rid, address=srv.address, pairs=pairs,
                                max_message_bytes=MAX_MESSAGE)
                           for rid, srv in zip(("replica-a", "replica-b"), servers, strict=True)])
    backend = GrpcExperts(source, a.n_layers, a.n_experts, refresh_s=3600)
    yield experts, backend
    backend.close()
    for srv in servers:
        srv.stop()


def matmul_counters(backend: GrpcExperts) -> dict[str, np.ndarray]:
    """replica_id -> (expert rows, expert matmuls) since it started, from its own Info."""
    return {rid: np.array([i.expert_rows, i.expert_matmuls]) for rid, i in backend.infos().items()}


def test_grouped_dispatch_runs_more_tokens_per_expert_matmul_than_the_blind_baseline(plane):
    experts, backend = plane
    a = Checkpoint(BUNDLED_MODEL).args
    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(1)
    calls = []
    for layer in range(a.n_layers):
        ids, _ = skewed_slots(rng, 32)
        calls.append((layer, torch.randn(32, a.dim, generator=g), torch.from_numpy(ids),
                      torch.softmax(torch.randn(32, 2, generator=g), -1), np.arange(500, 532, dtype=np.int64)))
    per_matmul = {}
    for grouped in (True, False):
        backend.group_by_expert = grouped
        rows, matmuls = 0, 0
        for layer, x, ids, w, keys in calls:
            before = matmul_counters(backend)
            # Replies carry each replica's busy fraction, and earlier calls nudge the weights toward even shares
            # of slots: both weight the next call's bound. Equal weights keep the placement (and this test) a
            # function of the call alone.
            backend.busy.clear()
            backend.recent_slots.clear()
            out = backend.forward(layer, x, ids, w, keys)
            # Exact up to float rounding: only which replica computes a slot changed.
            torch.testing.assert_close(out, experts.forward(layer, x, ids, w), rtol=1e-5, atol=1e-6)
            ran = {rid: c - before[rid] for rid, c in matmul_counters(backend).items()}
            slots = [int(r[0]) for r in ran.values()]
            assert sum(slots) == ids.numel() and max(slots) <= room(ids.numel(), np.ones(2), 0.25)[0]
            rows += sum(slots)
            matmuls += sum(int(r[1]) for r in ran.values())
        per_matmul[grouped] = rows / matmuls
    backend.group_by_expert = True
    assert per_matmul[True] >= 1.5 * per_matmul[False], per_matmul


# --- the benchmark's core and output -----------------------------------------------------------------


def test_bench_locality_measures_both_arms_and_writes_their_json(plane, tmp_path):
    """The bench's comparison on the loopback plane, at a toy size: both arms' figures, the same tokens."""
    _, backend = plane
    llm = LLM(BUNDLED_MODEL, expert_backend="local", max_num_seqs=8)
    llm.engine.experts = backend
    try:
        results, same = compare(llm.engine, backend, held_out_prompts(8, 8), new_tokens=4, rounds=1)
    finally:
        llm.engine.experts = llm.experts
        llm.shutdown()
    assert same
    out = tmp_path / "locality.json"
    png = save(results, out, "test")
    doc = json.loads(out.read_text())
    assert set(doc) == set(ARMS) and png.stat().st_size > 0
    for arm in ARMS:
        assert set(KEYS) <= set(doc[arm]) and all(np.isfinite(doc[arm][k]) for k in KEYS)
        assert doc[arm]["messages_per_token"] > 0 and doc[arm]["dispatch_hidden_fraction"] == 0.0
    assert doc["raymoe"]["tokens_per_expert_matmul"] > doc["baseline"]["tokens_per_expert_matmul"]


def test_nudged_weights_even_out_a_shards_replicas_over_many_calls(plane):
    """Grouping alone keeps sending an expert to the replica it hashes to, so a shard whose experts are skewed
    leaves one replica the hot ones; nudged by the slots each replica got lately, the weights even them out."""
    _, backend = plane
    reps = backend.candidates(0)
    seeds = np.array([r.seed for r in reps], dtype=np.int64)
    backend.busy.clear()
    backend.recent_slots.clear()
    rng = np.random.default_rng(2)
    nudged, fixed = np.zeros(2), np.zeros(2)
    for _ in range(60):
        ids = np.stack([rng.choice(4, 2, replace=False, p=[0.5, 0.25, 0.15, 0.1]) for _ in range(8)])  # (8, 2)
        keys = np.arange(8, dtype=np.int64)
        nudged += np.bincount(backend.place(0, ids, np.ones(ids.shape, bool), keys, reps).ravel(), minlength=2)
        rows = np.repeat(np.arange(8), 2)
        fixed += np.bincount(group_by_expert(0, ids.ravel(), keys[rows], rows, seeds, np.ones(2)), minlength=2)
    assert imbalance(nudged) < 0.08 and imbalance(fixed) > 0.15, (nudged, fixed)


def test_nudge_the_docstring_example():
    assert np.allclose(nudge(np.ones(2), np.array([30.0, 10.0])), [0.25, 4.0])
    assert np.allclose(nudge(np.ones(2), np.array([11.0, 9.0])), [(1 / 1.1) ** 4, (1 / 0.9) ** 4])
    assert np.array_equal(nudge(np.array([1.0, 0.5]), np.zeros(2)), [1.0, 0.5])  # nothing placed yet: unchanged
