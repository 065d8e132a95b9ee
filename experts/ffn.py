import torch
import torch.nn.functional as F

from checkpoint.reader import Checkpoint
from matmul.packed import linear, pack


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x), with w1 and w3 stacked in one matmul.

    x (M, dim), w13 (2I, dim), w2 (dim, I), out-major as checkpoints and nn.Linear keep them, dense or as
    matmul.packed.pack left them -> (M, dim).
    """
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2)


class ExpertSet:
    """The weights of some (layer, expert) pairs and their weighted top-k sum.

    Each expert's w13 (2I, dim) and w2 (dim, I) are kept as matmul.packed.pack leaves them: float32 weights of
    1 MiB or more on the CPU packed for oneDNN, whose kernel streams them up to twice as fast as MKL's sgemm for a
    decode step's few rows an expert; the rest (small, bf16, on a GPU) dense, as checkpoints store them.
    """

    def __init__(self, layers: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]], n_experts: int):
        """layers: layer -> (expert ids held, each one's w13 (2I, dim), each one's w2 (dim, I)), kept as given
        (load() packs them as it reads them)."""
        self.layers = layers
        self.n_experts = n_experts
        # layer -> (1 + n_experts,) local index of each expert id + 1, -1 where not held (id -1: none)
        self.local = {}
        for layer, (held, w13, _) in layers.items():
            lut = torch.full((n_experts + 1,), -1, dtype=torch.long)
            lut[torch.tensor(held) + 1] = torch.arange(len(held))
            self.local[layer] = lut.to(w13[0].device)

    @classmethod
    def load(cls, ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype,
             reuse: "ExpertSet | None" = None, device: torch.device | None = None) -> "ExpertSet":
        """The weights of `pairs` on `device` (default: reuse's, else the CPU); pairs `reuse` holds are
        taken from it, only the others are read from the checkpoint (a replica whose placement changes
        reads just what it gains)."""
        if device is None:
            device = reuse.device if reuse is not None else torch.device("cpu")
        if reuse is not None and reuse.pairs and reuse.device != device:
            raise ValueError(f"cannot reuse weights on {reuse.device} for a set on {device}")
        by_layer: dict[int, list[int]] = {}
        for layer, e in sorted(set(pairs)):
            by_layer.setdefault(layer, []).append(e)
        layers = {}
        for layer, held in by_layer.items():
            w13, w2 = [], []
            for e in held:
                old = reuse.weights(layer, e) if reuse is not None else None
                if old is None:
                    w1, w2_e, w3 = ckpt.expert(layer, e, dtype)
                    old = pack(torch.cat((w1, w3)).to(device)), pack(w2_e.to(device))  # one dense copy at a time
                w13.append(old[0])
                w2.append(old[1])
            layers[layer] = (held, w13, w2)
        return cls(layers, ckpt.args.n_experts)

    def weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13 (2I, dim), w2 (dim, I)) of one held expert, as kept, or None."""
        if layer not in self.layers:
            return None
        held, w13, w2 = self.layers[layer]
        j = int(self.local[layer][expert + 1])
        return (w13[j], w2[j]) if j >= 0 else None

    @property
    def device(self) -> torch.device:
        return next((w13[0].device for _, w13, _ in self.layers.values()), torch.device("cpu"))

    def warm_up(self, pairs: set[tuple[int, int]] | None = None) -> None:
        """Run each held expert (or those in `pairs`) once, so that the first routed tokens do not pay for
        cold kernels and first-touched weights."""
        with torch.inference_mode():
            for layer, (held, _, w2) in self.layers.items():
                ids = [e for e in held if pairs is None or (layer, e) in pairs]
                if ids:
                    x = torch.zeros(len(ids), w2[0].shape[0], dtype=w2[0].dtype, device=w2[0].device)
                    self.forward(layer, x, torch.tensor(ids, device=x.device).view(-1, 1),
                                 torch.ones(len(ids), 1, device=x.device))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, (held, _, _) in self.layers.items() for e in held]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, w13, w2 in self.layers.values() for t in (*w13, *w2))

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, dim), expert_ids (T, k) (-1: not routed here), weights (T, k) -> (T, dim).

        Each expert runs once over all its tokens. Example, k = 2, experts 0 and 3 held (local 0 and 1):
        expert_ids [[3, 0], [5, 3]] -> local slots [1, 0, -1, 1]; sorted, the slot routed elsewhere dropped:
        slots [1, 0, 3] of tokens [0, 0, 1], counts [1, 2]: expert 0 runs token 0, expert 3 tokens 0 and 1.
        """
        held, w13, w2 = self.layers[layer]
        k = expert_ids.shape[1]
        local = self.local[layer][expert_ids.flatten() + 1]  # (T k,) -1: not here
        order = local.argsort(stable=True)
        counts = torch.bincount(local + 1, minlength=len(held) + 1).tolist()
        order = order[counts[0] :]  # drop the slots routed elsewhere
        out = torch.zeros_like(x)
        if len(order) == 0:
            return out
        tokens = order // k  # (n,)
        xs = x[tokens].split(counts[1:])  # each expert's rows
        ys = torch.cat([swiglu(xj, w13[j], w2[j]) for j, xj in enumerate(xs) if len(xj)])  # (n, dim)
        return out.index_add_(0, tokens, ys * weights.flatten()[order, None].to(x.dtype))
