"""The MoE layer over an expert-parallel group: each routing slot travels to the rank holding its expert
by all_to_all and its output comes back the same way; backward runs the same exchanges reversed.

The model is TrainableMixtral with a slice of the experts and this layer in place of its `moe`, so the
dense part, the gate and the loss are one definition for single-process and expert-parallel training.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from experts.ffn import swiglu
from training.process_groups import ExpertParallelGroups
from training.trainable import TrainableMixtral


@dataclass
class ExchangeTimer:
    """Wall seconds spent inside all-to-all calls (counts and rows, forward and backward)."""

    seconds: float = 0.0
    calls: int = 0

    def run(self, fn, x: torch.Tensor) -> None:
        if x.is_cuda:  # NCCL returns before the transfer ends: time it to the end
            torch.cuda.synchronize(x.device)
        t = time.perf_counter()
        fn()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - t
        self.calls += 1


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
             timer: ExchangeTimer) -> torch.Tensor:
    """all_to_all_single of rows: x (sum(in_splits), ...) -> (sum(out_splits), ...); in_splits[p] rows go
    to group rank p, out_splits[p] rows come from it, in rank order."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    # all_to_all_single with split sizes: gloo (CPU) and NCCL both have it (the list form is not everywhere).
    timer.run(lambda: dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group), x)
    return out


class AllToAll(torch.autograd.Function):
    """`exchange` for autograd: the gradient of the received rows goes back to where they came from."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer):
        ctx.exchange = (out_splits, in_splits, group, timer)
        return exchange(x, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, timer = ctx.exchange
        return exchange(grad, in_splits, out_splits, group, timer), None, None, None, None


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float | None) -> int | None:
    """Routing slots each expert takes from one rank's n_tokens: factor times an even share (None: all)."""
    return None if factor is None else math.ceil(factor * n_tokens * k / n_experts)


def capacity_keep(ids: torch.Tensor, n_experts: int, capacity: int | None) -> torch.Tensor:
    """ids (N, k) -> (N k,) bool, slot n k + j kept: at most `capacity` slots per expert, GShard's priority
    (every token's first choice before any token's second, each in token order).

    Example, capacity 1: ids [[0, 1], [0, 2]] -> priority order (t0 j0: e0), (t1 j0: e0), (t0 j1: e1),
    (t1 j1: e2); t1's first choice is the second slot for e0 -> keep [True, True, False, True].
    """
    N, k = ids.shape
    if capacity is None:
        return torch.ones(N * k, dtype=torch.bool, device=ids.device)
    prio = ids.T.flatten()  # (k N,) slot j of token n at j N + n
    onehot = F.one_hot(prio, n_experts)  # (k N, E)
    position = (onehot.cumsum(0) * onehot).sum(1) - 1  # (k N,) earlier slots bound for the same expert
    return (position < capacity).view(k, N).T.flatten()


