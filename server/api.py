"""The OpenAI-compatible HTTP API (as vLLM serves it) over one continuous-batching engine.

`OpenAIServer` does the work and knows nothing of Serve; `build_fastapi` maps HTTP onto it; the
cluster layer's `Router` deployment owns one of each per replica.
"""

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from checkpoint.args import parse_dtype
from checkpoint.bundled import resolve_model
from checkpoint.reader import Checkpoint
from router.config import EngineConfig
from router.dispatch import ExpertBackend, LocalExperts
from router.engine import Engine
from router.model import RouterModel
from router.sampling import SamplingParams
from router.tokenizer import Tokenizer
from server.async_engine import AsyncEngine, EngineDead, QueueFull, RequestStream, Submission, Update
from server.chat_template import ChatTemplate, ChatTemplateError
from server.config import ServerConfig
from server.metrics import RouterMetrics
from server.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
    error_body,
    format_validation_errors,
    now,
    request_id,
)
from server.starting import RETRY_AFTER_S

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def unavailable(message: str) -> APIError:
    return APIError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class _Choice:
    """One prompt's output as it accumulates over updates."""

    prompt_ids: list[int]
    prompt_text: str
    prompt_offsets: list[int] | None = None  # where each prompt token's text starts (None: not yet worked out)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each generated token's text starts in text
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    echoed: bool = False  # the prompt has been streamed back
    sent: int = 0  # generated tokens streamed (with their log-probs)
    finish_reason: str | None = None
    prompt_logprobs: list | None = None

    def apply(self, u: Update) -> None:
        self.token_ids += u.token_ids
        self.logprobs += u.logprobs
        self.offsets += u.text_offsets
        self.text = u.text
        self.finish_reason = u.finish_reason
        if u.prompt_logprobs is not None:
            self.prompt_logprobs = u.prompt_logprobs

    def delta(self, hold: int) -> str:
        """Text not yet streamed, holding back what a stop string or an incomplete UTF-8 char may change."""
        text = self.text
        if self.finish_reason is None:
            text = text.rstrip("\ufffd")
            text = text[: max(len(text) - hold, self.emitted)]
        out = text[self.emitted :]
        self.emitted += len(out)
        return out


