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
