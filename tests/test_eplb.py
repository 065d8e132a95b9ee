"""The re-placement planner (cluster/eplb.py) on built loads: coverage, budgets, and the balance it reaches."""

import numpy as np
import pytest

from cluster.eplb import balanced_placement, imbalance, load_shifted, replicate, shard_loads, standby_copies
from cluster.placement import PlacementPlan
from cluster.rebalance import uncovered


def zipf_load(rng, n_layers: int, n_experts: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n_experts + 1) ** s
    return np.stack([rng.permutation(p) for _ in range(n_layers)]) * 1000  # (L, E), each layer its own hot set


def test_replicate_gives_copies_to_the_most_load_per_copy():
    assert replicate(np.array([60.0, 40, 10]), 6, 3).tolist() == [3, 2, 1]  # the docstring's example
    assert replicate(np.array([60.0, 30, 10]), 5, 3).tolist() == [3, 1, 1]  # 60/2 ties 30/1: the lower index
    assert replicate(np.array([100.0, 1, 1]), 7, 3).tolist() == [3, 2, 2]  # capped at 3 (one per shard)
    with pytest.raises(ValueError, match="need between 3 and 6"):
        replicate(np.ones(3), 7, 2)
    assert replicate(np.array([60.0, 40, 10]), 6, 3, min_copies=2).tolist() == [2, 2, 2]  # the docstring's
    assert replicate(np.array([60.0, 40, 10]), 7, 3, min_copies=2).tolist() == [3, 2, 2]
    with pytest.raises(ValueError, match="need between 6 and 9"):
        replicate(np.ones(3), 5, 3, min_copies=2)


def test_two_copies_of_every_pair_and_still_balanced():
    """min_copies 2 (what a shard of one replica needs to fail safely): every pair on two shards at least,
    per-replica load still about even with shards of unequal replica counts."""
    rng = np.random.default_rng(3)
    L, E = 4, 8
    load = zipf_load(rng, L, E, 1.2)
    capacity = np.array([2.0, 1, 1, 1, 2, 1, 1, 1])
    shards = balanced_placement(load, capacity, 3 * E, min_copies=2)
    held = {(l, e): sum((l, e) in sh for sh in shards) for l in range(L) for e in range(E)}
    assert min(held.values()) >= 2
    assert imbalance(shard_loads(load, shards, capacity)) < 0.15
    with pytest.raises(ValueError, match="need between 16 and 64"):
        balanced_placement(load, capacity, 12, min_copies=2)


def test_the_docstring_example():
    shards = balanced_placement(np.array([[60.0, 30, 10]]), np.ones(2), 4)
    assert shards == [[(0, 0)], [(0, 1), (0, 2)]]
    assert shard_loads(np.array([[60.0, 30, 10]]), shards, np.ones(2)).tolist() == [60, 40]


@pytest.mark.parametrize("s", [0.8, 1.2, 2.0])
def test_zipf_load_is_balanced_within_budget(s):
    rng = np.random.default_rng(0)
    L, E, G = 4, 8, 8
    load = zipf_load(rng, L, E, s)
    expert_parallel = [list(p) for p in
                       (shard.pairs for shard in PlacementPlan.expert_parallel(L, E, G).shards)]
    before = imbalance(shard_loads(load, expert_parallel, np.ones(G)))
    shards = balanced_placement(load, np.ones(G), E + G)
    PlacementPlan.from_sets(shards).validate(L, E)  # every pair held, none twice on a shard
    assert all(sum(1 for l, _ in sh if l == layer) <= 2 for sh in shards for layer in range(L))  # 16 slots / 8
    after = imbalance(shard_loads(load, shards, np.ones(G)))
    assert after < 0.05 < before
    hot = [int(np.argmax(load[l])) for l in range(L)]
    copies = [sum((l, hot[l]) in sh for sh in shards) for l in range(L)]
    assert min(copies) >= 3  # the hottest expert of each layer is held by several shards