def expert_parallel_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, n_experts: int, group: dist.ProcessGroup, timer: ExchangeTimer,
                        capacity: int | None = None) -> tuple[torch.Tensor, int]:
    """x (N, D), ids/weights (N, k), this rank's experts w13 (m, 2I, D), w2 (m, D, I) ->
    (out (N, D) = sum_k weights * expert(x) over the kept slots, dropped slot count).

    Group rank p holds experts p m .. p m + m - 1 (m = n_experts / group size). Worked example, 2 ranks,
    4 experts (rank 0: e0 e1, rank 1: e2 e3), k = 2, slot s = n k + j:

      rank 0: t0 -> (e2, e0), t1 -> (e1, e2): slots e2 e0 e1 e2; sorted by expert: order = [1, 2, 0, 3],
              rows sent x[order // k] = [t0 t1 | t0 t1], counts per expert [1 1 2 0] -> splits [2, 2]
      rank 1: u0 -> (e0, e3): order = [0, 1], rows [u0 | u0], counts [1 0 0 1] -> splits [1, 1]
      counts first: rank 0 receives per source its experts' counts [[1 1], [1 0]], so 3 rows
              [t0(e0) t1(e1) | u0(e0)]; local expert labels [0 1 0], stable sort by it -> [t0 u0 | t1]:
              e0 runs on 2 rows, e1 on 1, then the inverse permutation restores [t0 t1 | u0]
      back:   the reverse exchange (splits swapped) returns rank 0's 4 rows in `order`; they land on their
              slots, are weighted by the gate and summed per token.

    The gate weights are applied here, at the source, after the rows return: the same products, and the
    gate's gradient never crosses the network.
    """
    N, k = ids.shape
    P = dist.get_world_size(group)
    m = n_experts // P
    flat = ids.flatten()  # (N k,) expert of slot n k + j
    kept = capacity_keep(ids, n_experts, capacity).nonzero().squeeze(1)  # (S,) slot numbers, ascending
    order = kept[flat[kept].argsort(stable=True)]  # (S,) kept slots by expert, slot order within one
    send_counts = torch.bincount(flat[kept], minlength=n_experts)  # (E,) rows for each expert

    # Counts first: from every source, how many rows for each of my experts.
    recv_counts = exchange(send_counts, [m] * P, [m] * P, group, timer).view(P, m)  # (P, m)
    in_splits = send_counts.view(P, m).sum(1).tolist()
    out_splits = recv_counts.sum(1).tolist()

    rows = AllToAll.apply(x[order // k], out_splits, in_splits, group, timer)  # (R, D) by source, then expert
    local = torch.arange(m, device=x.device).repeat(P).repeat_interleave(recv_counts.flatten())  # (R,)
    by_expert = local.argsort(stable=True)  # (R,) expert-major, source order within an expert
    per_expert = recv_counts.sum(0).tolist()
    ys = torch.cat([swiglu(c, w13[e], w2[e]) for e, c in enumerate(rows[by_expert].split(per_expert))])
    inverse = torch.empty_like(by_expert)
    inverse[by_expert] = torch.arange(len(by_expert), device=x.device)
    back = AllToAll.apply(ys[inverse], in_splits, out_splits, group, timer)  # (S, D) in `order`

    slots = x.new_zeros(N * k, x.shape[1]).index_copy(0, order, back)  # (N k, D), dropped slots zero
    out = (slots.view(N, k, -1) * weights[..., None].to(x.dtype)).sum(1)
    return out, N * k - len(kept)


class ExpertParallelMixtral(TrainableMixtral):
    """TrainableMixtral holding experts ep_rank m .. ep_rank m + m - 1 of every layer (m = E / ep); its
    MoE layers exchange tokens over `groups.token_exchange`."""

    def __init__(self, full: TrainableMixtral, groups: ExpertParallelGroups, capacity_factor: float | None = None):
        """A copy of `full`'s dense weights and this rank's slice of its experts."""
        a = full.args
        if a.n_experts % groups.ep:
            raise ValueError(f"{a.n_experts} experts do not split evenly over {groups.ep} expert-parallel ranks")
        m = a.n_experts // groups.ep
        super().__init__(a, experts_held=m)
        self.groups = groups
        self.capacity_factor = capacity_factor
        self.timer = ExchangeTimer()
        self.dropped: list[int] = []  # per layer, this rank's dropped slots in the last forward
        lo = groups.ep_rank * m
        with torch.no_grad():
            self.core.load_state_dict(full.core.state_dict())
            self.w13.copy_(full.w13[:, lo : lo + m])
            self.w2.copy_(full.w2[:, lo : lo + m])

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.dropped = []
        return super().forward(tokens)

    def moe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        a = self.args
        capacity = expert_capacity(len(x), a.top_k, a.n_experts, self.capacity_factor)
        out, dropped = expert_parallel_moe(x, ids, weights, self.w13[layer], self.w2[layer], a.n_experts,
                                           self.groups.token_exchange, self.timer, capacity)
        self.dropped.append(dropped)
        return out

    def gather_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of my model copy, w13 (L, E, 2I, D) and w2 (L, E, D, I): every rank of
        token_exchange must call it."""
        g = self.groups.token_exchange
        parts = [[torch.empty_like(w) for _ in range(self.groups.ep)] for w in (self.w13, self.w2)]
        dist.all_gather(parts[0], self.w13.detach().contiguous(), group=g)
        dist.all_gather(parts[1], self.w2.detach().contiguous(), group=g)
        return torch.cat(parts[0], 1), torch.cat(parts[1], 1)
