"""The engine on one background thread, shared by every request of an asyncio server.

The Engine is not thread-safe, so only the engine thread touches it: callers post closures to its
inbox, and it posts each step's per-sequence updates to the callers' asyncio queues.
"""

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from router.dispatch import Backoff, ExpertsUnavailable
from router.engine import Engine, Sequence
from router.sampling import SamplingParams

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle engine thread checks for shutdown


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass
class Update:
    """What one step did to one sequence of a request: the tokens it added and where it stands."""

    index: int  # which prompt of the request
    token_ids: list[int]  # new since the previous update
    logprobs: list[dict[int, float]]  # for the new tokens, when asked for
    text: str  # the whole output text so far
    num_output_tokens: int
    finish_reason: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on the first update, when asked for
    error: str | None = None  # the engine failed this sequence (a server fault, not the client's)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    final_only: bool  # the caller wants the finished sequence, not every step
    delivered: int = 0


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[Engine, float], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called on the engine thread after each step with its duration
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self.degraded: str | None = None  # why the last step could not run, until one runs again
        self._backoff = Backoff()
        self._thread = threading.Thread(target=self._run, name="raymoe-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- caller side (any event loop) --------------------------------------------------------

    async def submit(self, subs: list[Submission], stream: bool = True) -> "RequestStream":
        """Add all prompts of one request, or none: raises ValueError (the engine's message) on bad input.

        stream=False delivers each sequence once, finished, which spares the caller's loop a wake-up per step.
        """
        if not self.alive:
            raise RuntimeError("the engine thread has stopped")
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        updates = Updates()
        base = uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(subs))]
        self._inbox.put(lambda: self._add(subs, ids, loop, updates, accepted, not stream))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(ids)
            raise
        return RequestStream(self, ids, updates)

    def abort(self, seq_ids: list[str]) -> None:
        self._inbox.put(lambda: self._abort(seq_ids))

    def close(self) -> None:
        self._stopped = True
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    # --- engine thread -----------------------------------------------------------------------

    def _add(self, subs: list[Submission], ids: list[str], loop: asyncio.AbstractEventLoop,
             updates: asyncio.Queue, accepted: asyncio.Future, final_only: bool) -> None:
        added = []
        try:
            for sid, sub in zip(ids, subs, strict=True):
                self.engine.add_request(sub.prompt_ids, sub.params, seq_id=sid, prompt=sub.prompt)
                added.append(sid)
        except ValueError as e:
            for sid in added:
                self.engine.abort(sid)
            loop.call_soon_threadsafe(_settle, accepted, e)
            return
        for i, sid in enumerate(ids):
            self._streams[sid] = _Stream(loop, updates, i, final_only)
        loop.call_soon_threadsafe(_settle, accepted, None)

    def _abort(self, seq_ids: list[str]) -> None:
        for sid in seq_ids:
            if self._streams.pop(sid, None) is not None:
                self.engine.abort(sid)

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished():
                try:
                    self._inbox.get(timeout=IDLE_POLL_S)()
                except queue.Empty:
                    continue
            while True:
                try:
                    self._inbox.get_nowait()()
                except queue.Empty:
                    break
            if not self.engine.has_unfinished():
                continue
            t = time.perf_counter()
            try:
                updated = self.engine.step()
                self.degraded = None
                self._backoff.succeeded()
            except ExpertsUnavailable as e:
                # Nothing is lost: the step runs again after a backoff, during which the inbox (new requests,
                # aborts) is still served, rather than blocking on the missing experts.
                if self.degraded is None:
                    log.warning("experts unavailable, retrying with backoff: %s", e)
                self.degraded = str(e)
                self._wait(self._backoff.failed())
                continue
            except Exception as e:  # a failed step fails its sequences, never the thread
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {e}")
                continue
            self._post({seq.seq_id: update for seq in updated if (update := self._update(seq)) is not None})
            if self.on_step is not None:
                try:
                    self.on_step(self.engine, time.perf_counter() - t)
                except Exception:
                    log.exception("on_step hook failed")

    def _wait(self, seconds: float) -> None:
        """Serve the inbox for `seconds` (or until it stops)."""
        deadline = time.monotonic() + seconds
        while not self._stopped and (left := deadline - time.monotonic()) > 0:
            try:
                self._inbox.get(timeout=left)()
            except queue.Empty:
                return

    def _update(self, seq: Sequence) -> Update | None:
        s = self._streams.get(seq.seq_id)
        if s is None or (s.final_only and not seq.finished):
            return None
        n = len(seq.output_ids)
        # A sequence's first update comes when its prefill is done, so its prompt log-probs are complete.
        first = s.delivered == 0 and seq.params.prompt_logprobs is not None
        update = Update(s.index, seq.output_ids[s.delivered:n], seq.output_logprobs[s.delivered:n], seq.text,
                        n, seq.finish_reason, list(seq.prompt_logprobs) if first else None)
        s.delivered = n
        return update

    def _post(self, updates: dict[str, Update]) -> None:
        """Hand a step's updates over with one call per event loop, not one per sequence."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Update]]] = {}
        for sid, update in updates.items():
            s = self._streams[sid]
            by_loop.setdefault(s.loop, []).append((s.queue, update))
            if update.finish_reason is not None:
                del self._streams[sid]
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the callers' loop is gone: nobody is listening
                for sid, s in list(self._streams.items()):
                    if s.loop is loop:
                        del self._streams[sid]
                        self.engine.abort(sid)

    def _fail_all(self, message: str) -> None:
        for sid in self._streams:
            self.engine.abort(sid)
        self._post({sid: Update(s.index, [], [], "", s.delivered, "error", error=message)
                    for sid, s in self._streams.items()})


class Updates(asyncio.Queue):
    """A request's queue of updates that also tells when one of its sequences has finished."""

    def __init__(self):
        super().__init__()
        self.finished = asyncio.Event()

    def put_nowait(self, update: Update) -> None:
        super().put_nowait(update)
        if update.finish_reason is not None:
            self.finished.set()


def _put_all(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for q, update in items:
        q.put_nowait(update)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


@dataclass
class RequestStream:
    """The updates of one request's sequences; aborts whatever is unfinished when closed."""

    engine: AsyncEngine
    seq_ids: list[str]
    updates: Updates
    _open: set[int] = field(default_factory=set)

    def __post_init__(self):
        self._open = set(range(len(self.seq_ids)))

    @property
    def done(self) -> bool:
        return not self._open

    async def next_batch(self) -> list[Update]:
        """Wait for one update, then take all that are ready: a busy server sends fewer, larger chunks."""
        batch = [await self.updates.get()]
        while not self.updates.empty():
            batch.append(self.updates.get_nowait())
        for u in batch:
            if u.finish_reason is not None:
                self._open.discard(u.index)
        return batch

    def close(self) -> None:
        if self._open:
            self.engine.abort([self.seq_ids[i] for i in self._open])
            self._open.clear()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