def test_capacity_follows_replicas():
    """A shard with three replicas takes three times the load: per-replica load evens out."""
    rng = np.random.default_rng(1)
    load = zipf_load(rng, 4, 8, 1.2)
    capacity = np.array([3.0, 1, 1, 1])
    shards = balanced_placement(load, capacity, 12)
    assert all(sum(1 for l, _ in sh if l == layer) <= 3 for sh in shards for layer in range(4))  # equal memory
    per_replica = shard_loads(load, shards, capacity)
    aware = imbalance(per_replica)
    assert aware < 0.1
    per_shard = per_replica * capacity
    assert per_shard[0] > 2 * per_shard[1:].max()
    blind = balanced_placement(load, np.ones(4), 12)
    assert imbalance(shard_loads(load, blind, capacity)) > 2 * aware  # a plan blind to replicas balances worse


def test_without_redundant_copies_it_only_repacks():
    rng = np.random.default_rng(2)
    load = zipf_load(rng, 4, 8, 1.2)
    shards = balanced_placement(load, np.ones(4), 8)
    assert sorted(p for sh in shards for p in sh) == [(l, e) for l in range(4) for e in range(8)]
    assert all(len(sh) == 8 for sh in shards)


def test_a_copy_with_nowhere_to_go_is_dropped_not_a_crash():
    """Greedy packing can fill every shard that lacks an expert before that expert's last copy comes up."""
    load = np.array([[.051, .118, .216, .114, .27, .098, .084, .049], [.198, .253, .046, .138, .074, .045, .084, .162],
                     [.084, .074, .202, .045, .053, .253, .09, .198], [.114, .213, .066, .202, .085, .054, .084, .181],
                     [.202, .098, .23, .049, .051, .227, .094, .049], [.094, .053, .055, .062, .13, .162, .253, .191]])
    capacity = np.array([3.0, 4, 4, 1, 3, 4, 2, 3])
    shards = balanced_placement(load, capacity, 16)
    PlacementPlan.from_sets(shards).validate(6, 8)
    assert imbalance(shard_loads(load, shards, capacity)) < 0.2


def test_every_pair_of_a_single_replica_gets_one_standby_on_another_shard():
    # The docstring's example: shard 1 has one replica, so its pairs get a standby on shard 0.
    assert standby_copies([[(0, 0), (0, 1)], [(0, 2), (0, 3)]], np.array([2, 1])) == [[(0, 2), (0, 3)], []]
    # Two layers on three shards of one replica, (0, 0) also held by shard 2: no standby for it.
    shards = [[(0, 0), (0, 1), (1, 0)], [(0, 2), (1, 1), (1, 2)], [(0, 0), (0, 3), (1, 3)]]
    capacity = np.array([1, 1, 1])
    spare = standby_copies(shards, capacity)
    held = {p: [g for g, s in enumerate(shards) if p in s] for s in shards for p in s}
    on = {p: [g for g, s in enumerate(spare) if p in s] for s in spare for p in s}
    assert (0, 0) not in on and set(on) == set(held) - {(0, 0)}
    assert all(len(gs) == 1 and gs[0] not in held[p] for p, gs in on.items())  # one, never on its own holder
    per_layer = [[sum(l == layer for l, _ in s + sp) for s, sp in zip(shards, spare, strict=True)] for layer in (0, 1)]
    assert all(max(c) - min(c) <= 1 for c in per_layer)  # memory stays even: fewest of the layer first
    assert uncovered(shards, [[], [], []], capacity) == 7 and uncovered(shards, spare, capacity) == 0
    assert standby_copies([[(0, 0)]], np.array([1])) == [[]]  # one shard: nowhere else to keep it


