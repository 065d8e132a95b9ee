"""The process groups of an E x D expert-parallel run, each named for what travels over it.

A run of E * D ranks (global ranks first_rank .. first_rank + E D - 1) holds D copies of the model;
each copy's experts are split over E adjacent ranks (its expert-parallel group), so run rank
r = d * E + e is expert shard e of copy d:

    E=2, D=2:   copy 0: ranks 0 1     token_exchange groups  {0, 1} {2, 3}
                copy 1: ranks 2 3     expert_grads groups    {0, 2} {1, 3}
                                      dense_grads            {0, 1, 2, 3}

Keeping a copy's ranks adjacent puts the all-to-all, the busiest collective, inside one node
whenever E GPUs fit there; expert gradients cross nodes once per step.
"""

from dataclasses import dataclass

import torch.distributed as dist

_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def group_of(ranks: tuple[int, ...]) -> dist.ProcessGroup:
    """The process group of these global ranks, built once per process and reused.

    Only its members call this (use_local_synchronization): several runs can share one worker group,
    each building its groups while ranks outside it do something else. torch names such a group after
    its ranks, so building the same ranks twice would clash; the cache makes that impossible.
    """
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[ranks]


@dataclass(frozen=True)
class ExpertParallelGroups:
    ep: int  # E: ranks over which one model copy's experts are split
    dp: int  # D: model copies
    ep_rank: int  # e: which slice of the experts this rank holds
    dp_rank: int  # d: which model copy (and which slice of the global batch's copies) it belongs to
    token_exchange: dist.ProcessGroup  # the E ranks of my copy: tokens to experts and back (all_to_all)
    expert_grads: dist.ProcessGroup  # the D ranks holding my experts: expert gradients summed
    dense_grads: dist.ProcessGroup  # all E D ranks: dense gradients, aux-loss statistics, reported losses

    @property
    def world_size(self) -> int:
        return self.ep * self.dp

    @property
    def rank(self) -> int:
        """This rank's place in the run, d * E + e (its slice of the global batch)."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def build_groups(ep: int, dp: int, first_rank: int = 0) -> ExpertParallelGroups:
    """This rank's groups in an E x D run on global ranks first_rank .. first_rank + E D - 1 (members only)."""
    r = dist.get_rank() - first_rank
    if not 0 <= r < ep * dp:
        raise ValueError(f"global rank {dist.get_rank()} is not in the {ep}x{dp} run starting at rank {first_rank}")
    d, e = divmod(r, ep)
    base = first_rank
    return ExpertParallelGroups(
        ep=ep, dp=dp, ep_rank=e, dp_rank=d,
        token_exchange=group_of(tuple(base + d * ep + i for i in range(ep))),
        expert_grads=group_of(tuple(base + j * ep + e for j in range(dp))),
        dense_grads=group_of(tuple(range(base, base + ep * dp))),
    )
