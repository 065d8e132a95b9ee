"""Tiny random Mixtral checkpoints built with Hugging Face transformers, the reference for every number."""

from pathlib import Path

import torch


def build_checkpoint(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                     max_shard_size: str | None = None, **overrides):
    """Save a random MixtralForCausalLM to `path`; return it as transformers loads it back, in float32."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
               max_position_embeddings=512, initializer_range=0.15, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**cfg)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kwargs)
    # Reloaded rather than cast back: casting would also round buffers such as RoPE's inv_freq.
    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len, vocab) float32 log-softmax of the reference over one unpadded sequence."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def hf_greedy_oracle(model, prompt: list[int], generated: list[int]) -> bool:
    """Is every generated token the reference's argmax given everything before it?

    The reference is the cache-free full forward: transformers' own generate() disagrees with that
    forward when a prompt is longer than the sliding window, so it is no oracle there.
    """
    rows = hf_logprobs(model, prompt + generated)[len(prompt) - 1 : -1]  # each row predicts one generated token
    return rows.argmax(-1).tolist() == generated
