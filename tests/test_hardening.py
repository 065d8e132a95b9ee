"""A hostile or careless client, and faults inside the server: each request fails alone, with a clear 4xx for
the client's mistakes and a generic 5xx (naming the request, no internals) for the server's.

The OpenAI app runs in uvicorn on loopback with the bundled model's experts in-process: the HTTP layer and
the engine thread are the ones Serve runs (tests/test_server.py covers them under Serve).
"""

import asyncio
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from bench.fuzz import fuzz, serving
from checkpoint.args import parse_dtype
from checkpoint.bundled import BUNDLED_MODEL, resolve_model
from checkpoint.reader import Checkpoint
from router.config import EngineConfig
from router.dispatch import LocalExperts
from server.config import ServerConfig

ENGINE = EngineConfig(model=BUNDLED_MODEL, max_model_len=256)


def request(url: str, body=None, headers: dict | None = None, method: str | None = None
            ) -> tuple[int, dict | str, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
            status, hdrs = r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read().decode(), e.code, {k.lower(): v for k, v in e.headers.items()}
    try:
        return status, json.loads(raw), hdrs
    except json.JSONDecodeError:
        return status, raw, hdrs


def completion(base: str, **body) -> tuple[int, dict | str, dict]:
    return request(base + "/v1/completions", {"prompt": "def f(x):", "max_tokens": 8, **body})


def stream_events(base: str, body: dict) -> list[dict]:
    status, raw, _ = request(base + "/v1/completions", {**body, "stream": True})
    assert status == 200, raw
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


async def concurrently(*calls):
    return await asyncio.gather(*(asyncio.to_thread(c) for c in calls))


GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def plain():
    with serving(ENGINE) as (base, api):
        yield base, api


# --- one request's fault stays its own -------------------------------------------------------------------


def test_a_sequence_whose_sampling_fails_fails_alone(monkeypatch):
    """A request whose sampling raises gets a 500 naming it; the requests batched with it finish unchanged."""
    import router.engine

    real = router.engine.sample_row

    def sample_row(logits, p, generator):
        if p.seed == 13 and p.temperature > 0:
            raise FloatingPointError("probabilities at 10.0.0.7 are not finite")
        return real(logits, p, generator)

    monkeypatch.setattr(router.engine, "sample_row", sample_row)
    with serving(ENGINE) as (base, _):
        alone = completion(base, max_tokens=24, **GREEDY)[1]["choices"][0]["text"]
        out = asyncio.run(concurrently(
            lambda: completion(base, max_tokens=24, **GREEDY),
            lambda: completion(base, max_tokens=24, seed=13, temperature=0.5),
            lambda: completion(base, max_tokens=24, **GREEDY)))
        (s1, ok1, _), (s2, bad, _), (s3, ok3, _) = out
        assert (s1, s3, s2) == (200, 200, 500)
        assert ok1["choices"][0]["text"] == ok3["choices"][0]["text"] == alone
        message = bad["message"]
        assert "request id cmpl-" in message and "10.0.0.7" not in message and "FloatingPoint" not in message
        assert completion(base, **GREEDY)[0] == 200


class PoisonedExperts(LocalExperts):
    """The bundled model's experts, failing every batch that holds one sequence's tokens, as a replica that
    rejects a message (a non-retriable error) fails it: the fault is that sequence's, the batch is everyone's."""

    def __init__(self):
        ckpt = Checkpoint(resolve_model(BUNDLED_MODEL))
        super().__init__(ckpt, parse_dtype(ENGINE.dtype))
        self.poison: set[int] = set()

    def forward(self, layer, x, expert_ids, weights, keys=None):
        if keys is not None and self.poison & set(np.unique(keys).tolist()):
            raise RuntimeError("StatusCode.INVALID_ARGUMENT from replica 10.0.0.9:50051: bad rows")
        return super().forward(layer, x, expert_ids, weights, keys)


def test_an_expert_error_fails_only_the_sequence_in_whose_batch_it_always_happens():
    experts = PoisonedExperts()
    with serving(ENGINE, experts=experts) as (base, api):
        alone = completion(base, max_tokens=24, **GREEDY)[1]["choices"][0]["text"]
        # The poisoned prompt is the one whose sequences carry a key we can name: its first token is 7.
        engine = api.engine
        real_add = engine.add_request

        def add_request(prompt_ids, params, **kw):
            seq = real_add(prompt_ids, params, **kw)
            if prompt_ids[:1] == [7]:
                experts.poison.add(seq.key)
            return seq

        engine.add_request = add_request
        out = asyncio.run(concurrently(
            lambda: completion(base, max_tokens=24, **GREEDY),
            lambda: completion(base, prompt=[7, 300, 301], max_tokens=24, **GREEDY),
            lambda: completion(base, max_tokens=24, **GREEDY)))
        (s1, ok1, _), (s2, bad, _), (s3, ok3, _) = out
        assert (s1, s2, s3) == (200, 500, 200), out
        assert ok1["choices"][0]["text"] == ok3["choices"][0]["text"] == alone
        assert "10.0.0.9" not in bad["message"] and "request id cmpl-" in bad["message"]
        assert not engine.has_unfinished() and len(engine.free_rows) == engine.max_num_seqs


def test_a_dead_engine_fails_what_is_open_reports_unhealthy_and_refuses_new_work():
    with serving(ENGINE) as (base, api):
        assert request(base + "/health")[0] == 200
        done = {}

        def long_request():
            done["out"] = completion(base, max_tokens=200, **GREEDY)

        t = threading.Thread(target=long_request)
        t.start()
        while api.engine.num_generated_tokens < 2:
            time.sleep(0.01)
        api.runner._inbox.put(lambda: (_ for _ in ()).throw(SystemExit))  # a fault the thread cannot catch
        t.join(60)
        status, body, _ = done["out"]
        assert status == 500 and "engine thread has stopped" in body["message"]
        assert request(base + "/health")[0] == 503
        status, body, headers = completion(base)
        assert status == 503 and body["type"] == "ServiceUnavailableError" and headers["retry-after"]


def test_an_error_in_a_posted_call_does_not_kill_the_engine(plain):
    base, api = plain
    api.runner._inbox.put(lambda: 1 / 0)
    assert completion(base)[0] == 200 and api.runner.alive


def test_a_stream_nobody_reads_is_aborted_and_frees_its_slot():
    from router.sampling import SamplingParams
    from server.async_engine import AsyncEngine, Submission

    with serving(ENGINE) as (_, api):
        runner = AsyncEngine(api.engine, stall_timeout_s=0.5)
        api.runner.close()  # one engine thread per engine

        async def open_and_never_read():
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            stream = await runner.submit([Submission([1, 481, 289], params)])
            deadline = time.monotonic() + 30
            while api.engine.has_unfinished() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return stream

        asyncio.run(open_and_never_read())
        assert not api.engine.has_unfinished() and api.engine.num_generated_tokens < 200
        assert len(api.engine.free_rows) == api.engine.max_num_seqs
        runner.close()


# --- input limits ----------------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_refused_before_parsing_and_keys_before_bodies():
    with serving(ENGINE, ServerConfig(max_body_bytes=2000, api_key="sk-k")) as (base, _):
        key = {"Authorization": "Bearer sk-k"}
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        assert request(base + "/v1/completions", big, key)[0] == 413
        # Without a key even a huge body is refused as unauthenticated, not read.
        assert request(base + "/v1/completions", big)[0] == 401
        assert request(base + "/v1/completions", b"{not json" * 1000)[0] == 401
        # A chunked body has no length to check up front.
        conn = http.client.HTTPConnection(base.removeprefix("http://"))
        conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"y" * 3000, b'"}']),
                     headers={"Content-Type": "application/json", **key}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "larger than 2000 bytes" in json.loads(r.read())["message"]
        assert request(base + "/v1/completions", {"prompt": "x", "max_tokens": 1}, key)[0] == 200


