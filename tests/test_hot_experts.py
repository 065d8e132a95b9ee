"""`raymoe experiment hot-experts`: the quick live run on the session's Ray, and the simulation, both checked
against the result.json shape other tools read."""

import json

import jsonschema
import numpy as np
import pytest

from experiment.hot_experts import HotExpertsOptions, run
from experiment.workloads import POLICIES, Workload, arrivals, slot_shares

SERIES = {"type": "object", "required": ["t", "replicas", "load", "imbalance"], "properties": {
    "t": {"type": "array", "items": {"type": "number"}},
    "replicas": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
    "load": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "number"}}},
    "imbalance": {"type": "array", "items": {"type": "number"}}}}
POLICY = {"type": "object", "required": ["tokens_per_s", "p50_ms", "p99_ms", "failed", "replica_seconds",
                                         "imbalance_p50", "decisions", "series"], "properties": {
    "tokens_per_s": {"type": "number", "exclusiveMinimum": 0}, "p50_ms": {"type": "number", "exclusiveMinimum": 0},
    "p99_ms": {"type": "number", "exclusiveMinimum": 0}, "failed": {"type": "integer", "minimum": 0},
    "replica_seconds": {"type": "number", "exclusiveMinimum": 0}, "imbalance_p50": {"type": "number", "minimum": 0},
    "decisions": {"type": "array", "items": {"type": "object", "required": ["time", "kind", "seconds_to_serving"]}},
    "series": SERIES}}


def schema(workloads: list[str]) -> dict:
    return {"type": "object", "required": ["simulated", "config", "workloads"], "properties": {
        "simulated": {"type": "boolean"}, "config": {"type": "object"},
        "workloads": {"type": "object", "required": workloads, "additionalProperties": {
            "type": "object", "required": list(POLICIES), "additionalProperties": POLICY}}}}


def test_arrivals_follow_the_rate_and_the_burst():
    rng = np.random.default_rng(0)
    steady = arrivals(rng, Workload("zipf-1.2"), 50.0, 200.0)
    assert abs(len(steady) / 200.0 - 50.0) < 3  # Poisson: 10000 +- 100
    burst = Workload("burst", burst=(100.0, 50.0, 3.0))
    t = arrivals(rng, burst, 50.0, 200.0)
    inside = ((t >= 100) & (t < 150)).sum() / 50
    outside = ((t < 100) | (t >= 150)).sum() / 150
    assert 2.6 < inside / outside < 3.4


def test_slot_shares_match_sampled_choices():
    w = Workload("zipf-1.2", zipf=1.2)
    rng = np.random.default_rng(1)
    picks = w.choices(rng, 50_000, 2, 0.0, 4, 8)
    assert (picks[:, 0] != picks[:, 1]).all()
    sampled = np.bincount(picks.ravel(), minlength=8) / picks.size
    assert np.abs(sampled - slot_shares(w.popularity(0.0, 4, 8))[2]).max() < 0.01


def test_drift_moves_the_hot_set():
    w = Workload("drift", drift_every_s=10.0)
    assert np.array_equal(w.popularity(1.0, 4, 8), w.popularity(9.0, 4, 8))
    assert not np.array_equal(w.popularity(9.0, 4, 8), w.popularity(11.0, 4, 8))


def _steady_run(stall: tuple[float, float] | None, catch_up: bool, clump_at: float | None = None):
    """A Recorder of 60 s at 10 requests/s of 4 tokens, each token 0.1 s after the last; during `stall` no token
    comes out; with catch_up the stalled tokens come out at its end, else those requests never finish. clump_at:
    30 more requests arrive at that moment, served at the same pace."""
    from experiment.live import LiveRun, Recorder

    r = LiveRun(model="", num_shards=1, budget=1, duration_s=60, rate=10, tokens_per_request=4, max_batch=64,
                expert_num_cpus=0.1, replace_every_s=10)
    rec = Recorder(1, t0=0.0)
    arrivals = [rid / 10 for rid in range(600)] + ([clump_at] * 30 if clump_at is not None else [])
    tokens = []
    for rid, a in enumerate(arrivals):
        rec.arrived[rid] = a
        times = [a + 0.1 * (k + 1) for k in range(4)]
        if stall and any(stall[0] <= t < stall[1] for t in times):
            if not catch_up:
                continue
            times = [max(t, stall[1]) for t in times]
        tokens += [(t, rid) for t in times]
    for t, rid in sorted(tokens):
        rec.token(rid, t)
    return rec, r


