"""The soak's requests: a seeded mix of kinds, each sent with aiohttp and judged against the outcome its kind expects.

Kinds: completion and chat, each streamed or not; "cancel", a stream the client drops after its first chunk
of text; "invalid", a request the server must refuse with a given 4xx and an error body. Anything
else (a 5xx, a wrong status, a broken stream, an error chunk, a timeout, a dropped connection) is unexpected.
"""

import asyncio
import json
import random
import time
from dataclasses import dataclass

PROMPTS = ["def fibonacci(n):", "import os\n", "class Point:\n    def __init__(self, x, y):", "for i in range(10):",
           "# Read a file line by line\n", "def parse_args(argv):", "with open(path) as f:", "try:\n    import json"]
CHATS = ["Write a function that adds two numbers.", "What does os.path.join do?", "Sort a list in Python.",
         "Explain a for loop."]

# (name, path, body, expected status): each is refused before any generation.
INVALID = [
    ("temperature out of range", "/v1/completions", {"prompt": "x", "temperature": 5.0}, 400),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400),
    ("unknown model", "/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 10**9]}, 400),
    ("unsupported parameter", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400),
    ("n > 1", "/v1/completions", {"prompt": "x", "n": 3}, 400),
    ("no prompt", "/v1/completions", {"max_tokens": 4}, 400),
    ("malformed JSON", "/v1/completions", b'{"prompt": "x", ', 400),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
]


@dataclass
class Case:
    index: int
    kind: str  # completion, completion-stream, chat, chat-stream, cancel, invalid
    path: str
    body: dict | bytes
    expect: int = 200
    name: str = ""  # which invalid request


@dataclass
class Outcome:
    index: int
    kind: str
    ok: bool  # the outcome the kind expects
    status: int | None = None
    seconds: float = 0.0
    ttft: float | None = None  # streams: seconds to the first chunk of text
    tokens: int = 0  # generated tokens the client saw counted (usage), 0 for cancelled and invalid requests
    detail: str = ""  # what was unexpected ("cancelled" for a stream dropped as planned)


def plan(n: int, seed: int, max_tokens: tuple[int, int], cancel: float, invalid: float, stream: float,
         chat: float) -> list[Case]:
    """n cases in a seeded order: `cancel` and `invalid` are fractions of all; of the rest, `chat` are chat
    completions and `stream` are streamed."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        r = rng.random()
        tokens = rng.randint(*max_tokens)
        sampling = {"max_tokens": tokens, "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(1 << 30)}
        if r < invalid:
            name, path, body, status = rng.choice(INVALID)
            cases.append(Case(i, "invalid", path, body, status, name))
            continue
        is_chat = rng.random() < chat
        if is_chat:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": rng.choice(CHATS)}]}
        else:
            path, body = "/v1/completions", {"prompt": rng.choice(PROMPTS)}
        body |= sampling
        if r < invalid + cancel:
            # Long enough that the client's drop comes mid-stream, not after the last token.
            body |= {"stream": True, "max_tokens": max(tokens, 4 * max_tokens[1]), "ignore_eos": True}
            cases.append(Case(i, "cancel", path, body))
            continue
        kind = "chat" if is_chat else "completion"
        if rng.random() < stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            kind += "-stream"
        cases.append(Case(i, kind, path, body))
    return cases


def _check_final(case: Case, body: dict) -> tuple[int, str]:
    """(completion tokens, what is wrong or "") of a non-streamed 200."""
    (choice,) = body["choices"]
    tokens = body["usage"]["completion_tokens"]
    if choice["finish_reason"] not in ("length", "stop"):
        return tokens, f"finish_reason {choice['finish_reason']!r}"
    if not 0 < tokens <= case.body["max_tokens"] or (choice["finish_reason"] == "length"
                                                      and tokens != case.body["max_tokens"]):
        return tokens, f"{tokens} tokens for max_tokens {case.body['max_tokens']} ({choice['finish_reason']})"
    return tokens, ""


async def _read_stream(resp, case: Case, out: Outcome, start: float) -> None:
    """Consume an SSE stream (or drop it after the first text, for "cancel"), filling `out`."""
    finish, done = None, False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            out.detail = f"error chunk: {chunk['error']}"
            return
        if chunk.get("usage"):
            out.tokens = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices", []):
            text = c.get("text") or (c.get("delta") or {}).get("content")
            if text and out.ttft is None:
                out.ttft = time.perf_counter() - start
            finish = c.get("finish_reason") or finish
        if case.kind == "cancel" and out.ttft is not None:
            resp.close()  # the client goes away mid-stream: the server must abort the sequence
            out.ok, out.detail = True, "cancelled" if finish is None else "finished before the cancel"
            return
    if not done or finish not in ("length", "stop"):
        out.detail = f"stream ended without [DONE] or a finish reason (done {done}, finish {finish!r})"
    elif case.kind != "cancel" and not 0 < out.tokens <= case.body["max_tokens"]:
        out.detail = f"usage says {out.tokens} tokens for max_tokens {case.body['max_tokens']}"
    else:
        out.ok = True


def error_message(body) -> str | None:
    """The message of an error body, vLLM's shape ({"object": "error", "message"}) or OpenAI's ({"error": {...}})."""
    if not isinstance(body, dict):
        return None
    inner = body.get("error")
    return inner.get("message") if isinstance(inner, dict) else body.get("message")


async def send(session, base: str, case: Case, timeout_s: float) -> Outcome:
    """One request, judged; never raises (every failure is an unexpected outcome)."""
    import aiohttp

    out = Outcome(case.index, case.kind, False)
    start = time.perf_counter()
    data = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    try:
        async with session.post(base + case.path, data=data, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            out.status = resp.status
            if case.kind == "invalid":
                body = await resp.json(content_type=None)
                out.ok = resp.status == case.expect and isinstance(error_message(body), str)
                out.detail = "" if out.ok else f"{case.name}: {resp.status} {json.dumps(body)[:200]}"
            elif resp.status != 200:
                out.detail = f"{resp.status} {(await resp.text())[:200]}"
            elif case.body.get("stream"):
                await _read_stream(resp, case, out, start)
            else:
                out.tokens, out.detail = _check_final(case, await resp.json())
                out.ok = not out.detail
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
        out.ok, out.detail = False, f"{type(e).__name__}: {e}"[:300]
    out.seconds = time.perf_counter() - start
    return out
