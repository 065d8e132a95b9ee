"""Incremental detokenization and stop strings: the same text as decoding everything, at a flat cost."""

import random

import pytest

from checkpoint.bundled import BUNDLED_MODEL
from router import LLM, SamplingParams
from router.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer, StopStrings
from router.tokenizer import Tokenizer

TEXTS = ["def f(x):\n    return x  # héllo wörld", "日本語のテキスト ✓ and emoji 🎉🐍", "naïve — ‘quotes’ ½ ∑ ∞",
         "plain ascii code: for i in range(10): print(i)"]


class CountingTokenizer(Tokenizer):
    """The bundled tokenizer, recording how many ids each decode call gets."""

    def __init__(self):
        super().__init__(BUNDLED_MODEL)
        self.sizes: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.sizes.append(len(ids))
        return super().decode(ids)


@pytest.fixture(scope="module")
def tok():
    return CountingTokenizer()


def id_streams(tok: Tokenizer, n: int, seed: int) -> list[list[int]]:
    """Token streams with multi-byte characters split over tokens, special ids and random vocabulary."""
    rng = random.Random(seed)
    streams = [tok.encode(t)[1:] for t in TEXTS]  # without <s>: output ids
    for _ in range(n):
        ids = []
        for _ in range(rng.randrange(1, 60)):
            r = rng.random()
            if r < 0.1:
                ids.append(rng.choice([0, 1, 2]))
            elif r < 0.5:
                ids += tok.encode(rng.choice(TEXTS))[1:][: rng.randrange(1, 8)]
            else:
                ids.append(rng.randrange(tok.vocab_size))
        streams.append(ids)
    return streams


@pytest.mark.parametrize("seed", range(3))
def test_deltas_add_up_to_the_full_decode(tok, seed):
    rng = random.Random(seed)
    for out in id_streams(tok, 40, seed):
        prompt = tok.encode(rng.choice(TEXTS))[: rng.randrange(1, 12)]
        d = IncrementalDetokenizer(tok, prompt)
        text = ""
        for i, t in enumerate(out):
            text += d.step(t)
            full = tok.decode(out[: i + 1])
            # Emitted text is the full decode, less at most an incomplete character's worth at the end.
            assert full.startswith(text) and (text == full or full[len(text):].count("\ufffd") >= 1
                                              or full[len(text):] == "")
        text += d.flush()
        assert text == d.text == tok.decode(out)


def test_a_prompt_ending_inside_a_character(tok):
    ids = tok.encode("日本")
    cut = next(i for i in range(2, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    d = IncrementalDetokenizer(tok, ids[:cut])
    text = "".join(d.step(t) for t in ids[cut:]) + d.flush()
    assert text == tok.decode(ids[cut:])


def test_cost_per_token_is_flat(tok):
    rng = random.Random(0)
    pool = [t for text in TEXTS for t in tok.encode(text)[1:]]
    d = IncrementalDetokenizer(tok, tok.encode("def f(x):"))
    tok.sizes.clear()
    for _ in range(5000):
        d.step(rng.choice(pool))
    # A few decodes per token, each over a window of the context plus the last few tokens, never the output.
    assert len(tok.sizes) <= 3 * 5000
    assert max(tok.sizes) <= CONTEXT_TOKENS + 16


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_match_a_search_of_the_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab cé\n"
    for _ in range(200):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        finder = StopStrings(stops)
        text = ""
        while True:
            delta = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 4)))
            text += delta
            at = finder.find(text, len(delta))
            hits = [i for s in stops if (i := text.find(s)) >= 0]
            assert at == min(hits, default=-1)
            if at >= 0 or len(text) > 60:
                break


def test_engine_text_and_earliest_stop():
    llm = LLM(BUNDLED_MODEL, expert_backend="local")
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        out = llm.generate(["def fibonacci(n):"], greedy)[0].outputs[0]
        assert out.text == llm.tokenizer.decode(out.token_ids)
        text = out.text
        i = next(i for i in range(5, len(text)) if text.find(text[i : i + 2]) == i)
        j = next(j for j in range(i + 3, len(text)) if text.find(text[j : j + 3]) == j)
        a, b = text[i : i + 2], text[j : j + 3]
        stops = [b, a]  # listed first, found later: the earliest match wins
        cut = llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True,
                                                                  stop=stops))[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.text == out.text[: out.text.index(a)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("run", ["special", "stray_bytes"])
def test_window_stays_short_through_text_free_runs(tok, run):
    """An EOS loop (ignore_eos) or bytes that never form a character must not widen the decode window."""
    a, cont = tok.encode(" a")[-1], tok.tok.token_to_id("\u00a9")  # byte 0xA9: a lone continuation byte
    out = [a] + [2 if run == "special" else cont] * 2000 + [a]
    d = IncrementalDetokenizer(tok, tok.encode("x"))
    tok.sizes.clear()
    text = "".join(d.step(t) for t in out) + d.flush()
    assert max(tok.sizes) <= CONTEXT_TOKENS + 16
    assert text == tok.decode(out)
