import torch
import torch.nn.functional as F

from experts.checkpoint import Checkpoint


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with w1 and w3 stacked into one (2I, dim) matmul. x (N, dim) -> (N, dim)"""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


class ExpertSet:
    """The weights of some (layer, expert) pairs, and their weighted top-k sum over a token batch."""

    def __init__(self, weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]):
        self.weights = weights  # (layer, expert) -> (w13 (2I, dim), w2 (dim, I))

    @classmethod
    def load(cls, ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype) -> "ExpertSet":
        weights = {}
        for layer, e in pairs:
            w1, w2, w3 = ckpt.expert(layer, e, dtype)
            weights[(layer, e)] = (torch.cat((w1, w3)), w2)
        return cls(weights)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.weights.values() for t in pair)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, dim), expert_ids (T, k) (-1: not routed here), weights (T, k) -> (T, dim).

        Each expert runs once, as one batched matmul over all the tokens routed to it.
        """
        k = expert_ids.shape[1]
        out = torch.zeros_like(x)
        flat_ids, order = expert_ids.flatten().sort(stable=True)
        flat_w = weights.flatten()[order]
        ids, counts = torch.unique_consecutive(flat_ids, return_counts=True)
        start = 0
        for e, n in zip(ids.tolist(), counts.tolist(), strict=True):
            sl = slice(start, start + n)
            start += n
            if e < 0:
                continue
            w13, w2 = self.weights[(layer, e)]
            tokens = order[sl] // k
            y = swiglu(x[tokens], w13, w2) * flat_w[sl, None].to(x.dtype)
            out.index_add_(0, tokens, y)
        return out
