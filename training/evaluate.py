"""Held-out evaluation of a trained checkpoint, scored through the serving path (`LLM.logprobs`)."""

import math
from pathlib import Path

import torch

from router.llm import LLM
from training import corpus


def held_out_texts() -> dict[str, str]:
    return corpus.read_texts(list(corpus.HELD_OUT))


def text_nats(llm: LLM, text: str) -> tuple[list[int], float]:
    """The text's token ids and the sum of -log p over every token after the first."""
    ids = llm.encode(text)[0]
    rows = llm.logprobs([ids])[0]  # (T, V), row t predicts token t + 1
    return ids, -rows[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


def held_out_bits_per_byte(model: str | Path) -> float:
    llm = LLM(model, expert_backend="local", dtype="float32")
    try:
        texts = held_out_texts()
        nats = sum(text_nats(llm, t)[1] for t in texts.values())
        return nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts.values())
    finally:
        llm.shutdown()
