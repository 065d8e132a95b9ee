import torch
import torch.nn.functional as F

from checkpoint.reader import Checkpoint


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x), weights input-major with w1 and w3 side by side in one matmul.

    x (..., M, dim), w13 (..., dim, 2I), w2 (..., I, dim) -> (..., M, dim); a leading expert axis
    runs many experts as one batched matmul.
    """
    gate, up = (x @ w13).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


class ExpertSet:
    """The weights of some (layer, expert) pairs, stacked per layer, and their weighted top-k sum.

    Weights are kept input-major, (E_l, dim, 2I) and (E_l, I, dim), the transpose of nn.Linear's:
    for the few rows an expert sees while decoding, MKL streams this layout up to twice as fast.
    """

    def __init__(self, layers: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]], n_experts: int):
        self.layers = layers  # layer -> (expert ids held, w13 (E_l, dim, 2I), w2 (E_l, I, dim))
        self.n_experts = n_experts
        # layer -> (1 + n_experts,) local index of each expert id + 1, -1 where not held (id -1: none)
        self.local = {}
        for layer, (held, w13, _) in layers.items():
            lut = torch.full((n_experts + 1,), -1, dtype=torch.long)
            lut[torch.tensor(held) + 1] = torch.arange(len(held))
            self.local[layer] = lut.to(w13.device)

    @classmethod
    def load(cls, ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype,
             reuse: "ExpertSet | None" = None, device: torch.device | None = None) -> "ExpertSet":
        """The weights of `pairs` on `device` (default: reuse's, else the CPU); pairs `reuse` holds are
        taken from it, only the others are read from the checkpoint (a replica whose placement changes
        reads just what it gains)."""
        if device is None:
            device = reuse.device if reuse is not None else torch.device("cpu")
        by_layer: dict[int, list[int]] = {}
        for layer, e in sorted(set(pairs)):
            by_layer.setdefault(layer, []).append(e)
        layers = {}
        for layer, held in by_layer.items():
            w13, w2 = [], []
            for e in held:
                old = reuse.weights(layer, e) if reuse is not None else None
                if old is not None:
                    w13.append(old[0])
                    w2.append(old[1])
                    continue
                w1, w2_e, w3 = ckpt.expert(layer, e, dtype)
                w13.append(torch.cat((w1, w3)).T.to(device))
                w2.append(w2_e.T.to(device))
            layers[layer] = (held, torch.stack(w13), torch.stack(w2))
        return cls(layers, ckpt.args.n_experts)

    def weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13 (dim, 2I), w2 (I, dim)) of one held expert, or None."""
        if layer not in self.layers:
            return None
        held, w13, w2 = self.layers[layer]
        j = int(self.local[layer][expert + 1])
        return (w13[j], w2[j]) if j >= 0 else None

    @property
    def device(self) -> torch.device:
        return next((w13.device for _, w13, _ in self.layers.values()), torch.device("cpu"))

    def warm_up(self, pairs: set[tuple[int, int]] | None = None) -> None:
        """Run each held expert (or those in `pairs`) once, so that the first routed tokens do not pay for
        cold kernels and first-touched weights."""
        with torch.inference_mode():
            for layer, (held, w13, _) in self.layers.items():
                ids = [e for e in held if pairs is None or (layer, e) in pairs]
                if ids:
                    x = torch.zeros(len(ids), w13.shape[1], dtype=w13.dtype, device=w13.device)
                    self.forward(layer, x, torch.tensor(ids, device=w13.device).view(-1, 1),
                                 torch.ones(len(ids), 1, device=w13.device))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, (held, _, _) in self.layers.items() for e in held]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, w13, w2 in self.layers.values() for t in (w13, w2))

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, dim), expert_ids (T, k) (-1: not routed here), weights (T, k) -> (T, dim).

        Each expert runs once over all its tokens. When every held expert has tokens and padding
        them to equal counts at most doubles the rows, all run as one batched matmul instead.
        """
        held, w13, w2 = self.layers[layer]
        T, k = expert_ids.shape
        local = self.local[layer][expert_ids.flatten() + 1]  # (T k,) -1: not here
        order = local.argsort(stable=True)
        counts = torch.bincount(local + 1, minlength=len(held) + 1).tolist()
        order = order[counts[0] :]  # drop the slots routed elsewhere
        counts = counts[1:]
        tokens, w = order // k, weights.flatten()[order, None].to(x.dtype)  # (n,), (n, 1)
        out = torch.zeros_like(x)
        n, m = len(order), max(counts)
        if n == 0:
            return out
        if min(counts) > 0 and len(held) * m <= 2 * n:
            group = local[order]  # (n,) local expert of each slot, ascending
            starts = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)
            row = torch.arange(n, device=x.device) - starts[group]
            xs = x.new_zeros(len(held), m, x.shape[1])
            xs[group, row] = x[tokens]
            out.index_add_(0, tokens, swiglu(xs, w13, w2)[group, row] * w)  # (E_l, m, dim) -> (n, dim)
            return out
        start = 0
        for j, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                out.index_add_(0, tokens[sl], swiglu(x[tokens[sl]], w13[j], w2[j]) * w[sl])
                start += c
        return out
