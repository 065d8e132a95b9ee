"""The gRPC dispatch backend: per layer, scatter tokens to the replicas owning their experts, gather sums.

A shard's tokens spread over all its live replicas by expert (router.rendezvous: consistent hashing of
(layer, expert) with bounded loads, weighted by the load each replica reports on its replies): a replica's
call holds the tokens of few experts, so its matmuls have more rows, every router sends an expert's tokens
to the same replica, one more replica takes load off every other, and a sequence that keeps its expert
keeps its replica. The locality-blind baseline (group_by_expert off) spreads whole rows by row number.
One message per replica touched per layer,
all in flight at once, each with a deadline. A replica that fails or is too slow becomes suspect for
this router (reported to the directory, which re-checks it), and its tokens go to another replica of
the same shard: a dying replica costs latency, not a request. A shard with no replica left makes the
call fail fast with ShardUnavailable, so the engine can retry later instead of sleeping on it.

Which shards hold a (layer, expert) comes from the app's active placement (the deployed plan, or the
one a rebalance switched to); routers count the tokens they route to each pair and report them, for
the rebalancer, and the critical path of every layer: how long the router waited and which shard answered
last, the load signal the autoscaler sizes shards by (a shard's busy fraction cannot see that the whole
batch waits on it). A replica that no longer holds a pair (the router missed a switch) answers
FAILED_PRECONDITION, and the router re-reads the placement and sends the layer again.

The calls run on grpc.aio channels of a private event loop that the calling (engine) thread itself
runs for the length of each layer's gather: no hand-off to another Python thread on the hot path,
which on a busy CPU costs more than the whole transport.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
import torch

from experts.security import ClientTLS, call_metadata, replica_channel
from experts.wire import WIRE_NAMES, WireError, array_to_wire, from_wire, grpc_options, raw_rows
from protos import expert_pb2, expert_pb2_grpc
from router.dispatch import ExpertBackend, ExpertsUnavailable
from router.rendezvous import group_by_expert, mix64, spread

log = logging.getLogger(__name__)

# RESOURCE_EXHAUSTED: the replica serves its most concurrent calls already (or a message overflowed a limit,
# which the router's own limit, the replicas' smallest, rules out): another replica may have room. The
# replica is busy, not broken: this router leaves it alone a while but reports no failure.
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED
RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, BUSY}
RECENT_DECAY = 0.95  # per call of a shard: a replica's recent slots reach back over about 20 of its shard's calls
NUDGE_GAIN = 4  # a replica 20% over its share of slots weighs (1 / 1.2)^4 = 0.48 of what it would
MAX_NUDGE = 4.0  # and at most this factor either way
STALE_RETRIES = 5  # re-reads of the placement after a replica says it no longer holds a pair


class ExpertDispatchError(RuntimeError):
    """A replica refused a request (not a transport failure): a bug or a bad plan, not a passing fault."""


class ShardUnavailable(ExpertDispatchError, ExpertsUnavailable):
    """Every replica of a shard failed or none is registered: retry the step later."""

    def __init__(self, shard: int, why: str):
        super().__init__(f"expert shard {shard} has no replica that answers: {why}")
        self.shard = shard


class BadReply(ExpertDispatchError):
    """A reply that does not answer its request (rows, width, dtype or bytes): the replica is treated as failed."""


def reply_output(reply: expert_pb2.ForwardResponse, req: expert_pb2.ForwardRequest, dtype: torch.dtype
                 ) -> torch.Tensor:
    """The reply's (N, dim) output, checked against the request's N tokens of width dim: a wrong row count
    would otherwise broadcast into, or be dropped from, the tokens' sums."""
    want = list(req.hidden.shape)
    try:
        out = from_wire(reply.output, "output", dtype, ndim=2)
    except WireError as e:
        raise BadReply(str(e)) from None
    if list(out.shape) != want:
        raise BadReply(f"output: shape {list(out.shape)} for a request of shape {want}")
    return out


class StalePlacement(ExpertDispatchError):
    """A replica does not hold what this router's placement says it does: re-read the placement."""


