"""Hot-expert re-placement: which shards should hold which (layer, expert) pairs, given the tokens each got.

DeepSeek's EPLB (github.com/deepseek-ai/EPLB), per layer: give the hottest experts redundant copies until
the layer has its budget of copies (each time, copy the expert with the most load per copy), then pack
the copies onto shards, heaviest first, each to the least-loaded shard with a free slot. Two changes
for raymoe: a shard's capacity is its replica count (routers spread a shard's tokens over its replicas,
so a shard with three replicas should take three times the load in the same memory per replica), and a
shard never holds two copies of one pair (its replicas would run them as one). Copies go to the shard least loaded
over all layers placed so far, so small per-layer differences even out instead of piling up on one shard.
"""

import numpy as np

from cluster.placement import Pair

# A copy stays on a shard that holds its expert now when that costs at most this share of the layer's mean load per
# replica: a rebalance on a fresh window of noisy counts then moves the pairs that matter, not most of them. Replayed
# on 5 s windows of Zipf counts (8 shards, 64 copies): 22 copies moved a rebalance instead of 36, imbalance on the
# true load 0.093 instead of 0.084.
STICKY = 0.1


def replicate(load: np.ndarray, copies: int, max_copies: int, min_copies: int = 1) -> np.ndarray:
    """load (E,) tokens per expert -> (E,) copies of each, `copies` in all, each between min_copies and max_copies.

    Example: load [60, 40, 10], 6 copies, at most 3 each: start [1, 1, 1]; 60/1 is the most per copy ->
    [2, 1, 1]; then 40/1 > 60/2 -> [2, 2, 1]; then 60/2 > 40/2 -> [3, 2, 1]. With min_copies 2: start
    [2, 2, 2], which is all 6.
    """
    E = len(load)
    low = min(min_copies, max_copies)
    if not E * low <= copies <= E * max_copies:
        raise ValueError(f"{copies} copies of {E} experts: need between {E * low} and {E * max_copies} "
                         f"(at least {low} and at most {max_copies} of each, one per shard)")
    count = np.full(E, low, dtype=np.int64)
    for _ in range(copies - E * low):
        per_copy = np.where(count < max_copies, load / count, -np.inf)
        count[int(np.argmax(per_copy))] += 1
    return count


def pack(load: np.ndarray, count: np.ndarray, capacity: np.ndarray, slots: int, total: np.ndarray,
         now: list[set[int]] | None = None, slack: float = 0.0) -> tuple[list[tuple[int, int]], np.ndarray]:
    """One layer's copies (count (E,) of each expert, load (E,) split evenly over them) onto G shards of
    `slots` each, heaviest first, each to the shard with the least load per replica after it, counting the
    layers placed before (`total`, (G,)); ties to the lowest index. With `now` (per shard, the experts of this
    layer it holds now), a shard holding the expert wins when its load after is within `slack` of the least
    -> ([(shard, expert)], (G,) this layer's load per replica)."""
    G, E = len(capacity), len(load)
    items = sorted(((load[e] / count[e], e) for e in range(E) for _ in range(count[e])), key=lambda it: (-it[0], it[1]))
    here = np.zeros(G)
    free = np.full(G, slots)
    held = [set() for _ in range(G)]
    out = []
    for w, e in items:
        fits = [g for g in range(G) if free[g] and e not in held[g]]
        if not fits:  # every shard with room holds e already: this copy has nowhere to go, e keeps the others
            continue
        after = {g: total[g] + here[g] + w / capacity[g] for g in fits}
        least = min(after.values())
        g = min(fits, key=lambda g: (not (now and e in now[g] and after[g] <= least + slack), after[g], g))
        here[g] += w / capacity[g]
        free[g] -= 1
        held[g].add(e)
        out.append((g, e))
    placed = np.bincount([e for _, e in out], minlength=E)
    if (placed < count).any():  # copies dropped: the others split their expert's load fewer ways
        here = np.zeros(G)
        for g, e in out:
            here[g] += load[e] / placed[e] / capacity[g]
    return out, here


