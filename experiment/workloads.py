"""The hot-experts experiment's workloads: when requests arrive and which experts their tokens pick.

Synthetic ones draw each token's two experts per layer from a Zipf popularity over that layer's experts
(each layer with its own hot experts); `drift` moves the hot set every `drift_every_s`; `burst` triples
the arrival rate for a fifth of the run. Arrivals are open-loop (Poisson at the given rate), so an
overloaded policy shows its queue instead of hiding it. `real` is the bundled model itself serving
prompts from its held-out text: its skew is the model's own (the live run drives the model; the
simulation uses the expert shares measured from it).
"""

from dataclasses import dataclass

import numpy as np

from bench.harness import two_distinct

WORKLOADS = ("real", "zipf-0", "zipf-0.8", "zipf-1.2", "drift", "burst")
POLICIES = ("static", "serve-default", "raymoe", "raymoe+replace")  # compared on each; see experiment/live.py


@dataclass(frozen=True)
class Workload:
    name: str
    zipf: float = 1.2  # exponent of expert popularity within a layer
    drift_every_s: float | None = None  # the hot set moves this often
    burst: tuple[float, float, float] | None = None  # (start s, length s, arrival rate factor)
    seed: int = 0

    @property
    def real(self) -> bool:
        return self.name == "real"

    def rate(self, t: float, base: float) -> float:
        """Arrival rate (requests/s) at time t of a run whose steady rate is `base`."""
        if self.burst and self.burst[0] <= t < self.burst[0] + self.burst[1]:
            return base * self.burst[2]
        return base

    def popularity(self, t: float, n_layers: int, n_experts: int) -> np.ndarray:
        """(L, E) probability of each expert being a token's first pick, at time t."""
        epoch = int(t // self.drift_every_s) if self.drift_every_s else 0
        p = 1.0 / np.arange(1, n_experts + 1) ** self.zipf
        p /= p.sum()
        out = np.empty((n_layers, n_experts))
        for layer in range(n_layers):
            order = np.random.default_rng([self.seed, layer, epoch]).permutation(n_experts)
            out[layer, order] = p  # expert order[r] has rank r
        return out

    def choices(self, rng: np.random.Generator, n: int, layer: int, t: float, n_layers: int, n_experts: int
                ) -> np.ndarray:
        """(n, 2) distinct experts per token of `layer`: the first by popularity, the second among the rest."""
        return two_distinct(rng, self.popularity(t, n_layers, n_experts)[layer], n)


def slot_shares(p: np.ndarray) -> np.ndarray:
    """(..., E) first-pick probabilities -> (..., E) share of a layer's routing slots (two per token) each expert
    gets when the second pick is drawn from the rest: (p_e + sum_j p_j p_e / (1 - p_j)) / 2.

    Example: p = [0.5, 0.25, 0.25] -> expert 0 is in a token's pair with probability 0.5 + 2 * 0.25 * 0.5 / 0.75
    = 0.833, experts 1 and 2 with 0.583 each; halved: [0.417, 0.292, 0.292].
    """
    second = (p[..., None, :] * p[..., :, None] / (1 - p[..., :, None])).sum(-2) - p**2 / (1 - p)
    return (p + second) / 2


def workload(name: str, duration_s: float) -> Workload:
    """The named workload, its phases placed within a run of duration_s."""
    if name == "real":
        return Workload("real", zipf=0.0)
    if name.startswith("zipf-"):
        return Workload(name, zipf=float(name.removeprefix("zipf-")))
    if name == "drift":
        return Workload(name, zipf=1.2, drift_every_s=max(duration_s / 4, 5.0))
    if name == "burst":
        return Workload(name, zipf=1.2, burst=(0.4 * duration_s, 0.2 * duration_s, 3.0))
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def arrivals(rng: np.random.Generator, w: Workload, base_rate: float, duration_s: float) -> np.ndarray:
    """Poisson arrival times in [0, duration_s) at w.rate(t, base_rate) (thinning of the peak rate)."""
    peak = base_rate * (w.burst[2] if w.burst else 1.0)
    n = rng.poisson(peak * duration_s)
    t = np.sort(rng.uniform(0, duration_s, n))
    keep = rng.uniform(0, peak, n) < np.array([w.rate(x, base_rate) for x in t])
    return t[keep]
