from dataclasses import dataclass, field

import torch

# Below this a temperature is greedy, as in vLLM: dividing logits by 1e-40 overflows them to inf, and the
# softmax of infs is NaN, which would fail the sampling step of every sequence in the batch.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    """Per-request decoding settings, named and defaulted as vLLM does."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top log-probs returned per generated token
    prompt_logprobs: int | None = None  # log-probs returned per prompt token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """logits (V,) float32 -> one token id, after temperature, top-k and top-p."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, idx = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.index_fill(0, idx[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
