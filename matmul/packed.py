"""`y = x @ w.T` with weights packed once for oneDNN's CPU matmul.

A decode step multiplies a few rows by large weights, so its matmuls stream weights from memory. MKL's sgemm,
behind nn.Linear and torch.matmul, streams them at 9-17 GB/s on this 2-core machine for 8 to 1 rows; oneDNN's
kernel on weights reordered once into its blocked layout, at 17-18 GB/s for all of them (the rows a decode step
gives an expert, `raymoe bench engine`). Weights that fit the caches gain nothing and pay the packed call's
~10 us, so they stay as they are, as do weights on other devices or in other dtypes, and anything that needs
autograd.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Below this a weight stays in the caches between steps, where the plain call's lower overhead wins.
PACK_MIN_BYTES = 1 << 20
ROWS_HINT = 8  # the rows the layout is tuned for: a decode step's few an expert (many rows are FLOP-bound anyway)


def packs(w: torch.Tensor) -> bool:
    """Whether pack() packs w: a float32 CPU weight of PACK_MIN_BYTES or more, oneDNN built in."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and not w.requires_grad
            and w.numel() * w.element_size() >= PACK_MIN_BYTES and torch.backends.mkldnn.is_available())


def pack(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) -> w packed for linear() where that is faster (see the module doc), else w itself."""
    if w.is_mkldnn or not packs(w):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), ROWS_HINT)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in), w (out, in) as pack() left it -> x @ w.T (..., out)."""
    if w.is_mkldnn:
        if x.dtype != w.dtype or (x.requires_grad and torch.is_grad_enabled()):
            # oneDNN would fail with an opaque message, or run and silently drop the gradient
            raise TypeError(f"a packed {w.dtype} weight takes {w.dtype} inputs without gradients; got {x.dtype}"
                            f"{' requiring grad' if x.requires_grad else ''}")
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


class Linear(nn.Linear):
    """nn.Linear without bias whose weight pack_linears() packs for inference; trains as nn.Linear does."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def pack_linears(model: nn.Module) -> nn.Module:
    """Pack the weight of every Linear in `model` that pack() packs, in place: for inference only (a packed
    weight is a buffer, not a parameter, and has no gradient)."""
    for m in model.modules():
        if isinstance(m, Linear) and isinstance(m.weight, nn.Parameter) and (w := pack(m.weight.detach())).is_mkldnn:
            del m.weight
            m.register_buffer("weight", w)
    return model
