"""A replica that stands for a device of its own: each run of expert math lasts at least a modelled time.

Replicas on one machine share its cores, so a shard given more replicas there gets no more compute, and an
autoscaling experiment run on a laptop would say nothing about a cluster where each replica has its own GPU.
Paced, a replica's math thread stays busy for the time a device of the stated speed would take (the real math
runs first and counts toward it), so replicas queue, saturate and scale as separate devices do, while sleeping
costs the shared cores nothing. For experiments only (`raymoe experiment hot-experts`); off by default.
"""

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Pace:
    """time(batch) = per_expert_s * distinct experts in it + per_row_s * (token, expert) rows in it.

    per_expert_s stands for reading an expert's weights (paid once per matmul, however many tokens share it),
    per_row_s for the FLOPs of one token through one expert.

    Example: per_expert_s 2e-3, per_row_s 0.5e-3; a batch of 10 tokens, top-2, 3 of whose slots name experts
    held elsewhere (-1), touching experts {1, 4}: 17 rows, 2 experts -> at least 2 * 2 ms + 17 * 0.5 ms = 12.5 ms.
    """

    per_expert_s: float = 0.0
    per_row_s: float = 0.0

    def __post_init__(self):
        if self.per_expert_s < 0 or self.per_row_s < 0:
            raise ValueError(f"paced times must be >= 0, got {self.per_expert_s} s per expert, "
                             f"{self.per_row_s} s per row")

    @property
    def on(self) -> bool:
        return self.per_expert_s > 0 or self.per_row_s > 0

    def seconds(self, rows_per_expert: list[int]) -> float:
        """The modelled time of one run of math, given the rows each expert it touches takes."""
        return self.per_expert_s * sum(n > 0 for n in rows_per_expert) + self.per_row_s * sum(rows_per_expert)

    def hold(self, started_ns: int, rows_per_expert: list[int]) -> None:
        """Sleep until the modelled time since started_ns (time.perf_counter_ns) has passed."""
        left = self.seconds(rows_per_expert) - (time.perf_counter_ns() - started_ns) / 1e9
        if left > 0:
            time.sleep(left)


UNPACED = Pace()  # real time only: every replica but an experiment's