class OpenAIServer:
    """One model, one engine thread, every client's requests batched together."""

    def __init__(self, engine: EngineConfig, server: ServerConfig, experts: ExpertBackend | None = None):
        """experts: None runs every expert in this process."""
        self.path = resolve_model(engine.model)
        ckpt = Checkpoint(self.path)
        dtype = parse_dtype(engine.dtype)
        self.args = ckpt.args
        self.name = server.served_model_name or self.path.name
        self.api_key = server.api_key or None
        self.tokenizer = Tokenizer.maybe(self.path)
        self.chat_template = ChatTemplate.maybe(self.path) if self.tokenizer else None
        self.experts = experts if experts is not None else LocalExperts(ckpt, dtype)
        self.engine = Engine(RouterModel.from_checkpoint(ckpt, dtype), self.experts, engine,
                             tokenizer=self.tokenizer)
        self.max_model_len = self.engine.max_model_len
        self.metrics = RouterMetrics(self.name, self.args.n_layers, self.args.n_experts)
        self.limits = server
        self.runner = AsyncEngine(self.engine, on_step=self.metrics.on_step, max_waiting=server.max_waiting,
                                  stall_timeout_s=server.stream_stall_timeout_s)
        self.created = now()
        self.stream_chunks_per_s = server.stream_chunks_per_s  # 0: a chunk per step, however many streams
        self.streams = 0  # streaming responses open
        self._token_text: dict[int, str] = {}
        log.info("serving %s as %r: context %d, %d torch threads, experts %s", self.path, self.name,
                 self.max_model_len, torch.get_num_threads(), type(self.experts).__name__)

    def close(self) -> None:
        self.runner.close()
        self.experts.close()

    # --- helpers -----------------------------------------------------------------------------

    def authorized(self, authorization: str) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.name}`.",
                           "model")

    def token_text(self, tok: int) -> str:
        s = self._token_text.get(tok)
        if s is None:
            s = (self.tokenizer.tok.decode([tok], skip_special_tokens=False) if self.tokenizer
                 else f"token_id:{tok}")
            self._token_text[tok] = s
        return s

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> _Choice:
        """A prompt as token ids and its text, with where each token's text starts when the tokenizer gave it
        for free (runs off the event loop)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, f"{self.name} has no tokenizer: send the prompt as token ids", "prompt")
            enc = self.tokenizer.encodings([prompt], add_special_tokens)[0]
            ids = enc.ids
            if len(ids) > self.max_model_len:  # before any model work, whatever max_tokens says
                raise APIError(400, f"the prompt is {len(ids)} tokens, more than the model's context of "
                                    f"{self.max_model_len}", "prompt")
            # Special tokens (<s>) have no text: the span the tokenizer gives them is empty.
            return _Choice(ids, prompt, [start for start, _ in enc.offsets])
        bad = [t for t in prompt if not 0 <= t < self.args.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {self.args.vocab_size})",
                           "prompt")
        return _Choice(list(prompt), self.tokenizer.decode(prompt) if self.tokenizer else "")

    def prompt_offsets(self, c: _Choice) -> list[int]:
        """Where each prompt token's text starts in c.prompt_text; a special token (no text) starts where the
        text has got to. Worked out when first asked for (an echo with log-probs of a prompt sent as ids)."""
        if c.prompt_offsets is not None:
            return c.prompt_offsets
        ids, text = c.prompt_ids, c.prompt_text
        if self.tokenizer is None:
            c.prompt_offsets = [0] * len(ids)
            return c.prompt_offsets
        special = self.tokenizer.special_ids
        enc = self.tokenizer.encodings([text], add_special_tokens=False)[0]
        out, end = [], 0
        if enc.ids == [t for t in ids if t not in special]:  # the usual case: the text tokenizes back to the ids
            spans = iter(enc.offsets)
            for t in ids:
                if t not in special:
                    start, end = next(spans)
                out.append(start if t not in special else end)
        else:  # each token's own decode, which may differ by a character around merges
            for t in ids:
                out.append(min(end, len(text)))
                end += len(self.tokenizer.decode([t]))
        c.prompt_offsets = out
        return out

    async def encode_all(self, prompts: list[str | list[int]], add_special_tokens: bool) -> list[_Choice]:
        if len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts in one request; at most {self.limits.max_prompts}",
                           "prompt")
        return await asyncio.to_thread(lambda: [self.encode(p, add_special_tokens) for p in prompts])

    def check_stops(self, stops: list[str]) -> None:
        if len(stops) > self.limits.max_stop_strings or any(len(x) > self.limits.max_stop_chars for x in stops):
            raise APIError(400, f"at most {self.limits.max_stop_strings} stop strings of at most "
                                f"{self.limits.max_stop_chars} characters", "stop")

    async def submit(self, choices: list[_Choice], params: SamplingParams, stream: bool, rid: str
                     ) -> RequestStream:
        try:
            return await self.runner.submit([Submission(c.prompt_ids, params, c.prompt_text)
                                             for c in choices], stream, request_id=rid)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from e
        except QueueFull as e:
            raise unavailable(f"the server is at capacity: {e}; retry later") from e
        except EngineDead as e:
            raise unavailable(f"this replica cannot serve: {e}") from e
        except RuntimeError as e:  # a server fault adding it; the message names the request, nothing internal
            raise APIError(500, str(e)) from e

    async def paced(self, stream: RequestStream) -> AsyncIterator[list[Update]]:
        """The stream's batches of updates, each stream at most one per len(streams) / stream_chunks_per_s.

        A streamed chunk costs the same on its way through Serve's proxy whatever it carries, so under load
        each chunk carries several tokens; a lone stream still gets every step's token at once.
        """
        self.streams += 1
        try:
            while not stream.done:
                batch = await stream.next_batch()
                t = time.monotonic()
                yield batch
                if self.stream_chunks_per_s and not stream.done:
                    wait = self.streams / self.stream_chunks_per_s - (time.monotonic() - t)
                    if wait > 0:  # a sequence that finishes meanwhile ends the wait: its last chunk goes now
                        with suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stream.updates.finished.wait(), wait)
                        stream.updates.finished.clear()  # its update is queued: the next batch takes it
        finally:
            self.streams -= 1

    @staticmethod
    def hold_back(params: SamplingParams) -> int:
        return max((len(s) for s in params.stop), default=1) - 1

    # --- /v1/completions ---------------------------------------------------------------------

    def completion_logprobs(self, c: _Choice, echo: bool, echoing: bool, start: int) -> CompletionLogprobs:
        """Log-probs of generated tokens from `start`, and of the prompt's when `echoing` it now; text_offset
        indexes the choice's whole text (the echoed prompt first when `echo`)."""
        out = CompletionLogprobs()
        base = len(c.prompt_text) if echo else 0
        entries: list[tuple[int, dict[int, float] | None, int]] = []
        if echoing:
            entries += list(zip(c.prompt_ids, c.prompt_logprobs or [None] * len(c.prompt_ids),
                                self.prompt_offsets(c), strict=True))
        entries += [(tok, lp, base + at) for tok, lp, at in zip(c.token_ids[start:], c.logprobs[start:],
                                                                 c.offsets[start:], strict=True)]
        for tok, lp, at in entries:
            out.tokens.append(self.token_text(tok))
            out.token_logprobs.append(None if lp is None else lp[tok])
            out.top_logprobs.append(None if lp is None else {self.token_text(t): v for t, v in lp.items()})
            out.text_offset.append(at)
        return out

    async def completions(self, req: CompletionRequest) -> CompletionResponse | StreamingResponse:
        self.check_model(req.model)
        self.check_stops(req.stop or [])
        choices = await self.encode_all(req.prompts(), req.add_special_tokens)
        try:
            params = req.sampling(req.max_tokens, req.logprobs,
                                  req.logprobs if req.echo and req.logprobs is not None else None)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        if req.echo and req.logprobs is not None:  # tokenizing a long prompt again: off the event loop, once
            await asyncio.to_thread(lambda: [self.prompt_offsets(c) for c in choices])
        rid, created = request_id("cmpl"), now()
        stream = await self.submit(choices, params, req.stream, rid)
        if req.stream:
            return StreamingResponse(self.completion_stream(req, choices, params, stream, rid, created),
                                     media_type="text/event-stream")
        await self.drain(stream, choices)
        out = []
        for i, c in enumerate(choices):
            lp = self.completion_logprobs(c, req.echo, req.echo, 0) if req.logprobs is not None else None
            text = (c.prompt_text if req.echo else "") + c.text
            out.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason))
        return CompletionResponse(id=rid, created=created, model=self.name, choices=out,
                                  usage=self.usage(choices))

    async def completion_stream(self, req: CompletionRequest, choices: list[_Choice], params: SamplingParams,
                                stream: RequestStream, rid: str, created: int) -> AsyncIterator[str]:
        hold = self.hold_back(params)

        def chunk(parts: list[CompletionChoice], usage: Usage | None = None) -> str:
            if usage is None and req.continuous_usage:
                usage = self.usage(choices)
            return sse(CompletionResponse(id=rid, created=created, model=self.name, choices=parts,
                                          usage=usage).model_dump(exclude_none=True))

        async with stream, aclosing(self.paced(stream)) as batches:
            async for batch in batches:
                error = next((u.error for u in batch if u.error), None)
                if error:
                    yield sse({"error": error_body(500, error)})
                    break
                for u in batch:
                    choices[u.index].apply(u)
                parts = []
                for i in sorted({u.index for u in batch}):
                    c = choices[i]
                    echo = req.echo and not c.echoed  # the prompt goes out with the first chunk
                    text = (c.prompt_text if echo else "") + c.delta(hold)
                    c.echoed = c.echoed or echo
                    # Without a tokenizer there is no text to wait for: each token goes out as it comes.
                    fresh = len(c.token_ids) > c.sent
                    if not text and c.finish_reason is None and (self.tokenizer or not fresh):
                        continue
                    lp = (self.completion_logprobs(c, req.echo, echo, c.sent) if req.logprobs is not None
                          else None)
                    c.sent = len(c.token_ids)
                    parts.append(CompletionChoice(index=i, text=text, logprobs=lp,
                                                  finish_reason=c.finish_reason))
                if parts:
                    yield chunk(parts)
            else:
                if req.include_usage:
                    yield chunk([], self.usage(choices))
        yield sse("[DONE]")

    @staticmethod
    def usage(choices: list[_Choice]) -> Usage:
        return Usage.of(sum(len(c.prompt_ids) for c in choices), sum(len(c.token_ids) for c in choices))

    @staticmethod
    def raise_engine_error(u: Update) -> None:
        if u.error:
            raise APIError(500, u.error)

    async def drain(self, stream, choices: list[_Choice]) -> None:
        """A non-streaming request: apply its updates until every sequence has finished."""
        async with stream:
            while not stream.done:
                for u in await stream.next_batch():
                    self.raise_engine_error(u)
                    choices[u.index].apply(u)

    # --- /v1/chat/completions ----------------------------------------------------------------

    def chat_logprobs(self, c: _Choice, start: int, n_top: int) -> ChatLogprobs:
        content = []
        for tok, lp in zip(c.token_ids[start:], c.logprobs[start:], strict=True):
            s = self.token_text(tok)
            top = [TopLogprob(token=self.token_text(t), logprob=v, bytes=list(self.token_text(t).encode()))
                   for t, v in sorted(lp.items(), key=lambda kv: -kv[1])[:n_top]]
            content.append(ChatTokenLogprob(token=s, logprob=lp[tok], bytes=list(s.encode()),
                                            top_logprobs=top))
        return ChatLogprobs(content=content)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        self.check_model(req.model)
        if self.chat_template is None:
            raise APIError(400, f"{self.name}'s tokenizer has no chat template (tokenizer_config.json "
                                "'chat_template'): use /v1/completions with a plain prompt instead",
                           "messages")
        self.check_stops(req.stop or [])
        text, ids = await asyncio.to_thread(self.render_chat, req)
        room = self.max_model_len - len(ids)
        if room <= 0:
            raise APIError(400, f"the conversation is {len(ids)} tokens, which fills the model's context of "
                                f"{self.max_model_len} tokens", "messages")
        try:
            params = req.sampling(req.max_new_tokens(room), req.n_logprobs(), None)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        choice = _Choice(ids, text)
        rid, created = request_id("chatcmpl"), now()
        stream = await self.submit([choice], params, req.stream, rid)
        if req.stream:
            return StreamingResponse(self.chat_stream(req, choice, params, stream, rid, created),
                                     media_type="text/event-stream")
        await self.drain(stream, [choice])
        lp = self.chat_logprobs(choice, 0, req.top_logprobs or 0) if req.logprobs else None
        return ChatCompletionResponse(
            id=rid, created=created, model=self.name, usage=self.usage([choice]),
            choices=[ChatChoice(index=0, message=ChatResponseMessage(content=choice.text), logprobs=lp,
                                finish_reason=choice.finish_reason)])

    def render_chat(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The conversation as the template renders it, and its token ids (runs off the event loop)."""
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = self.chat_template.render(messages, req.add_generation_prompt)
        except (ValueError, ChatTemplateError) as e:
            raise APIError(400, str(e), "messages") from e
        return text, self.tokenizer.encodings([text], bool(req.add_special_tokens))[0].ids

    async def chat_stream(self, req: ChatCompletionRequest, c: _Choice, params: SamplingParams,
                          stream: RequestStream, rid: str, created: int) -> AsyncIterator[str]:
        hold = self.hold_back(params)

        def chunk(parts: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            if usage is None and req.continuous_usage:
                usage = self.usage([c])
            return sse(ChatCompletionChunk(id=rid, created=created, model=self.name, choices=parts,
                                           usage=usage).model_dump(exclude_none=True))

        async with stream, aclosing(self.paced(stream)) as batches:
            yield chunk([ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])
            async for batch in batches:
                error = next((u.error for u in batch if u.error), None)
                if error:
                    yield sse({"error": error_body(500, error)})
                    break
                for u in batch:
                    c.apply(u)
                text = c.delta(hold)
                if text or c.finish_reason is not None:
                    lp = self.chat_logprobs(c, c.sent, req.top_logprobs or 0) if req.logprobs else None
                    c.sent = len(c.token_ids)
                    yield chunk([ChatChunkChoice(index=0, delta=DeltaMessage(content=text), logprobs=lp,
                                                 finish_reason=c.finish_reason)])
            else:
                if req.include_usage:
                    yield chunk([], self.usage([c]))
        yield sse("[DONE]")

    # --- /tokenize, /detokenize (vLLM's) -------------------------------------------------------

    def need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, f"{self.name} has no tokenizer")

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        self.need_tokenizer()
        if req.messages is not None:
            if self.chat_template is None:
                raise APIError(400, f"{self.name}'s tokenizer has no chat template", "messages")
            _, ids = await asyncio.to_thread(self.render_chat, req)
        else:
            ids = (await self.encode_all([req.prompt], req.add_special_tokens))[0].prompt_ids
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        self.need_tokenizer()
        choice = (await self.encode_all([req.tokens], True))[0]
        return DetokenizeResponse(prompt=choice.prompt_text)

    # --- /v1/models --------------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name, created=self.created, root=str(self.path),
                                         max_model_len=self.max_model_len)])


class Gate:
    """ASGI middleware run before routing: the API key, then the body size, so that an unauthenticated or
    oversized call costs no parsing (FastAPI reads and parses a body before its dependencies run); and a
    client that goes away mid-stream reads as a disconnect, whatever the transport raises for it."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        receive = self.disconnect_on_error(scope, receive)
        # Under a route prefix (Serve's route_prefix), the path starts with the root path.
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if not path.startswith(self.PROTECTED):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.server.authorized(headers.get("authorization", "")):
            return await self.refuse(scope, receive, send, 401,
                                     "invalid or missing API key: send 'Authorization: Bearer <key>'")
        limit = self.server.limits.max_body_bytes
        too_big = f"the request body is larger than {limit} bytes"
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return await self.refuse(scope, receive, send, 400, f"bad Content-Length {length[:40]!r}")
        if int(length) > limit:
            return await self.refuse(scope, receive, send, 413, too_big)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:  # a chunked body has no length to check up front: count it as it comes
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self.refuse(scope, receive, send, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, which ends a stream early

        await self.app(scope, replay, send)

    @staticmethod
    def disconnect_on_error(scope, receive):
        """Serve's receive raises (TaskCancelledError) when the client has gone: hand the app the disconnect it
        handles (the stream's close logs one line), not an exception that ends as a traceback in the log."""
        async def receive_or_disconnect():
            try:
                return await receive()
            except Exception as e:
                log.debug("receive on %s raised %r: a disconnect", scope.get("path"), e)
                return {"type": "http.disconnect"}
        return receive_or_disconnect

    async def refuse(self, scope, receive, send, status: int, message: str) -> None:
        self.server.metrics.request(scope["path"], status)
        await error_response(status, message)(scope, receive, send)


def tighten_schema(schema: dict, server: OpenAIServer) -> dict:
    """The generated OpenAPI schema with this server's limits as bounds (token ids within the vocabulary,
    max_tokens within the context, prompt and stop counts), so that clients and fuzzers see what it accepts."""
    lim, vocab, context = server.limits, server.args.vocab_size - 1, server.max_model_len

    def ints(node, maximum: int) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                node.pop("exclusiveMaximum", None)
                node["maximum"] = maximum
            for v in node.values():
                ints(v, maximum)
        elif isinstance(node, list):
            for v in node:
                ints(v, maximum)

    def token_ids(node: dict) -> None:  # an array of token ids: at most a context of them
        ints(node, vocab)
        node["maxItems"] = context

    def branches(prop: dict) -> list[dict]:
        return prop.get("anyOf", [prop])

    for model in schema.get("components", {}).get("schemas", {}).values():
        props = model.get("properties", {})
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                ints(props[name], context)
        for name in ("stop_token_ids", "tokens"):
            if name in props:
                for b in branches(props[name]):
                    if b.get("type") == "array":
                        token_ids(b)
        if "prompt" in props:
            for b in branches(props["prompt"]):
                items = b.get("items", {})
                if b.get("type") == "array" and items.get("type") == "integer":
                    token_ids(b)
                elif b.get("type") == "array":
                    b["maxItems"] = lim.max_prompts
                    if items.get("type") == "array":
                        token_ids(items)
        if "stop" in props:
            for b in branches(props["stop"]):
                if b.get("type") == "string":
                    b["maxLength"] = lim.max_stop_chars
                elif b.get("type") == "array":
                    b["maxItems"] = lim.max_stop_strings
                    b["items"]["maxLength"] = lim.max_stop_chars
    return schema


def build_fastapi(server: OpenAIServer) -> FastAPI:
    """The HTTP surface: routes, the API key check, errors shaped as OpenAI's (never a 5xx for bad input)."""
    app = FastAPI(title="raymoe", description="OpenAI-compatible API over a Mixtral-style MoE on Ray",
                  docs_url=None, redoc_url=None)
    app.add_middleware(Gate, server=server)
    generated = app.openapi
    app.openapi = lambda: app.openapi_schema or tighten_schema(generated(), server)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        server.metrics.request(request.url.path, e.status)
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        server.metrics.request(request.url.path, 400)
        message, param = format_validation_errors(e.errors())
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health() -> Response:
        if not server.runner.alive:
            return error_response(503, "the engine thread has stopped")
        if server.runner.degraded:  # requests wait, none is lost; probes and clients can tell
            return JSONResponse({"status": "degraded", "detail": server.runner.degraded}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return server.models()

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest):
        out = await server.completions(req)
        server.metrics.request("/v1/completions", 200)
        return out

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest):
        out = await server.chat(req)
        server.metrics.request("/v1/chat/completions", 200)
        return out

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        return await server.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        return await server.detokenize(req)

    return app