class ReplicaSource(Protocol):
    """Where the router learns replica addresses and the placement (the cluster's directory), and reports
    failing replicas and the tokens it routed."""

    def view(self) -> dict:
        """{"replicas": entries with shard, replica_id, address, max_message_bytes, pairs [[layer, expert], ...]
        and (optionally) "ready": placement versions it can serve; "placement": the active placement record
        {"version", "shards": [pairs of each shard]}, or None for the deployed plan (version 0)}."""

    def report_failure(self, address: str) -> None: ...

    def report_load(self, tokens: list, critical_s: list, waiting: int) -> None:
        """Since the last report: (L, E) tokens routed to each (layer, expert); per shard, the seconds of layer
        waits it ended (it answered last); and the requests now waiting for a batch slot."""


@dataclass(frozen=True)
class Replica:
    replica_id: str
    address: str
    seed: int  # of the replica's hash stream: where the sequences it ranks first are
    tls: ClientTLS | None = None  # how to check its certificate; None: plaintext


@dataclass(frozen=True)
class Routing:
    """One consistent view: the placement version, its holder table and the replicas that serve it."""

    version: int
    holders: np.ndarray  # (L, E, H) shard ids holding each pair, padded with -1
    n_holders: np.ndarray  # (L, E)
    standby: np.ndarray  # (L, E, S) shards keeping each pair loaded for when all its holders are down, padded with -1
    replicas: dict[int, list[Replica]]  # shard -> replicas ready for this version
    planned: np.ndarray | None = None  # (G,) replicas per shard the placement was planned for; None: not recorded

    @property
    def num_shards(self) -> int:
        return int(self.holders.max()) + 1


def placement_in_force(view: dict) -> tuple[int, dict[int, list], dict[int, list]]:
    """(version, shard -> its pairs, shard -> its standby pairs) of the placement routers follow, from a
    ReplicaSource view: the active record once some replica is ready for it, else the deployed plan (version 0,
    no standby), whose pairs the entries ready for it list. A record left from another deployed plan never
    counts: no replica is ready for it."""
    record, entries = view["placement"], view["replicas"]
    if record and any(record["version"] in e.get("ready", (0,)) for e in entries):
        return record["version"], dict(enumerate(record["shards"])), dict(enumerate(record.get("standby", [])))
    return 0, {e["shard"]: e["pairs"] for e in entries if 0 in e.get("ready", (0,))}, {}