def balanced_placement(load: np.ndarray, capacity: np.ndarray, copies_per_layer: int, max_tries: int = 16,
                       min_copies: int = 1, current: list[list[Pair]] | None = None) -> list[list[Pair]]:
    """load (L, E) tokens per (layer, expert), capacity (G,) replicas per shard -> G lists of pairs.

    Every pair is held by at least min(min_copies, G) shards where a packing tried achieves it (greedy packing
    can drop a copy; a pair is held once always), by at most G; each shard holds at most
    ceil(copies_per_layer / G) pairs of a layer, so every replica needs the same memory. Per layer, up to
    `max_tries` copy counts from E * min(min_copies, G) to copies_per_layer are packed and, of those keeping every
    pair's minimum, the one with the lowest peak load per replica is kept (ties: fewer copies): when shards have
    different replica counts, fewer, heavier copies can fill a bigger shard where many even ones cannot. With
    `current` (the placement now, G lists of pairs), copies lean toward the shards holding them now (within STICKY
    of a layer's mean load per replica).

    Example: one layer, load [60, 30, 10], two shards of one replica, 4 copies (2 slots each). 3 copies:
    60 -> shard 0; 30 and 10 -> shard 1: peak 60. 4 copies (expert 0 twice, 30 each): 30 -> 0, 30 -> 1,
    30 -> 0 (tie: lower index), 10 -> 1: peak 60 too; so 3 copies: [[(0, 0)], [(0, 1), (0, 2)]].
    """
    load = np.asarray(load, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.float64)
    L, E = load.shape
    G = len(capacity)
    if G < 1 or (capacity <= 0).any():
        raise ValueError(f"every shard needs a positive capacity, got {capacity.tolist()}")
    low = E * min(max(1, min_copies), G)
    if not low <= copies_per_layer <= E * G:
        raise ValueError(f"{copies_per_layer} copies per layer of {E} experts on {G} shards: need between {low} and "
                         f"{E * G} (at least {low // E} and at most one per shard of each expert)")
    slots = -(-copies_per_layer // G)
    n_tries = min(max_tries, copies_per_layer - low + 1)
    tries = np.unique(np.linspace(low, copies_per_layer, n_tries).round().astype(int))
    total = np.zeros(G)  # load per replica over the layers placed so far
    shards: list[list[Pair]] = [[] for _ in range(G)]
    for layer in range(L):
        now = None if current is None else [{e for l, e in pairs if l == layer} for pairs in current]
        slack = 0.0 if now is None else STICKY * load[layer].sum() / capacity.sum()
        tried = []
        for copies in tries:
            out, here = pack(load[layer], replicate(load[layer], int(copies), G, low // E), capacity, slots, total,
                             now, slack)
            short = np.bincount([e for _, e in out], minlength=E).min() < low // E  # packing dropped a needed copy
            moves = 0 if now is None else sum(e not in now[g] for g, e in out)
            tried.append((short, here.max(), (total + here).max(), moves, out, here))
        fewest_short = min(t[0] for t in tried)
        least = min(t[1] for t in tried if t[0] == fewest_short)
        # Of the packings within slack of the lowest peak, the one moving the fewest copies, then the lowest peak
        # (ties: fewer copies, tried first).
        ok = [t for t in tried if t[0] == fewest_short and t[1] <= least + slack + 1e-9]
        _, _, _, _, out, here = min(ok, key=lambda t: (t[3], round(t[1], 9), round(t[2], 9)))
        for g, e in out:
            shards[g].append((layer, e))
        total += here
    return [sorted(s) for s in shards]


def standby_copies(shards: list[list[Pair]], capacity: np.ndarray) -> list[list[Pair]]:
    """Per shard, the pairs it loads but is sent nothing for while the pair has a holder up: one standby for each
    pair that a single replica serves (held by one shard of one replica), so that losing any one replica leaves
    every pair somewhere to go at once instead of stalling until Serve has started a new one. A standby goes to
    the other shard with the fewest pairs of that layer so far (held or on standby), then of all layers, then the
    most replicas, then the lowest index, so that the standby memory spreads evenly over the shards (a shard's
    replicas need room for its standby pairs beside the ones they serve).

    Example: one layer, shard 0 [(0, 0), (0, 1)] with two replicas, shard 1 [(0, 2), (0, 3)] with one:
    shard 1's pairs have a single replica -> standby [[(0, 2), (0, 3)], []].
    """
    G = len(shards)
    standby: list[list[Pair]] = [[] for _ in range(G)]
    if G < 2:
        return standby
    per_layer: dict[tuple[int, int], int] = {}  # (shard, layer) -> pairs held or on standby
    total = [len(pairs) for pairs in shards]
    for g, pairs in enumerate(shards):
        for p in pairs:
            per_layer[g, p[0]] = per_layer.get((g, p[0]), 0) + 1
    for p, g0 in single_replica_pairs(shards, capacity).items():
        g = min((g for g in range(G) if g != g0),
                key=lambda g: (per_layer.get((g, p[0]), 0), total[g], -capacity[g], g))
        standby[g].append(p)
        per_layer[g, p[0]] = per_layer.get((g, p[0]), 0) + 1
        total[g] += 1
    return standby


def single_replica_pairs(shards: list[list[Pair]], capacity: np.ndarray) -> dict[Pair, int]:
    """The pairs one replica serves (held by one shard, of one replica) -> that shard, in pair order: those that
    losing a single replica leaves without a holder."""
    holders: dict[Pair, list[int]] = {}
    for g, pairs in enumerate(shards):
        for p in pairs:
            holders.setdefault(tuple(p), []).append(g)
    return {p: gs[0] for p, gs in sorted(holders.items()) if sum(capacity[g] for g in gs) < 2}


def shard_loads(load: np.ndarray, shards: list[list[Pair]], capacity: np.ndarray) -> np.ndarray:
    """(G,) load per replica of each shard if a pair's tokens split evenly over the shards holding it."""
    load = np.asarray(load, dtype=np.float64)
    holders = np.zeros(load.shape)
    for s in shards:
        for l, e in s:
            holders[l, e] += 1
    return np.array([sum(load[l, e] / holders[l, e] for l, e in s) for s in shards]) / np.asarray(capacity)


def imbalance(loads: np.ndarray) -> float:
    """(max - mean) / mean: 0 is perfect balance; 1 means the busiest does twice the average."""
    mean = float(np.mean(loads))
    return float((np.max(loads) - mean) / mean) if mean > 0 else 0.0


# A load counts as shifted when a chi-square test of homogeneity puts the recent shares this many standard
# deviations past sampling noise (p < 3e-5: checked twice a second, a steady load seldom trips it; a moved hot set
# reads tens of deviations).
SHIFT_Z = 4.0


def load_shifted(before: np.ndarray, recent: np.ndarray, z: float = SHIFT_Z) -> bool:
    """Whether the experts' shares of the tokens in `recent` (L, E) differ from those in `before` (L, E) by more
    than sampling noise: a chi-square test of homogeneity of every layer's 2 x E table (before, recent), the
    statistics and degrees of freedom summed over layers, its tail by the Wilson-Hilferty normal approximation.

    Example: one layer, before [90, 10], recent [10, 90]: expected counts 50 in every cell, chi-square
    4 * 40**2 / 50 = 128 on 1 degree of freedom, far past z: shifted. Before [50, 50], recent [45, 55]: 0.5,
    within noise.
    """
    before, recent = np.asarray(before, dtype=np.float64), np.asarray(recent, dtype=np.float64)
    stat, dof = 0.0, 0
    for b, r in zip(before, recent, strict=True):
        col = b + r  # (E,)
        keep = col > 0
        if b.sum() == 0 or r.sum() == 0 or keep.sum() < 2:
            continue
        n = col.sum()
        expected = np.stack([b.sum() * col[keep] / n, r.sum() * col[keep] / n])  # (2, E')
        stat += float((((np.stack([b[keep], r[keep]]) - expected) ** 2) / expected).sum())
        dof += int(keep.sum()) - 1
    if dof == 0:
        return False
    v = 2 / (9 * dof)
    return ((stat / dof) ** (1 / 3) - (1 - v)) / np.sqrt(v) > z
