"""A replica's holdings following the placement (experts/holdings.py), on a real checkpoint, step by step:
the module docstring's example."""

import time

import pytest
import torch
from hf_reference import build_checkpoint

import experts.holdings
from checkpoint.reader import Checkpoint
from experts.ffn import ExpertSet
from experts.holdings import Holdings


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("holdings")
    build_checkpoint(path)
    return path


class Source:
    def __init__(self):
        self.active, self.target = None, None

    def placement(self, app):
        assert app == "app"
        return {"active": self.active, "target": self.target}


def follower(ckpt_dir, source, plan_id="plan-a"):
    installed = []
    h = Holdings(Checkpoint(ckpt_dir), torch.float32, torch.device("cpu"), "app", 1, 2, plan_id,
                 [(0, 1), (1, 1)], source, lambda experts, fields: installed.append((experts, fields)))
    return h, installed


def expert_bytes(ckpt: Checkpoint) -> int:
    return 3 * ckpt.args.dim * ckpt.args.hidden_dim * 4


def test_load_beside_switch_then_drop(ckpt_dir, monkeypatch):
    monkeypatch.setattr(experts.holdings, "DRAIN_VIEW_S", 0.3)
    monkeypatch.setattr(experts.holdings, "LOAD_SPREAD_S", 0.0)
    source = Source()
    h, installed = follower(ckpt_dir, source)
    one = expert_bytes(h.ckpt)
    h.sync()
    assert installed[-1][1] == {"pairs": [[0, 1], [1, 1]], "version": 0, "ready": [0]}
    assert h.ckpt.bytes_loaded == 2 * one
    h.sync()
    assert len(installed) == 1  # nothing changed, nothing installed

    v1 = {"version": 1, "plan_id": "plan-a", "shards": [[[0, 0], [1, 0]], [[0, 1], [0, 3]]]}
    source.target = v1
    h.sync()
    experts_, fields = installed[-1]
    assert fields == {"pairs": [[0, 1], [1, 1]], "version": 0, "ready": [0, 1]}  # serves v0, ready for v1
    assert sorted(experts_.pairs) == [(0, 1), (0, 3), (1, 1)]
    assert h.ckpt.bytes_loaded == 3 * one  # read only the expert it gained

    source.active, source.target = v1, None
    h.sync()
    assert installed[-1][1] == {"pairs": [[0, 1], [0, 3]], "version": 1, "ready": [0, 1]}  # old pairs kept a while
    time.sleep(0.35)
    h.sync()
    experts_, fields = installed[-1]
    assert fields == {"pairs": [[0, 1], [0, 3]], "version": 1, "ready": [1]}
    assert sorted(experts_.pairs) == [(0, 1), (0, 3)]
    x, ids, w = torch.randn(5, h.ckpt.args.dim), torch.tensor([[1, 3]] * 5), torch.full((5, 2), 0.5)
    fresh = ExpertSet.load(Checkpoint(ckpt_dir), [(0, 1), (0, 3)], torch.float32)
    assert torch.allclose(experts_.forward(0, x, ids, w), fresh.forward(0, x, ids, w), atol=1e-6)

    # A replica started now loads the active placement and nothing else.
    late, installed = follower(ckpt_dir, source)
    late.sync()
    assert installed[-1][1] == {"pairs": [[0, 1], [0, 3]], "version": 1, "ready": [1]}
    assert late.ckpt.bytes_loaded == 2 * one


def test_standby_pairs_are_loaded_but_not_registered_as_routed(ckpt_dir, monkeypatch):
    monkeypatch.setattr(experts.holdings, "LOAD_SPREAD_S", 0.0)
    source = Source()
    h, installed = follower(ckpt_dir, source)
    h.sync()
    source.active = {"version": 1, "plan_id": "plan-a", "shards": [[[0, 0], [1, 0]], [[0, 1]]],
                     "standby": [[[0, 1]], [[1, 0]]]}  # this shard (1) keeps (1, 0) on standby
    h.sync()
    experts_, fields = installed[-1]
    assert fields["pairs"] == [[0, 1]] and fields["version"] == 1
    assert {(0, 1), (1, 0)} <= set(experts_.pairs)  # (1, 1) of version 0 is still kept for a while
    x, ids, w = torch.randn(3, h.ckpt.args.dim), torch.tensor([[0, -1]] * 3), torch.ones(3, 2)
    fresh = ExpertSet.load(Checkpoint(ckpt_dir), [(1, 0)], torch.float32)
    assert torch.allclose(experts_.forward(1, x, ids, w), fresh.forward(1, x, ids, w), atol=1e-6)
    bad = {"version": 2, "plan_id": "plan-a", "shards": [[[0, 0]], [[0, 1]]], "standby": [[]]}  # one shard short
    source.target = bad
    h.sync()
    assert installed[-1][1]["ready"] == [0, 1]  # a malformed record is ignored


def test_a_placement_of_another_plan_is_ignored(ckpt_dir):
    source = Source()
    source.active = {"version": 4, "plan_id": "plan-a", "shards": [[[0, 0]], [[0, 3]]]}
    h, installed = follower(ckpt_dir, source, plan_id="plan-b")
    h.sync()
    assert installed[-1][1] == {"pairs": [[0, 1], [1, 1]], "version": 0, "ready": [0]}


def test_an_aborted_target_is_dropped(ckpt_dir, monkeypatch):
    monkeypatch.setattr(experts.holdings, "DRAIN_VIEW_S", 0.0)
    monkeypatch.setattr(experts.holdings, "LOAD_SPREAD_S", 0.0)
    source = Source()
    h, installed = follower(ckpt_dir, source)
    h.sync()
    source.target = {"version": 1, "plan_id": "plan-a", "shards": [[[0, 0]], [[0, 2]]]}
    h.sync()
    assert installed[-1][1]["ready"] == [0, 1]
    source.target = None
    h.sync()  # marks v1 unwanted
    h.sync()
    assert installed[-1][1] == {"pairs": [[0, 1], [1, 1]], "version": 0, "ready": [0]}
    assert sorted(installed[-1][0].pairs) == [(0, 1), (1, 1)]