def holder_table(entries: list[dict], n_layers: int, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The shards holding each (layer, expert), checked to cover the model: (L, E, H) shard ids padded
    with -1, and (L, E) how many. A hot pair may be held by several shards (redundant copies)."""
    holders: dict[tuple[int, int], set[int]] = {}
    for e in entries:
        for l, x in e["pairs"]:
            if not (0 <= l < n_layers and 0 <= x < n_experts):
                raise ExpertDispatchError(f"shard {e['shard']} claims ({l}, {x}), outside this model's "
                                          f"{n_layers} layers x {n_experts} experts")
            holders.setdefault((l, x), set()).add(e["shard"])
    missing = [(l, x) for l in range(n_layers) for x in range(n_experts) if (l, x) not in holders]
    if missing:
        raise ExpertDispatchError(f"no replica holds (layer, expert) {missing[:4]}: the plan does not cover "
                                  "this model")
    table = shard_table(holders, n_layers, n_experts)
    return table, (table >= 0).sum(axis=2)


def standby_table(standby: dict[int, list], n_layers: int, n_experts: int) -> np.ndarray:
    """shard -> its standby pairs -> (L, E, S) the shards keeping each (layer, expert) on standby, padded with -1."""
    keep: dict[tuple[int, int], set[int]] = {}
    for shard, pairs in standby.items():
        for l, x in pairs:
            if 0 <= l < n_layers and 0 <= x < n_experts:
                keep.setdefault((l, x), set()).add(shard)
    return shard_table(keep, n_layers, n_experts)


def shard_table(shards_of: dict[tuple[int, int], set[int]], n_layers: int, n_experts: int) -> np.ndarray:
    """(layer, expert) -> shards -> (L, E, W) their ids ascending, padded with -1 to the most any pair has (W >= 1)."""
    table = np.full((n_layers, n_experts, max(map(len, shards_of.values()), default=1)), -1, dtype=np.int64)
    for (l, x), shards in shards_of.items():
        table[l, x, : len(shards)] = sorted(shards)
    return table


def copy_of(layer: int, ids: np.ndarray, keys: np.ndarray, n_holders: np.ndarray, share: np.ndarray | None = None
            ) -> np.ndarray:
    """ids (T, k) experts of `layer`, keys (T,) sequences, n_holders (E,) copies of each, share (E, H) each copy's
    weight (None: all alike) -> (T, k) which copy.

    A pair held by several shards splits this call's tokens evenly among its copies (to within one), in
    the order of a hash of (sequence, pair): ranges of that order go to one copy each, so a sequence
    tends to keep its copy from step to step, and no copy gets more than its share, which hashing each
    sequence on its own would give it with a few dozen sequences. Which copies take the odd tokens rotates
    with the lowest hash: fixed, the first copy (the lowest shard) would take them in every call, half
    again its share when calls carry a token or two of a pair, as decode steps do. Copies of unlike weights
    split the tokens in proportion: the n tokens by hash sit at (rank + offset) / n, with an offset in [0, 1)
    drawn from the lowest hash, and each copy takes those in its part of [0, 1), so that its expected tokens are
    its share even in calls of one token.

    Example: expert 3 has 2 copies and 5 of this call's tokens; by hash they rank [t4, t0, t2, t1, t3]:
    rank * 2 // 5 gives [0, 0, 0, 1, 1]; rotated by t4's hash, say by 1: t4, t0, t2 go to copy 1; t1, t3
    to copy 0. With weights [1, 0.5] (parts [0, 2/3) and [2/3, 1)), offset 0.5: the points (rank + 0.5) / 5
    are [0.1, 0.3, 0.5, 0.7, 0.9], so t4, t0, t2 go to copy 0; t1, t3 to copy 1.
    """
    n = n_holders[ids]  # (T, k)
    pick = np.zeros(ids.size, dtype=np.int64)
    multi = n.ravel() > 1
    if multi.any():
        h = mix64(keys.astype(np.uint64)[:, None] ^ (ids.astype(np.uint64) + np.uint64(layer << 16))).ravel()
        flat = ids.ravel()
        for e in np.unique(flat[multi]).tolist():
            at = np.flatnonzero(flat == e)
            order = at[np.argsort(h[at], kind="stable")]
            copies = int(n_holders[e])
            w = None if share is None else share[e, :copies]
            if w is None or not w.sum() > 0 or np.all(w == w[0]):
                pick[order] = (np.arange(len(at)) * copies // len(at) + int(h[order[0]] % np.uint64(copies))) % copies
                continue
            offset = float(mix64(h[order[:1]])[0] >> np.uint64(11)) * 2.0**-53  # in [0, 1); the lowest hash is low
            at_point = (np.arange(len(at)) + offset) / len(at)  # (n,) each token's point in [0, 1), by rank
            pick[order] = np.minimum(np.searchsorted(np.cumsum(w) / w.sum(), at_point, side="right"), copies - 1)
    return pick.reshape(ids.shape)


def copy_weights(holders: np.ndarray, n_live: np.ndarray, planned: np.ndarray | None) -> np.ndarray | None:
    """holders (E, H) one layer's shards, n_live (G,) each shard's live replicas, planned (G,) those the placement
    was planned for -> (E, H) each copy's weight, n_live / planned of its shard. A shard that lost a replica
    (failed, or suspect to this router) takes less of the pairs it shares at once, and one that gained a replica
    more, until the re-placement that the change of counts calls for plans for them; None (all alike) where the
    placement has no planned counts.

    Example: shards 0 and 1 planned for 2 replicas each, shard 0 down to 1 live: a pair held by [0, 1] weighs
    [0.5, 1.0], so shard 0 takes a third of its tokens."""
    if planned is None:
        return None
    ratio = n_live / planned  # (G,)
    return np.where(holders >= 0, ratio[np.maximum(holders, 0)], 0.0)


def shards_down(n_live: np.ndarray) -> set[int]:
    """(G,) live replicas of each shard -> the shards with none."""
    return set(np.flatnonzero(n_live == 0).tolist())


def around(holders: np.ndarray, n_holders: np.ndarray, down: set[int], standby: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """One layer's holders (E, H) and their counts (E,) with the shards in `down` left out of every pair that has
    another holder up; a pair all of whose holders are down goes to those of its standby holders (E, S) that are
    up; a pair with nowhere else to go keeps its holders (its call fails and the step is retried).

    Example: expert 0 held by shards [2, 5], expert 1 by [5, -1], expert 2 by [5, -1] with standby [3], shard 5
    down -> expert 0 [2, -1] (one copy), expert 1 [5, -1] (no other holder), expert 2 [3, -1].
    """
    if not down:
        return holders, n_holders
    gone = list(down)
    up = (holders >= 0) & ~np.isin(holders, gone)  # (E, H)
    n_up = up.sum(axis=1)  # (E,)
    if standby is None:
        standby = np.full((len(holders), 1), -1, dtype=holders.dtype)
    spare = (standby >= 0) & ~np.isin(standby, gone)  # (E, S)
    moved = np.flatnonzero(((n_up > 0) & (n_up < n_holders)) | ((n_up == 0) & spare.any(axis=1)))
    if not len(moved):
        return holders, n_holders
    width = max(holders.shape[1], standby.shape[1])
    holders = np.pad(holders, ((0, 0), (0, width - holders.shape[1])), constant_values=-1)
    n_holders = n_holders.copy()
    for e in moved.tolist():
        live = holders[e, : up.shape[1]][up[e]] if n_up[e] else standby[e][spare[e]]
        holders[e] = -1
        holders[e, : len(live)] = live
        n_holders[e] = len(live)
    return holders, n_holders


def load_weight(busy: float) -> float:
    """How much of a fair share a replica reporting `busy` should get: less as it nears saturation."""
    return min(1.0, max(0.1, 1.1 - busy))


def nudge(weights: np.ndarray, recent: np.ndarray) -> np.ndarray:
    """Replicas' rendezvous weights (R,) corrected by their recent slots (R,): each scaled by (its weighted share
    over its share of the recent slots) ** NUDGE_GAIN, within [1 / MAX_NUDGE, MAX_NUDGE]. Grouping by expert
    puts an expert's slots on one replica, so with few experts a shard, one replica can take the hot ones call
    after call; the weights move experts off a replica while it gets more than its share, and back once it
    gets less, so that over many calls the replicas' slots even out.

    Example: two replicas of weight 1, recent slots [30, 10]: shares 0.75 and 0.25 against 0.5 each ->
    (0.5 / 0.75) ** 4 = 0.2, at the bound 0.25, and (0.5 / 0.25) ** 4 = 16, at the bound 4: weights [0.25, 4].
    """
    total = recent.sum()
    if total <= 0:
        return weights
    factor = ((weights / weights.sum()) / np.maximum(recent / total, 1e-9)) ** NUDGE_GAIN
    return weights * np.clip(factor, 1 / MAX_NUDGE, MAX_NUDGE)


class GrpcExperts(ExpertBackend):
    overlaps_calls = True  # a round trip per layer: worth hiding behind the other micro-batch's attention

    def __init__(self, source: ReplicaSource, n_layers: int, n_experts: int, *, timeout_s: float = 10.0,
                 refresh_s: float = 0.5, suspect_s: float = 2.0, max_message_bytes: int | None = None,
                 token: str | None = None, group_by_expert: bool = True):
        """timeout_s: deadline of each call; refresh_s: how often the view is re-read from the source;
        suspect_s: how long a replica that failed is left out by this router before it is tried again;
        token: the application's data-plane token, sent with every call; group_by_expert: a shard's slots go to
        its replicas by expert (False: rows spread by row number, the locality-blind baseline)."""
        self.group_by_expert = group_by_expert
        self.source, self.timeout_s, self.suspect_s = source, timeout_s, suspect_s
        self.metadata = call_metadata(token)
        self.n_layers, self.n_experts = n_layers, n_experts
        view = source.view()
        entries = view["replicas"]
        if not entries:
            raise ExpertDispatchError("the replica source lists no expert replicas")
        self.routing = self._routing(view, None)
        self.max_message_bytes = max_message_bytes or min(e["max_message_bytes"] for e in entries)
        self._loop = asyncio.new_event_loop()
        self._loop_lock = threading.Lock()  # one thread at a time runs the loop
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None  # for callers inside a running loop
        # address -> (channel, stub), used on the private loop only
        self._channels: dict[str, tuple[grpc.aio.Channel, expert_pb2_grpc.ExpertServiceStub]] = {}
        self.suspect: dict[str, float] = {}  # replica_id -> monotonic time it may be tried again
        self.busy: dict[str, float] = {}  # replica_id -> the busy fraction its last reply reported
        self.rows_sent: dict[str, int] = {}  # replica_id -> rows this router sent it (for tests and status)
        self.slots_sent: dict[str, int] = {}  # replica_id -> (token, expert) slots it computed: its work
        self.recent_slots: dict[str, float] = {}  # replica_id -> slots placed on it lately (decaying), for place()
        self.messages_sent = 0  # Forward calls this router made, retries included (for benchmarks)
        self.tokens = np.zeros((n_layers, n_experts), dtype=np.int64)  # routed since the last report
        self.critical_s: dict[int, float] = {}  # shard -> seconds of layer waits it ended, since the last report
        self.waiting = 0  # requests waiting for a batch slot, as the batching engine last said (note_waiting)
        self._tokens_lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, args=(refresh_s,), name="expert-view",
                                           daemon=True)
        self._refresher.start()

    # --- the view of live replicas --------------------------------------------------------------

    def _routing(self, view: dict, old: Routing | None) -> Routing:
        """The placement in force and the replicas ready for it; a holder table that would not cover the model
        (a shard with no replica left) keeps the old one."""
        version, pairs, standby = placement_in_force(view)
        ready = [e for e in view["replicas"] if version in e.get("ready", (0,))]
        replicas: dict[int, list[Replica]] = {}
        for e in sorted(ready, key=lambda e: e["replica_id"]):
            replicas.setdefault(e["shard"], []).append(
                Replica(e["replica_id"], e["address"], zlib.crc32(e["replica_id"].encode()), ClientTLS.from_entry(e)))
        record = view["placement"]
        planned = (np.array(record["capacity"], dtype=np.float64)
                   if version and record and record["version"] == version and record.get("capacity") else None)
        if old is not None and old.version == version and version:
            return Routing(version, old.holders, old.n_holders, old.standby, replicas, planned)
        try:
            holders, n_holders = holder_table([{"shard": s, "pairs": ps} for s, ps in pairs.items()],
                                              self.n_layers, self.n_experts)
        except ExpertDispatchError:
            if old is None:
                raise
            holders, n_holders = old.holders, old.n_holders  # a shard with no replica left: keep its pairs
        if old is not None and old.version != version:
            log.info("expert placement version %d -> %d", old.version, version)
        return Routing(version, holders, n_holders, standby_table(standby, self.n_layers, self.n_experts), replicas,
                       planned)

    @property
    def view(self) -> dict[int, list[Replica]]:
        return self.routing.replicas

    @property
    def num_shards(self) -> int:
        return self.routing.num_shards

    def refresh(self) -> None:
        view = self.source.view()
        if view["replicas"]:  # an empty answer is a directory that just restarted: keep what we know
            self.routing = self._routing(view, self.routing)

    def _try_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # the directory may be briefly unreachable; the old view still works
            log.warning("could not refresh the expert replica view: %r", e)

    def note_waiting(self, n: int) -> None:
        self.waiting = n

    def forget_load(self) -> None:
        """Drop the load routed since the last report (a warm-up that is not the traffic to balance or scale on)."""
        with self._tokens_lock:
            self.tokens, self.critical_s = np.zeros_like(self.tokens), {}

    def _report_load(self) -> None:
        with self._tokens_lock:
            counts, self.tokens = self.tokens, np.zeros_like(self.tokens)
            critical, self.critical_s = self.critical_s, {}
        if counts.any() or critical or self.waiting:
            per_shard = [critical.get(s, 0.0) for s in range(self.num_shards)]
            try:
                self.source.report_load(counts.tolist(), per_shard, self.waiting)
            except Exception as e:  # a lost report only blurs the rebalancer's and the autoscaler's picture
                log.warning("could not report routed load: %r", e)

    def _refresh_loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self._try_refresh()
            self._report_load()

    def live(self, shard: int, routing: Routing | None = None) -> list[Replica]:
        """The shard's replicas this router does not suspect right now."""
        now = time.monotonic()
        reps = (routing or self.routing).replicas.get(shard, [])
        return [r for r in reps if self.suspect.get(r.replica_id, 0.0) <= now]

    def live_counts(self, routing: Routing) -> np.ndarray:
        """(G,) how many replicas of each shard this router would call now, over every shard of the placement."""
        shards = routing.num_shards if routing.planned is None else len(routing.planned)  # the record's, all of them
        return np.array([len(self.live(s, routing)) for s in range(shards)])

    def down(self, routing: Routing | None = None) -> set[int]:
        """Shards none of whose replicas this router would call now."""
        return shards_down(self.live_counts(routing or self.routing))

    def unavailable_shards(self) -> list[int]:
        """Shards with no replica this router would call now (for /health)."""
        return sorted(self.down())

    def _suspect(self, rep: Replica, shard: int, why: str, report: bool = True) -> None:
        """Leave `rep` out for suspect_s; report it to the directory (which re-checks it) unless it is only busy."""
        log.warning("expert replica %s (shard %d) suspect for %.1fs: %s", rep.address, shard, self.suspect_s, why)
        self.suspect[rep.replica_id] = time.monotonic() + self.suspect_s
        if not report:
            return
        chan = self._channels.pop(rep.address, None)
        if chan is not None:
            self._loop.create_task(chan[0].close())
        try:
            self.source.report_failure(rep.address)
        except Exception as e:  # the retry matters more than the report
            log.warning("could not report %s to the directory: %r", rep.address, e)

    def open_channel(self, rep: Replica) -> grpc.aio.Channel:
        """A channel to `rep` as this router's own: TLS as it registered, this router's message limit."""
        return replica_channel(rep.address, rep.tls, grpc_options(self.max_message_bytes))

    def _stub(self, rep: Replica) -> expert_pb2_grpc.ExpertServiceStub:
        """Only on the private loop: aio channels belong to the loop that made them."""
        chan = self._channels.get(rep.address)
        if chan is None:
            ch = self.open_channel(rep)
            chan = self._channels[rep.address] = (ch, expert_pb2_grpc.ExpertServiceStub(ch))
        return chan[1]

    def _run(self, coro):
        """Run `coro` to completion on the private loop, in this thread unless it already runs a loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            with self._loop_lock:
                return self._loop.run_until_complete(coro)
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-dispatch")
        return self._helper.submit(self._run, coro).result()

    def candidates(self, shard: int, routing: Routing | None = None) -> list[Replica]:
        """Who may take the shard's tokens: the live replicas, else (all suspect) every registered one,
        since a suspect that answers again is better than no answer."""
        routing = routing or self.routing
        reps = self.live(shard, routing) or routing.replicas.get(shard, [])
        if not reps:
            raise ShardUnavailable(shard, "no replica is registered")
        return reps

    # --- scatter / gather -------------------------------------------------------------------------

    def requests(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                 keys: np.ndarray | None = None, routing: Routing | None = None
                 ) -> list[tuple[int, Replica, np.ndarray, expert_pb2.ForwardRequest]]:
        """(shard, replica, rows, request) per message: x's tokens bound for each shard, spread over its replicas.

        Index work and row gathers run in numpy, single-threaded: a torch op this small would wake
        torch's worker threads, asleep after the last gRPC wait, which on a busy CPU costs milliseconds.
        """
        routing = routing or self.routing
        ids = expert_ids.cpu().numpy()  # (T, k)
        w = weights.float().cpu().numpy()  # (T, k)
        x_raw = raw_rows(x)  # (T, dim) of same-size integers: rows of raw bytes
        if keys is None or not self.group_by_expert:  # the locality-blind baseline knows no sequences either
            keys = np.arange(len(ids), dtype=np.int64)
        # A shard none of whose replicas answers loses its pairs to their other holders (redundant copies), or else
        # to their standby holders.
        n_live = self.live_counts(routing)  # (G,)
        holders, n_holders = around(routing.holders[layer], routing.n_holders[layer],
                                    shards_down(n_live), routing.standby[layer])
        shard_of = holders[ids, copy_of(layer, ids, keys, n_holders, copy_weights(holders, n_live, routing.planned))]
        row_bytes = x.shape[1] * x.element_size() + ids.shape[1] * 8
        max_rows = max(1, (self.max_message_bytes - 4096) // row_bytes)
        name = WIRE_NAMES[x.dtype]
        out = []
        for s in np.unique(shard_of).tolist():
            reps = self.candidates(s, routing)
            place = self.place(layer, ids, shard_of == s, keys, reps)  # (T, k)
            for j, rep in enumerate(reps):
                mine = place == j  # (T, k)
                rows = np.flatnonzero(mine.any(axis=1))  # (N,)
                sub_ids = np.where(mine, ids, -1)  # (T, k)
                for i in range(0, len(rows), max_rows):
                    r = rows[i : i + max_rows]
                    hidden = expert_pb2.Tensor(dtype=name, shape=[len(r), x.shape[1]], data=x_raw[r].tobytes())
                    out.append((s, rep, r, expert_pb2.ForwardRequest(
                        layer=layer, hidden=hidden, expert_ids=array_to_wire(sub_ids[r].astype(np.int32)),
                        weights=array_to_wire(w[r]))))
        return out

    def place(self, layer: int, ids: np.ndarray, here: np.ndarray, keys: np.ndarray, reps: list[Replica]
              ) -> np.ndarray:
        """Which of `reps` (one shard's candidates) computes each slot: ids (T, k) the call's experts, here (T, k)
        the slots bound for this shard, keys (T,) each row's sequence -> (T, k) replica index, -1 off the shard.

        Grouping on: slots by expert (group_by_expert), so each replica's call holds few experts, the replicas'
        weights nudged toward an even share of the slots this router placed lately (nudge). Off: whole rows by
        `keys` (spread), which the blind baseline gives as row numbers.

        Example: rows 0 (experts 1, 5), 1 (1, 3) and 2 (7, 0), a shard of 2 replicas holding 1, 3 and 7: 4 slots,
        room 3 each. Grouped, expert 1's two slots go to its replica, say 0; row 1's expert 3 (one slot) joins
        them; expert 7 (one slot) goes to replica 1, replica 0 being full: [[0, -1], [0, 0], [1, -1]].
        """
        place = np.full(ids.shape, -1, dtype=np.int64)
        if len(reps) == 1:
            place[here] = 0
            return place
        seeds = np.array([r.seed for r in reps], dtype=np.int64)
        load = np.array([load_weight(self.busy.get(r.replica_id, 0.0)) for r in reps])
        recent = np.array([self.recent_slots.get(r.replica_id, 0.0) for r in reps])
        if self.group_by_expert:
            rows, cols = np.nonzero(here)  # (n,) each, row-major: a row's slots side by side
            place[rows, cols] = group_by_expert(layer, ids[rows, cols], keys[rows], rows, seeds, nudge(load, recent))
        else:
            rows = np.flatnonzero(here.any(axis=1))  # (N,)
            place[rows] = spread(keys[rows], seeds, load)[:, None]
            place[~here] = -1
        slots = np.bincount(place[place >= 0], minlength=len(reps))  # (R,)
        for r, n in zip(reps, (recent * RECENT_DECAY + slots).tolist(), strict=True):
            self.recent_slots[r.replica_id] = n
        return place

    async def _gather(self, layer: int, messages: list[tuple[int, Replica, expert_pb2.ForwardRequest]],
                      dtype: torch.dtype) -> list[torch.Tensor]:
        results: list[torch.Tensor | None] = [None] * len(messages)
        target = [rep for _, rep, _ in messages]
        tried: list[set[str]] = [set() for _ in messages]
        pending = list(range(len(messages)))
        start = time.perf_counter()
        answered = [start] * len(messages)

        async def call(i: int) -> tuple[torch.Tensor, float]:
            req = messages[i][2]
            self.messages_sent += 1
            reply = await self._stub(target[i]).Forward(req, timeout=self.timeout_s, metadata=self.metadata)
            answered[i] = time.perf_counter()
            return reply_output(reply, req, dtype), reply.busy

        while pending:
            replies = await asyncio.gather(*[call(i) for i in pending], return_exceptions=True)
            failed = []
            for i, reply in zip(pending, replies, strict=True):
                shard, rep = messages[i][0], target[i]
                if not isinstance(reply, BaseException):
                    results[i], self.busy[rep.replica_id] = reply
                    continue
                busy = False  # a replica at its concurrency cap is alive: try another, report nothing
                if isinstance(reply, BadReply):
                    why = f"bad reply to layer {layer}: {reply}"
                elif isinstance(reply, grpc.RpcError):
                    if reply.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        raise StalePlacement(f"shard {shard} replica {rep.address}: {reply.details()}") from None
                    if reply.code() not in RETRIABLE:
                        raise ExpertDispatchError(f"shard {shard} replica {rep.address} refused layer "
                                                  f"{layer}: {reply.code().name}: {reply.details()}") from None
                    why, busy = f"{reply.code().name}: {reply.details()}", reply.code() == BUSY
                else:
                    raise reply
                tried[i].add(rep.replica_id)
                self._suspect(rep, shard, why, report=not busy)
                others = [r for r in self.candidates(shard) if r.replica_id not in tried[i]]
                if not others:  # the directory may know a replacement this router has not seen yet
                    self._try_refresh()
                    others = [r for r in self.candidates(shard) if r.replica_id not in tried[i]]
                if not others:
                    raise ShardUnavailable(shard, f"every replica tried failed, the last with {why}") from None
                target[i] = others[0]
                failed.append(i)
            pending = failed
        for (_, _, req), rep in zip(messages, target, strict=True):
            self.rows_sent[rep.replica_id] = self.rows_sent.get(rep.replica_id, 0) + req.hidden.shape[0]
            slots = int(np.count_nonzero(np.frombuffer(req.expert_ids.data, dtype=np.int32) >= 0))
            self.slots_sent[rep.replica_id] = self.slots_sent.get(rep.replica_id, 0) + slots
        if messages:
            last = int(np.argmax(answered))  # the whole layer waited for this one
            with self._tokens_lock:
                shard = messages[last][0]
                self.critical_s[shard] = self.critical_s.get(shard, 0.0) + answered[last] - start
        return results

    def gather(self, layer: int, messages: list[tuple[int, Replica, expert_pb2.ForwardRequest]],
               dtype: torch.dtype) -> list[torch.Tensor]:
        """Send every (shard, replica, request) at once -> each request's (N, dim) output of `dtype`; retry
        transport failures and bad replies on other replicas."""
        return self._run(self._gather(layer, messages, dtype))

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                keys: np.ndarray | None = None) -> torch.Tensor:
        counts = np.bincount(expert_ids.cpu().numpy().ravel(), minlength=self.n_experts)  # (E,)
        with self._tokens_lock:
            self.tokens[layer] += counts
        routed_around: set[int] = set()
        for attempt in range(STALE_RETRIES + 1):
            msgs = self.requests(layer, x, expert_ids, weights, keys, self.routing)
            try:
                replies = self.gather(layer, [(s, rep, req) for s, rep, _, req in msgs], x.dtype)
                break
            except ShardUnavailable as e:
                # Its replicas are suspect now: once more if `around` sends some of its pairs to other holders.
                routing = self.routing
                if (attempt == STALE_RETRIES or e.shard in routed_around
                        or around(routing.holders[layer], routing.n_holders[layer], self.down(routing),
                                  routing.standby[layer])[0] is routing.holders[layer]):
                    raise
                routed_around.add(e.shard)
                log.info("layer %d: routing around shard %d", layer, e.shard)
            except StalePlacement as e:
                if attempt == STALE_RETRIES:
                    raise
                log.info("re-reading the expert placement: %s", e)
                time.sleep(0.05 * attempt)
                self._try_refresh()
        outputs = [(rows, y) for (_, _, rows, _), y in zip(msgs, replies, strict=True)]
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(x.dtype)
        if np_dtype is None:  # bfloat16: numpy has none
            out = torch.zeros_like(x)  # (T, dim)
            for rows, y in outputs:
                out.index_add_(0, torch.from_numpy(rows), y)
            return out
        out_np = np.zeros(tuple(x.shape), dtype=np_dtype)  # (T, dim), summed in x's dtype
        for rows, y in outputs:
            out_np[rows] += y.numpy()  # rows are distinct within a message
        return torch.from_numpy(out_np)

    def infos(self) -> dict[str, expert_pb2.InfoResponse]:
        """replica_id -> its Info reply, for every replica of the view (its load and counters since it started)."""
        reps = {r.replica_id: r for rs in self.routing.replicas.values() for r in rs}

        async def ask():
            return await asyncio.gather(*[self._stub(r).Info(expert_pb2.InfoRequest(), timeout=self.timeout_s,
                                                             metadata=self.metadata) for r in reps.values()])
        return dict(zip(reps, self._run(ask()), strict=True))

    def close(self) -> None:
        self._stop.set()
        # Joined, not left to exit on its own: a refresh under way still calls the directory (10 s timeout), which
        # an owner that stops Ray next would cut off, and no thread of ours may outlive close().
        self._refresher.join(timeout=15.0)
        channels, self._channels = list(self._channels.values()), {}

        async def close_all():
            for channel, _ in channels:
                await channel.close()
        if not self._loop.is_closed():
            self._run(close_all())
            self._loop.close()
        if self._helper is not None:
            self._helper.shutdown()
        self.close_caller()
