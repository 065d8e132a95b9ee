"""Which replica of a shard takes each row or (row, expert) slot of a call: weighted rendezvous hashing with
bounded loads, the same in every router.

Two rules share the hashing and the bound. `spread` places rows by their sequence, so a sequence keeps its
replica from step to step. `group_by_expert` places slots by their expert, so that a replica's call holds
the tokens of few experts (more rows per expert matmul) and every router's tokens of an expert meet on the
same replica, where the replica coalesces them into one matmul.
"""

import numpy as np


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64s: a well-spread hash, the same in every router."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def rank_replicas(keys: np.ndarray, seeds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """keys (K,) distinct keys, seeds/weights (R,) per replica -> (K, R) each key's replicas, best first.

    Each key ranks the replicas by -w / ln(u), u its hash with the replica's seed: a replica of twice the
    weight comes first for twice the keys, and one added or removed moves only the keys it wins or held."""
    h = mix64(keys.astype(np.uint64)[:, None] ^ seeds.astype(np.uint64)[None, :])  # (K, R)
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # uniform in (0, 1)
    return np.argsort(weights[None, :] / np.log(u), axis=1)  # -w / ln(u) descending == w / ln(u) ascending


def room(n: int, weights: np.ndarray, epsilon: float) -> np.ndarray:
    """(R,) how much of n units each replica may take: (1 + epsilon) times its weighted share, rounded up."""
    return np.ceil((1 + epsilon) * n * weights / weights.sum())


def spread(keys: np.ndarray, seeds: np.ndarray, weights: np.ndarray, epsilon: float = 0.25) -> np.ndarray:
    """keys (N,) sequence of each row, seeds/weights (R,) per replica -> (N,) replica index of each row.

    Weighted rendezvous hashing with bounded loads: each sequence takes the best-ranked replica
    (rank_replicas) that still has room; a replica's room is (1 + epsilon) times its weighted share of
    the rows. So a sequence stays where it was while the load allows, a replica added takes a fair share
    from every other, and none gets more than its bound.

    Example: keys [7, 7, 9, 4], two replicas of equal weight: room ceil(1.25 * 4 / 2) = 3 each. Sequence 7
    (2 rows, placed first as the biggest) goes to its first choice, say replica 1; 9 and 4 follow, each
    to its first choice while that has room left, else to its second.
    """
    R = len(seeds)
    if R == 1:
        return np.zeros(len(keys), dtype=np.int64)
    uk, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    rank = rank_replicas(uk, seeds, weights)  # (K, R)
    left = room(len(keys), weights, epsilon)
    choice = np.empty(len(uk), dtype=np.int64)
    for i in np.lexsort((uk, -counts)):  # biggest sequences first, ties by key: the same in every router
        c = counts[i]
        fits = [r for r in rank[i] if left[r] >= c]
        r = fits[0] if fits else int(np.argmax(left))
        choice[i] = r
        left[r] -= c
    return choice[inverse]


def group_by_expert(layer: int, experts: np.ndarray, keys: np.ndarray, rows: np.ndarray, seeds: np.ndarray,
                    weights: np.ndarray, epsilon: float = 0.25) -> np.ndarray:
    """One shard's slots of a call -> (n,) replica index of each, by expert: experts (n,) the expert of each
    (row, expert) slot, keys (n,) its sequence, rows (n,) its row; seeds/weights (R,) per replica.

    Each expert of `layer` ranks the replicas by rendezvous hashing (rank_replicas on (layer, expert)), the
    same in every router. Experts go biggest first (ties by id), each whole to its best-ranked replica with
    room for all its slots; room is `spread`'s bound, counted in slots (the unit of expert math). An expert
    that fits nowhere whole is cut, its slots in sequence order (the same sequences stay together), over the
    replicas with the most room. An expert with one slot gains nothing from its home (a one-row matmul is
    one anywhere): it joins the replica that takes its row's other slot, if that has room, so the row
    travels once. A row whose slots land on two replicas travels to both, each computing its own expert.

    Example: slots (row: expert) 0:e0 0:e2 1:e0 2:e0 3:e2 4:e4, two replicas of equal weight: room
    ceil(1.25 * 6 / 2) = 4 each. e0 (3 slots) goes whole to its first choice, say replica 1 (room left 1);
    e2 (2 slots) to its first choice if that is replica 0, else, replica 1 having no room for both, to
    replica 0; e4, alone, to its first choice. Replica 1 runs e0's matmul on 3 rows and little else, where
    spreading rows by sequence would likely run e0 and e2 on both replicas (4 matmuls of 1-2 rows).
    """
    R, n = len(seeds), len(experts)
    out = np.zeros(n, dtype=np.int64)
    if R == 1 or n == 0:
        return out
    out[:] = -1
    ue, inverse, counts = np.unique(experts, return_inverse=True, return_counts=True)
    rank = rank_replicas((np.int64(layer) << 16) + ue.astype(np.int64), seeds, weights)  # (G, R)
    left = room(n, weights, epsilon)
    for g in np.lexsort((ue, -counts)):  # biggest experts first, ties by id: the same in every router
        at = np.flatnonzero(inverse == g)  # this expert's slots
        c = len(at)
        if c == 1:
            partner = out[rows == rows[at[0]]]
            partner = partner[partner >= 0]
            if len(partner) and left[partner[0]] >= 1:
                out[at], left[partner[0]] = partner[0], left[partner[0]] - 1
                continue
        fits = [r for r in rank[g] if left[r] >= c]
        if fits:
            out[at], left[fits[0]] = fits[0], left[fits[0]] - c
            continue
        at = at[np.lexsort((rows[at], keys[at]))]
        for r in sorted(rank[g].tolist(), key=lambda r: -left[r]):  # most room first, ties by rank (stable sort)
            take = int(min(left[r], len(at)))
            out[at[:take]], left[r], at = r, left[r] - take, at[take:]
            if not len(at):
                break
    return out
