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
from contextlib import suppress
from dataclasses import dataclass, field

from router.dispatch import Backoff, ExpertsUnavailable
from router.engine import Engine, Sequence
from router.sampling import SamplingParams

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle engine thread checks for shutdown


class EngineDead(RuntimeError):
    """The engine thread has stopped: nothing submitted can run (the replica must be replaced)."""


class QueueFull(RuntimeError):
    """More requests wait for a batch slot than the server queues: the caller should come back later."""


def failure_message(request_id: str) -> str:
    """What a client is told of a server fault: no internals (addresses, traces), only what finds them in the log."""
    return f"the server failed while generating this request (request id {request_id}); the server log has details"


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
    text_offsets: list[int] = field(default_factory=list)  # where each new token's text starts in text


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    final_only: bool  # the caller wants the finished sequence, not every step
    request_id: str
    delivered: int = 0
    read_at: float = field(default_factory=time.monotonic)  # when its caller last took updates


class AsyncEngine:
    """max_waiting: requests' sequences that may wait for a batch slot before new ones get QueueFull.
    stall_timeout_s: a stream whose caller takes no update for this long (a client that stopped reading) is
    aborted, so its sequence frees its batch slot.
    """

    def __init__(self, engine: Engine, on_step: Callable[[Engine, float], None] | None = None, *,
                 max_waiting: int = 1024, stall_timeout_s: float = 60.0):
        self.engine = engine
        self.on_step = on_step  # called on the engine thread after each step with its duration
        self.max_waiting, self.stall_timeout_s = max_waiting, stall_timeout_s
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        # Submissions posted but not yet taken by the engine thread: settled with EngineDead if it dies first.
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._stall_check_at = 0.0
        self._stopped = False
        self.degraded: str | None = None  # why the last step could not run, until one runs again
        self._backoff = Backoff()
        self._thread = threading.Thread(target=self._run, name="raymoe-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    # --- caller side (any event loop) --------------------------------------------------------

    async def submit(self, subs: list[Submission], stream: bool = True,
                     request_id: str | None = None) -> "RequestStream":
        """Add all prompts of one request, or none: raises ValueError (the engine's message) on bad input,
        QueueFull when too many wait already, EngineDead when the engine thread has stopped.

        stream=False delivers each sequence once, finished, which spares the caller's loop a wake-up per step.
        request_id names the request's sequences (`<request_id>-<i>`) in the log and in error messages.
        """
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        updates = Updates()
        base = request_id or uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(subs))]
        with self._lock:  # the check and the registration are one step, against the thread's exit
            if not self.alive:
                raise EngineDead("the engine thread has stopped")
            self._pending[base] = (loop, accepted)
        self._inbox.put(lambda: self._add(subs, ids, base, loop, updates, accepted, not stream))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(ids)
            raise
        return RequestStream(self, ids, updates, self._streams)

    def abort(self, seq_ids: list[str]) -> None:
        self._inbox.put(lambda: self._abort(seq_ids))

    def close(self) -> None:
        self._stopped = True
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    # --- engine thread -----------------------------------------------------------------------

    def _add(self, subs: list[Submission], ids: list[str], request_id: str, loop: asyncio.AbstractEventLoop,
             updates: asyncio.Queue, accepted: asyncio.Future, final_only: bool) -> None:
        with self._lock:
            self._pending.pop(request_id, None)
        if len(self.engine.waiting) + len(subs) > self.max_waiting:
            loop.call_soon_threadsafe(_settle, accepted, QueueFull(
                f"{len(self.engine.waiting)} sequences wait for a batch slot already (at most {self.max_waiting})"))
            return
        added = []
        try:
            for sid, sub in zip(ids, subs, strict=True):
                self.engine.add_request(sub.prompt_ids, sub.params, seq_id=sid, prompt=sub.prompt)
                added.append(sid)
        except Exception as e:  # ValueError: the request's fault; anything else: ours, and it fails this request only
            for sid in added:
                self.engine.abort(sid)
            if not isinstance(e, ValueError):
                log.exception("request %s could not be added", request_id)
                e = RuntimeError(failure_message(request_id))
            loop.call_soon_threadsafe(_settle, accepted, e)
            return
        for i, sid in enumerate(ids):
            self._streams[sid] = _Stream(loop, updates, i, final_only, request_id)
        loop.call_soon_threadsafe(_settle, accepted, None)

    def _abort(self, seq_ids: list[str]) -> None:
        for sid in seq_ids:
            if self._streams.pop(sid, None) is not None:
                self.engine.abort(sid)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.critical("the engine thread died; this replica serves nothing more", exc_info=True)
        finally:
            self._die()

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished():
                try:
                    self._call(self._inbox.get(timeout=IDLE_POLL_S))
                except queue.Empty:
                    continue
            while True:
                try:
                    self._call(self._inbox.get_nowait())
                except queue.Empty:
                    break
            self._abort_stalled()
            if not self.engine.has_unfinished():
                continue
            t = time.perf_counter()
            try:
                try:
                    updated = self.engine.step()
                except ExpertsUnavailable:
                    raise
                except Exception:  # a failed step fails the sequence that fails alone, never the thread
                    log.exception("engine step failed; running its sequences one by one")
                    updated = self.engine.step_alone()
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
            self._post({seq.seq_id: update for seq in updated if (update := self._update(seq)) is not None})
            if self.on_step is not None:
                try:
                    self.on_step(self.engine, time.perf_counter() - t)
                except Exception:
                    log.exception("on_step hook failed")

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a bug in one posted call must not take the thread (and every request) with it
            log.exception("engine call failed")

    def _die(self) -> None:
        """The thread is ending: every request still open or pending gets an error instead of a hang."""
        with self._lock:
            self._stopped = True
            pending, self._pending = list(self._pending.values()), {}
        for loop, fut in pending:
            with suppress(RuntimeError):  # its loop is gone
                loop.call_soon_threadsafe(_settle, fut, EngineDead("the engine thread has stopped"))
        self._post({sid: Update(s.index, [], [], "", s.delivered, "error", error="the engine thread has stopped")
                    for sid, s in self._streams.items()})

    def _abort_stalled(self) -> None:
        """Abort streams whose caller has taken nothing for stall_timeout_s while updates wait for it (looked
        for a few times per timeout, at most once a second, not every step)."""
        now = time.monotonic()
        if now < self._stall_check_at:
            return
        self._stall_check_at = now + min(1.0, self.stall_timeout_s / 4)
        stalled = [sid for sid, s in self._streams.items()
                   if not s.queue.empty() and now - s.read_at > self.stall_timeout_s]
        for sid in stalled:
            s = self._streams[sid]
            log.warning("request %s: its client took no update for %.0fs; aborting it", s.request_id,
                        now - s.read_at)
            self.engine.abort(sid)
            self._post({sid: Update(s.index, [], [], "", s.delivered, "abort",
                                    error="aborted: the client stopped reading")})

    def _wait(self, seconds: float) -> None:
        """Serve the inbox for `seconds` (or until it stops)."""
        deadline = time.monotonic() + seconds
        while not self._stopped and (left := deadline - time.monotonic()) > 0:
            try:
                self._call(self._inbox.get(timeout=left))
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
                        n, seq.finish_reason, list(seq.prompt_logprobs) if first else None,
                        error=failure_message(s.request_id) if seq.error else None,
                        text_offsets=seq.output_offsets[s.delivered:n])
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
    streams: dict[str, _Stream]  # the engine's, to mark when this caller last read
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
        now = time.monotonic()
        for i in self._open:
            if (s := self.streams.get(self.seq_ids[i])) is not None:
                s.read_at = now
        for u in batch:
            if u.finish_reason is not None:
                self._open.discard(u.index)
        return batch

    def close(self) -> None:
        if self._open:  # the caller stopped before the end: its client went away, or the stream failed
            log.info("request %s closed before the end; %d of its sequences aborted",
                     self.seq_ids[0].rsplit("-", 1)[0], len(self._open))
            self.engine.abort([self.seq_ids[i] for i in self._open])
            self._open.clear()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
