"""The one interface between the router and wherever the experts run."""

from abc import ABC, abstractmethod

import torch

from experts.checkpoint import Checkpoint
from experts.ffn import ExpertSet


class ExpertBackend(ABC):
    @abstractmethod
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, dim), expert_ids (T, k), weights (T, k) float32 -> (T, dim): sum_k weights * expert(x)."""

    def close(self) -> None:  # noqa: B027 (most backends start nothing)
        """Release whatever the backend started."""


class LocalExperts(ExpertBackend):
    """Every expert of every layer in the router's own process."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        a = ckpt.args
        self.experts = ExpertSet.load(ckpt, [(l, e) for l in range(a.n_layers) for e in range(a.n_experts)], dtype)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.experts.forward(layer, x, expert_ids, weights)
