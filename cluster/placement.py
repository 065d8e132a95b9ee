"""Which (layer, expert) pairs each shard holds, and how many replicas each shard runs."""

from collections.abc import Iterable
from dataclasses import dataclass

Pair = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Shard:
    pairs: tuple[Pair, ...]
    replicas: int = 1


@dataclass(frozen=True)
class PlacementPlan:
    shards: tuple[Shard, ...]

    @classmethod
    def expert_parallel(cls, n_layers: int, n_experts: int, num_shards: int | None = None,
                        replicas_per_shard: int = 1) -> "PlacementPlan":
        """Shard s holds expert e of every layer for each e = s mod num_shards (default: one expert each)."""
        num_shards = n_experts if num_shards is None else num_shards
        if not 1 <= num_shards <= n_experts:
            raise ValueError(f"num_shards must be in [1, {n_experts}] (experts per layer), got {num_shards}")
        return cls.from_sets([[(l, e) for l in range(n_layers) for e in range(s, n_experts, num_shards)]
                              for s in range(num_shards)], replicas_per_shard)

    @classmethod
    def from_sets(cls, sets: Iterable[Iterable[Pair]], replicas: int | list[int] = 1) -> "PlacementPlan":
        sets = [tuple(sorted((int(l), int(e)) for l, e in s)) for s in sets]
        counts = [replicas] * len(sets) if isinstance(replicas, int) else list(replicas)
        if len(counts) != len(sets):
            raise ValueError(f"{len(counts)} replica counts for {len(sets)} shards")
        return cls(tuple(Shard(p, r) for p, r in zip(sets, counts, strict=True)))

    def validate(self, n_layers: int, n_experts: int) -> "PlacementPlan":
        """Every (layer, expert) of the model in at least one shard (a hot one may be in several: redundant
        copies, whose tokens the routers share out), every shard non-empty with a replica."""
        if not self.shards:
            raise ValueError("a placement plan needs at least one shard")
        seen: set[Pair] = set()
        for s, shard in enumerate(self.shards):
            if not shard.pairs:
                raise ValueError(f"shard {s} holds no (layer, expert) pair")
            if shard.replicas < 1:
                raise ValueError(f"shard {s} has {shard.replicas} replicas, needs at least 1")
            for l, e in shard.pairs:
                if not (0 <= l < n_layers and 0 <= e < n_experts):
                    raise ValueError(f"shard {s}: ({l}, {e}) is outside {n_layers} layers x {n_experts} "
                                     "experts")
                seen.add((l, e))
            if len(set(shard.pairs)) != len(shard.pairs):
                raise ValueError(f"shard {s} lists a (layer, expert) pair twice")
        missing = [(l, e) for l in range(n_layers) for e in range(n_experts) if (l, e) not in seen]
        if missing:
            raise ValueError(f"no shard holds {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        return self
