"""The one interface between the router and wherever the experts run, and how a backend is chosen."""

import concurrent.futures
import time
from abc import ABC, abstractmethod
from importlib.metadata import entry_points

import numpy as np
import torch

from checkpoint.reader import Checkpoint
from experts.ffn import ExpertSet
from router.config import ExpertPlaneConfig

# Backends other than "local" plug in here (pyproject's entry points), so that the core names no layer above it.
ENTRY_POINT_GROUP = "raymoe.expert_backends"


class ExpertsUnavailable(RuntimeError):
    """Some experts cannot be reached right now (a passing fault): the step may be run again later."""


RETRY_MIN_S, RETRY_MAX_S = 0.1, 2.0  # backoff, doubling, of a step whose experts are unavailable


class Backoff:
    """How long to wait before running again a step whose experts were unavailable: RETRY_MIN_S, doubling up
    to RETRY_MAX_S while steps keep failing, back to RETRY_MIN_S once one runs."""

    def __init__(self):
        self.seconds = RETRY_MIN_S

    def failed(self) -> float:
        """The wait now; the next one is twice as long."""
        wait, self.seconds = self.seconds, min(2 * self.seconds, RETRY_MAX_S)
        return wait

    def succeeded(self) -> None:
        self.seconds = RETRY_MIN_S


class ExpertBackend(ABC):
    @abstractmethod
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                keys: np.ndarray | None = None) -> torch.Tensor:
        """x (T, dim), expert_ids (T, k), weights (T, k) float32 -> (T, dim): sum_k weights * expert(x).

        keys (T,) int64, when given: the sequence each row belongs to, so that a distributed backend can
        keep a sequence on the same replica from step to step (its outputs never depend on them).
        """

    # Whether calls wait on something other than this process's CPU (a network round trip), so that computing
    # meanwhile hides them: the engine then overlaps two micro-batches (forward_async).
    overlaps_calls: bool = False

    def forward_async(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                      keys: np.ndarray | None = None) -> concurrent.futures.Future:
        """forward, run on the backend's one call thread: calls run one at a time, in the order made."""
        if getattr(self, "_caller", None) is None:
            self._caller = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-calls")
            self.async_call_s = 0.0  # time calls made here were in flight (the benchmarks' "dispatch time")

        def timed() -> torch.Tensor:
            t = time.perf_counter()
            try:
                return self.forward(layer, x, expert_ids, weights, keys)
            finally:
                self.async_call_s += time.perf_counter() - t
        return self._caller.submit(timed)

    def close_caller(self) -> None:
        if getattr(self, "_caller", None) is not None:
            self._caller.shutdown()
            self._caller = None

    def note_waiting(self, n: int) -> None:  # noqa: B027 (only a distributed backend reports load)
        """n requests wait for a batch slot: the batching engine tells the backend, whose load reports carry it."""

    def close(self) -> None:  # noqa: B027 (most backends start nothing)
        """Release whatever the backend started."""


class LocalExperts(ExpertBackend):
    """Every expert of every layer in the router's own process."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        a = ckpt.args
        self.experts = ExpertSet.load(ckpt, [(l, e) for l in range(a.n_layers) for e in range(a.n_experts)], dtype)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                keys: np.ndarray | None = None) -> torch.Tensor:
        return self.experts.forward(layer, x, expert_ids, weights)


def make_expert_backend(plane: ExpertPlaneConfig, ckpt: Checkpoint, dtype: torch.dtype) -> ExpertBackend:
    """The backend `plane.expert_backend` names: "local", or one registered under ENTRY_POINT_GROUP
    (raymoe's cluster layer registers "ray"), called as factory(plane, ckpt, dtype)."""
    if plane.expert_backend == "local":
        return LocalExperts(ckpt, dtype)
    found = entry_points(group=ENTRY_POINT_GROUP, name=plane.expert_backend)
    if not found:
        names = sorted({"local", *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))})
        raise ValueError(f"unknown expert_backend {plane.expert_backend!r}: expected one of {names} "
                         "(is raymoe installed? `pip install -e .` registers 'ray')")
    return next(iter(found)).load()(plane, ckpt, dtype)
