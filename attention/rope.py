import torch


class RotaryEmbedding:
    """RoPE in Hugging Face's rotate-half layout (the first and second halves of a head are paired)."""

    def __init__(self, head_dim: int, theta: float):
        # Explicit device: the model may be built under torch.device("meta") before its weights load.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        self.inv_freq = 1.0 / (theta**exponent)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, 1, D), computed in float32 then cast, like HF."""
        freqs = torch.outer(positions.float(), self.inv_freq)  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D), cos/sin (T, 1, D) -> (T, H, D)"""
    return x * cos + rotate_half(x) * sin