def test_prompt_stop_and_token_limits():
    with serving(ENGINE, ServerConfig(max_prompts=4, max_stop_strings=2, max_stop_chars=8)) as (base, _):
        assert completion(base, prompt=["a"] * 5)[0] == 400
        assert completion(base, prompt=["a"] * 4, max_tokens=1)[0] == 200
        assert completion(base, stop=["a", "b", "c"])[0] == 400
        status, body, _ = completion(base, stop=["x" * 9])
        assert status == 400 and body["param"] == "stop"
        status, body, _ = completion(base, prompt="def " * 400)  # over the 256-token context
        assert status == 400 and "context" in body["message"]
        assert completion(base, max_tokens=2**40)[0] == 400


def test_a_full_queue_answers_503_with_retry_after_and_loses_no_accepted_request():
    engine = replace(ENGINE, max_num_seqs=1)
    with serving(engine, ServerConfig(max_waiting=1)) as (base, _):
        out = asyncio.run(concurrently(*[lambda: completion(base, max_tokens=40, **GREEDY)] * 6))
        statuses = sorted(s for s, _, _ in out)
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
        for status, body, headers in out:
            if status == 503:
                assert headers["retry-after"] and "capacity" in body["message"]
            else:
                assert body["usage"]["completion_tokens"] == 40