def test_a_rebalance_on_fresh_noisy_counts_keeps_most_copies_where_they_are():
    rng = np.random.default_rng(0)
    L, E, G = 4, 8, 8
    p = 1 / np.arange(1, E + 1) ** 1.2
    true = np.stack([rng.permutation(p / p.sum()) for _ in range(L)])  # (L, E)
    capacity = np.array([2, 2, 2, 1, 1, 2, 2, 1])
    window = [np.stack([rng.multinomial(400, true[l]) for l in range(L)]).astype(float) for _ in range(10)]
    same = balanced_placement(window[0], capacity, E + G)
    assert balanced_placement(window[0], capacity, E + G, current=same) == same  # nothing to gain: nothing moves
    moved, imbalances = {}, {}
    for sticky in (False, True):
        cur, moved[sticky], imbalances[sticky] = same, 0, []
        for counts in window[1:]:
            new = balanced_placement(counts, capacity, E + G, current=cur if sticky else None)
            moved[sticky] += sum(len(set(n) - set(o)) for n, o in zip(new, cur, strict=True))
            imbalances[sticky].append(imbalance(shard_loads(true, new, capacity)))
            cur = new
    assert moved[True] < 0.7 * moved[False]
    assert np.mean(imbalances[True]) < np.mean(imbalances[False]) + 0.03  # as balanced on the true load


def test_a_moved_hot_set_reads_as_a_shift_and_fresh_counts_of_the_same_load_do_not():
    assert load_shifted([[90, 10]], [[10, 90]]) and not load_shifted([[50, 50]], [[45, 55]])  # the docstring's
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, 9) ** 1.2
    p /= p.sum()

    def counts(shares: np.ndarray, n: int) -> np.ndarray:  # (L, E) tokens drawn from each layer's shares
        return np.stack([rng.multinomial(n, s) for s in shares])

    same = [load_shifted(counts([p] * 4, 1200), counts([p] * 4, 300)) for _ in range(200)]
    moved = [load_shifted(counts([p] * 4, 1200), counts([rng.permutation(p) for _ in range(4)], 300))
             for _ in range(200)]
    assert sum(same) <= 1 and all(moved)  # 1: about what 200 tests at p < 3e-5 may give
    assert not load_shifted(np.zeros((4, 8)), counts([p] * 4, 300))  # nothing before: nothing to differ from


def test_a_replica_gained_is_re_placed_whatever_the_gain():
    """The burst case of a live run: a killed replica's replacement serves on the placement made while its shard
    was short, at half the others' load. The predicted gain of re-placing is under a periodic round's min_gain,
    so only the waiver after a change of replica counts gives the new replica its share."""
    from cluster.plane_ingress import PERIODIC_MIN_GAIN
    from cluster.rebalance import RebalanceOptions, round_options

    rng = np.random.default_rng(0)
    L, E, G = 4, 8, 8
    p = 1 / np.arange(1, E + 1) ** 1.2
    load = np.stack([rng.multinomial(4000, rng.permutation(p / p.sum())) for _ in range(L)]).astype(float)
    short = np.array([1, 2, 2, 2, 2, 2, 2, 2])  # shard 0 lost a replica
    placed = balanced_placement(load, short, E + G)
    full = np.full(G, 2)  # its replacement serves
    per_replica = shard_loads(load, placed, full)
    assert per_replica[0] < 0.7 * per_replica[1:].mean()  # the new replica idles on the old placement
    again = balanced_placement(load, full, E + G, current=placed)
    gain = imbalance(per_replica) - imbalance(shard_loads(load, again, full))
    assert 0 < gain < PERIODIC_MIN_GAIN
    assert shard_loads(load, again, full)[0] > 0.9 * per_replica[1:].mean()

    o = RebalanceOptions(window_s=5.0, min_gain=PERIODIC_MIN_GAIN)
    assert round_options(o, 3.0, counts_changed=True).min_gain == 0.0
    periodic = round_options(o, 3.0, counts_changed=False)
    assert periodic.min_gain == PERIODIC_MIN_GAIN and periodic.window_s == 3.0
