from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """A checkpoint or compute dtype by name: the one check every entry point shares."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class ModelArgs:
    """The shape of a Mixtral-style model (read from, and written as, a Hugging Face `config.json`)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # intermediate size of one expert
    n_experts: int
    top_k: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.eos_token_id
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)