@pytest.mark.parametrize("body", [
    {"prompt": "\ud800"},
    {"prompt": ["ok", "x\udfffy"]},
    {"prompt": "ok", "stop": ["\ud800"]},
])
def test_lone_surrogates_are_a_400(plain, body):
    base, _ = plain
    raw = json.dumps({"max_tokens": 2, **body}).encode()  # json.dumps writes them as \ud800 escapes
    status, out, _ = request(base + "/v1/completions", raw)
    assert status == 400 and "surrogate" in out["message"]


def test_lone_surrogates_in_chat_are_a_400(plain):
    base, _ = plain
    raw = json.dumps({"messages": [{"role": "user", "content": "hi \udc00"}]}).encode()
    status, out, _ = request(base + "/v1/chat/completions", raw)
    assert status == 400 and "messages.0.content" in out["message"]


def test_tokenizing_runs_off_the_event_loop(plain):
    """While a near-limit prompt is tokenized, the server still answers: /health returns first."""
    base, _ = plain
    order = []

    def big():
        completion(base, prompt="def f(x): return x\n" * 20000, max_tokens=1)
        order.append("big")

    def health():
        time.sleep(0.05)
        request(base + "/health")
        order.append("health")

    asyncio.run(concurrently(big, health))
    assert order == ["health", "big"]


# --- protocol details ------------------------------------------------------------------------------------


def test_echo_text_offsets_index_the_returned_text(plain):
    base, _ = plain
    for body in ({"prompt": "def f(x):"}, {"prompt": [1, 481, 289, 10, 90, 308]}):
        out = completion(base, echo=True, logprobs=0, max_tokens=12, **GREEDY, **body)[1]["choices"][0]
        text, lp = out["text"], out["logprobs"]
        assert text.startswith("def f(x):") and lp["tokens"][0] == "<s>"
        assert lp["text_offset"][:6] == [0, 0, 3, 5, 6, 7]  # <s> has no text: it starts where "def" does
        for tok, at in zip(lp["tokens"], lp["text_offset"], strict=True):
            assert tok == "<s>" or text[at : at + len(tok)] == tok
        streamed = stream_events(base, {"prompt": "def f(x):", "echo": True, "logprobs": 0, "max_tokens": 12,
                                        **GREEDY})
        offsets = [o for e in streamed for c in e["choices"] if c.get("logprobs")
                   for o in c["logprobs"]["text_offset"]]
        assert offsets == lp["text_offset"]


def test_add_special_tokens_tokenize_and_detokenize(plain):
    base, _ = plain
    with_bos = completion(base, max_tokens=1)[1]["usage"]["prompt_tokens"]
    without = completion(base, max_tokens=1, add_special_tokens=False)[1]["usage"]["prompt_tokens"]
    assert without == with_bos - 1
    status, tok, _ = request(base + "/tokenize", {"prompt": "def f(x):"})
    assert status == 200 and tok["tokens"][0] == 1 and tok["count"] == with_bos and tok["max_model_len"] == 256
    assert request(base + "/tokenize", {"prompt": "def f(x):", "add_special_tokens": False})[1]["tokens"] == \
        tok["tokens"][1:]
    assert request(base + "/detokenize", {"tokens": tok["tokens"]})[1] == {"prompt": "def f(x):"}
    assert request(base + "/detokenize", {"tokens": [10**6]})[0] == 400
    assert request(base + "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]})[0] == 400


def test_continuous_usage_stats(plain):
    base, _ = plain
    events = stream_events(base, {"prompt": "def f(x):", "max_tokens": 6, **GREEDY, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    usage = [e["usage"]["completion_tokens"] for e in events]
    assert len(usage) == len(events) >= 2 and usage == sorted(usage) and usage[-1] == 6
    plain_events = stream_events(base, {"prompt": "def f(x):", "max_tokens": 6, **GREEDY,
                                        "stream_options": {"include_usage": True}})
    assert sum("usage" in e for e in plain_events) == 1


def test_seeded_generation_is_unchanged_by_the_guards(plain):
    """The per-sequence guards change nothing when nothing fails: the server matches the offline engine."""
    from router import LLM, SamplingParams

    base, _ = plain
    llm = LLM(BUNDLED_MODEL, expert_backend="local", max_model_len=256)
    want = llm.generate(["def f(x):"], SamplingParams(temperature=0.8, seed=5, max_tokens=16))[0].outputs[0].text
    llm.shutdown()
    assert completion(base, temperature=0.8, seed=5, max_tokens=16)[1]["choices"][0]["text"] == want


def test_schemathesis_finds_no_server_error():
    """A bounded run of the fuzzer over every operation of the server's schema (`make fuzz` runs 1,000 per
    operation): 4xx for what the schema or the server refuses, never a 5xx."""
    with serving(replace(ENGINE, max_model_len=64)) as (base, _):
        result = fuzz(base, max_examples=8, seed=1)
    assert result.generated > 100 and not result.server_errors, result.output[-4000:]