def test_throughput_lost_counts_what_the_minute_did_not_deliver():
    from experiment.live import throughput_lost

    rec, r = _steady_run(None, False)
    assert throughput_lost(rec, 30.0, r) == pytest.approx(0.0, abs=0.002)  # in flight at the end: not a loss
    rec, r = _steady_run(None, False, clump_at=59.8)
    assert throughput_lost(rec, 30.0, r) == pytest.approx(0.0, abs=0.002)  # nor a clump of arrivals at the end
    rec, r = _steady_run((30.0, 32.0), True)
    assert throughput_lost(rec, 30.0, r) == pytest.approx(0.0, abs=0.002)  # delayed and caught up
    rec, r = _steady_run((30.0, 32.0), False)
    # 2 s of 40 tokens/s never delivered, plus the requests caught in its edges: about 2.3 s of 60 s.
    assert throughput_lost(rec, 30.0, r) == pytest.approx(2.3 / 60, abs=0.005)


def test_settled_imbalance_sets_each_replica_against_the_mean_of_the_seconds_it_served():
    from experiment.live import settled_imbalance

    # The docstring's example, then: seconds before `since` do not count, nor does a replica that barely served.
    per_replica = [(10.0, {"a": 100, "b": 90}), (11.0, {"a": 120, "b": 90, "c": 30})]
    assert settled_imbalance(per_replica, since=10.0, min_s=2) == pytest.approx(0.1)
    assert settled_imbalance([(5.0, {"a": 1000, "b": 0}), *per_replica], since=10.0, min_s=2) == pytest.approx(0.1)
    rel = [220 / 175, 180 / 175, 30 / 80]  # c: 30 slots in a second whose mean was 80
    assert settled_imbalance(per_replica, since=10.0, min_s=1) == pytest.approx(max(rel) / (sum(rel) / 3) - 1)
    assert settled_imbalance(per_replica, since=12.0) is None  # nothing after: no figure, not a perfect one
    # A replica that joined when the load doubled ran what the others ran in its seconds: even.
    busy = {"a": 200, "b": 200, "c": 200}
    rising = [(10.0, {"a": 100, "b": 100}), (11.0, busy), (12.0, busy)]
    assert settled_imbalance(rising, since=10.0, min_s=2) == pytest.approx(0.0)


def test_quick_live_run(ray_session, tmp_path):
    """All four policies on a live plane: the shape other tools read, PNGs, and what each policy did."""
    result = run(HotExpertsOptions(quick=True, out=tmp_path))
    on_disk = json.loads((tmp_path / "result.json").read_text())
    jsonschema.validate(on_disk, schema(["zipf-1.2"]))
    assert on_disk["simulated"] is False and on_disk == json.loads(json.dumps(result))
    for name in ("replicas_zipf-1.2.png", "p99_zipf-1.2.png", "imbalance_zipf-1.2.png", "summary.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    runs = on_disk["workloads"]["zipf-1.2"]
    budget = on_disk["config"]["budget"]
    for policy, r in runs.items():
        assert r["failed"] == 0, policy
        totals = [sum(v[i] for v in r["series"]["replicas"].values()) for i in range(len(r["series"]["t"]))]
        assert max(totals) <= budget, policy
        assert len(r["series"]["t"]) >= 0.8 * on_disk["config"]["duration_s"]
    for policy in ("static", "serve-default"):  # Serve's own autoscaler sees no requests: it never scales up
        for counts in runs[policy]["series"]["replicas"].values():  # (a replica re-checked for a second: 1)
            assert max(counts) == 2 and np.median(counts) == 2, policy
        assert not runs[policy]["decisions"]


@pytest.mark.parametrize("gpus", [64, 512])
def test_simulation_writes_the_same_shape_labelled_simulated(tmp_path, gpus):
    result = run(HotExpertsOptions(simulate=True, gpus=gpus, workloads=["zipf-0", "zipf-1.2"], duration_s=90,
                                   out=tmp_path))
    on_disk = json.loads((tmp_path / "result.json").read_text())
    jsonschema.validate(on_disk, schema(["zipf-0", "zipf-1.2"]))
    assert on_disk["simulated"] is True and result["config"]["gpus"] == gpus
    static = on_disk["workloads"]["zipf-1.2"]["static"]
    assert all(set(v) == {gpus // 8} for v in static["series"]["replicas"].values())
