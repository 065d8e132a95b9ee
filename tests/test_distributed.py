"""The distributed expert plane on a real local Ray: ExpertShard replicas on Serve, gRPC, failover."""

import asyncio
import functools
import os
import time

import grpc
import msgpack
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hf_reference import build_checkpoint, hf_greedy_oracle, hf_logprobs

from checkpoint.reader import Checkpoint
from cluster.directory import DirectoryClient, get_directory
from cluster.expert_plane import build_expert_plane, connect_experts
from cluster.placement import PlacementPlan
from cluster.plane_token import TOKEN_ENV
from cluster.ray_init import fit_cpus
from experts.ffn import ExpertSet
from experts.replica import SERVICE, ExpertServicer, GrpcServer
from experts.security import ClientTLS, call_metadata, replica_channel
from experts.wire import WireError, from_wire, to_wire
from protos import expert_pb2
from router import LLM, SamplingParams
from router.config import ExpertPlaneConfig
from router.dispatch import ExpertBackend, LocalExperts
from router.grpc_dispatch import GrpcExperts

PROMPTS = [[1, 5, 9, 33, 2, 7, 100, 4, 18, 3, *range(60, 71)], [3, 4], [90, 91, 92, 93]]
MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "ckpt"
    return path, build_checkpoint(path)


@pytest.fixture(scope="module")
def llms(ray_session, ckpt, tmp_path_factory):
    """One expert plane for the module: 2 shards (experts 0, 2 and 1, 3 of every layer), 2 replicas each,
    serving TLS with a self-signed certificate for a name (other modules' planes serve plaintext)."""
    from test_data_plane_security import self_signed

    path, _ = ckpt
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), "raymoe-experts")
    local = LLM(path, expert_backend="local")
    distributed = LLM(path, expert_backend="ray", num_shards=2, replicas_per_shard=2, expert_num_cpus=0.1,
                      max_message_bytes=MAX_MESSAGE, data_plane_tls_cert=cert, data_plane_tls_key=key,
                      data_plane_tls_ca=cert, data_plane_tls_server_name="raymoe-experts")
    yield local, distributed
    distributed.shutdown()
    assert distributed.experts.app_name not in DirectoryClient().app_names()


def entries(llm: LLM) -> list[dict]:
    return DirectoryClient(llm.experts.app_name).replicas()


def channel_to(entry: dict) -> grpc.Channel:
    """A channel to the replica of a directory entry, TLS as it registered."""
    return replica_channel(entry["address"], ClientTLS.from_entry(entry), [("grpc.max_send_message_length", 64 << 20)],
                           aio=False)


def rpc(entry: dict, method: str, response_cls):
    """A call of `method` as a router makes it: TLS as the replica registered, with the data-plane token."""
    call = channel_to(entry).unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                               response_deserializer=response_cls.FromString)
    return functools.partial(call, metadata=call_metadata(os.environ[TOKEN_ENV]))


# --- pieces that need no cluster ---------------------------------------------------------------------


def test_placement_plans():
    plan = PlacementPlan.expert_parallel(2, 4).validate(2, 4)
    assert [s.pairs for s in plan.shards] == [((0, e), (1, e)) for e in range(4)]
    plan = PlacementPlan.expert_parallel(2, 4, num_shards=3, replicas_per_shard=2).validate(2, 4)
    assert [s.pairs for s in plan.shards] == [((0, 0), (0, 3), (1, 0), (1, 3)), ((0, 1), (1, 1)),
                                              ((0, 2), (1, 2))]
    assert {s.replicas for s in plan.shards} == {2}
    rest = [(l, e) for l in range(2) for e in range(4) if (l, e) != (0, 0)]
    hot = PlacementPlan.from_sets([[(0, 0)], rest], [3, 1])
    assert hot.validate(2, 4).shards[0].replicas == 3
    with pytest.raises(ValueError, match="num_shards must be in"):
        PlacementPlan.expert_parallel(2, 4, num_shards=5)
    with pytest.raises(ValueError, match=r"no shard holds \[\(1, 3\)\]"):
        PlacementPlan.from_sets([[(l, e) for l in range(2) for e in range(4)][:-1]]).validate(2, 4)
    with pytest.raises(ValueError, match="shard 0 lists a .* twice"):
        PlacementPlan.from_sets([[(0, 0), (0, 0)]]).validate(1, 1)
    assert len(PlacementPlan.from_sets([[(0, 0)], [(0, 0)]]).validate(1, 1).shards) == 2  # redundant copies
    with pytest.raises(ValueError, match="outside"):
        PlacementPlan.from_sets([[(0, 0), (0, 7)]]).validate(1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_wire_round_trip(dtype):
    t = (torch.randn(5, 3) * 100).to(dtype)
    msg = expert_pb2.Tensor.FromString(to_wire(t).SerializeToString())
    assert torch.equal(from_wire(msg, "t", dtype, ndim=2), t)
    with pytest.raises(WireError, match="2 dimensions, expected 3"):
        from_wire(msg, "t", ndim=3)
    with pytest.raises(WireError, match="float64"):
        to_wire(t.double())


def test_bad_backend_options_fail_before_deploying(ckpt):
    with pytest.raises(ValueError, match="num_shards must be in"):
        LLM(ckpt[0], expert_backend="ray", num_shards=5)
    with pytest.raises(TypeError, match="unknown settings \\['num_cpus'\\]"):
        LLM(ckpt[0], expert_backend="ray", num_cpus=0.1)


def test_default_cpu_share_fits_the_cluster_or_fails_at_once(ray_session, ckpt):
    free = ray.available_resources()["CPU"]
    share = fit_cpus(20)
    assert 0.05 <= share <= min(1.0, free / 20)
    assert fit_cpus(1) == 1.0
    app = build_expert_plane(str(ckpt[0]), "float32", ExpertPlaneConfig(num_shards=4, replicas_per_shard=5))
    shards = [d for d in app._bound_deployment.init_args if hasattr(d, "_bound_deployment")]
    assert {d._bound_deployment.ray_actor_options["num_cpus"] for d in shards} == {share}
    t = time.monotonic()
    with pytest.raises(ValueError, match="do not fit .* pass fewer --num-shards/--replicas-per-shard, an explicit "
                                         "--expert-num-cpus"):
        LLM(ckpt[0], expert_backend="ray", num_shards=4, replicas_per_shard=1000)
    assert time.monotonic() - t < 60  # at once, not after the 300 s wait for replicas that never schedule


def test_gpus_reach_the_replica_actor_options(ckpt):
    app = build_expert_plane(str(ckpt[0]), "float32", ExpertPlaneConfig(num_shards=2, replicas_per_shard=3,
                                                                  num_gpus=0.5), token="t")
    plane = app._bound_deployment
    assert "Expert" in plane.name
    shards = [a._bound_deployment for a in plane.init_args if hasattr(a, "_bound_deployment")]
    assert [d.name for d in shards] == ["ExpertShard-0", "ExpertShard-1"]
    assert all(d.ray_actor_options["num_gpus"] == 0.5 and d.num_replicas == 3 for d in shards)


class SlowServicer(ExpertServicer):
    DELAY_S = 5.0

    async def Forward(self, raw, context):
        await asyncio.sleep(self.DELAY_S)
        return await super().Forward(raw, context)


class LaggingServicer(SlowServicer):
    DELAY_S = 0.05


class RecordingSource:
    """Lists its entries; keeps the routers' failure and load reports."""

    def __init__(self, entries):
        self.entries, self.dead, self.reports = entries, [], []

    def view(self):
        return {"replicas": self.entries, "placement": None}

    def report_failure(self, address):
        self.dead.append(address)

    def report_load(self, tokens, critical_s, waiting):
        self.reports.append((tokens, critical_s, waiting))


class SwapSource(RecordingSource):
    """Lists the first replica until a router reports it dead, then the others (as Serve replaces one)."""

    def view(self):
        return {"replicas": self.entries[1:] if self.dead else self.entries[:1], "placement": None}


def test_slow_replica_hits_its_deadline_and_its_tokens_go_elsewhere(ckpt):
    """Real gRPC replicas of one shard, the first too slow: its call times out, is reported, and retried."""
    c = Checkpoint(ckpt[0])
    a = c.args
    pairs = [(l, e) for l in range(a.n_layers) for e in range(a.n_experts)]
    experts = ExpertSet.load(c, pairs, torch.float32)
    info, cpu = expert_pb2.InfoResponse(), torch.device("cpu")
    servers = [GrpcServer(cls(experts, a.dim, a.n_layers, a.n_experts, torch.float32, info, cpu),
                          "127.0.0.1", MAX_MESSAGE) for cls in (SlowServicer, ExpertServicer)]
    source = SwapSource([dict(shard=0, num_shards=1, replica_id=rid, address=srv.address, pairs=pairs,
                              max_message_bytes=MAX_MESSAGE)
                         for rid, srv in zip(["slow", "fast"], servers, strict=True)])
    backend = GrpcExperts(source, a.n_layers, a.n_experts, timeout_s=0.5)
    x, logits = torch.randn(5, a.dim), torch.randn(5, a.n_experts)
    weights, ids = torch.softmax(logits.topk(2).values, -1), logits.topk(2).indices
    try:
        out = backend.forward(1, x, ids, weights)
        assert (out - experts.forward(1, x, ids, weights)).abs().max() < 1e-6
        assert source.dead == [servers[0].address]
        assert [r.replica_id for r in backend.view[0]] == ["fast"]
    finally:
        backend.close()
        for srv in servers:
            srv.stop()


def test_the_router_reports_which_shard_each_layer_waited_for(ckpt):
    """Two shards on real gRPC, shard 0 answering 50 ms late: every layer's wait is charged to shard 0."""
    c = Checkpoint(ckpt[0])
    a = c.args
    shards = [[(l, e) for l in range(a.n_layers) for e in (0, 1)], [(l, e) for l in range(a.n_layers) for e in (2, 3)]]
    info, cpu = expert_pb2.InfoResponse(), torch.device("cpu")
    servers = [GrpcServer(cls(ExpertSet.load(c, pairs, torch.float32), a.dim, a.n_layers, a.n_experts, torch.float32,
                              info, cpu), "127.0.0.1", MAX_MESSAGE)
               for cls, pairs in ((LaggingServicer, shards[0]), (ExpertServicer, shards[1]))]
    source = RecordingSource([dict(shard=s, num_shards=2, replica_id=f"r{s}", address=srv.address, pairs=pairs,
                                   max_message_bytes=MAX_MESSAGE)
                              for s, (srv, pairs) in enumerate(zip(servers, shards, strict=True))])
    backend = GrpcExperts(source, a.n_layers, a.n_experts, refresh_s=3600)  # reports only when the test asks
    x, ids, w = torch.randn(4, a.dim), torch.tensor([[0, 2], [1, 3], [0, 3], [1, 2]]), torch.full((4, 2), 0.5)
    try:
        for _ in range(3):
            for layer in range(a.n_layers):
                backend.forward(layer, x, ids, w)
        backend.note_waiting(5)
        backend._report_load()
        (tokens, critical_s, waiting), = source.reports
        assert waiting == 5 and sum(map(sum, tokens)) == 3 * a.n_layers * ids.numel()
        assert critical_s[0] >= 3 * a.n_layers * 0.05 and critical_s[1] == 0.0
    finally:
        backend.close()
        for srv in servers:
            srv.stop()


# --- on the cluster --------------------------------------------------------------------------------


def test_logprobs_match_local_and_hf(llms, ckpt):
    local, distributed = llms
    ours = distributed.logprobs(PROMPTS, chunk_size=8)
    for ids, r, l in zip(PROMPTS, ours, local.logprobs(PROMPTS, chunk_size=8), strict=True):
        assert (r - l).abs().max() < 1e-5
        assert (r - hf_logprobs(ckpt[1], ids)).abs().max() < 1e-4


def test_greedy_decode_matches_local_and_hf(llms, ckpt):
    local, distributed = llms
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # far past the window of 16
    ours = [o.outputs[0].token_ids for o in distributed.generate(PROMPTS, params)]
    assert ours == [o.outputs[0].token_ids for o in local.generate(PROMPTS, params)]
    assert all(hf_greedy_oracle(ckpt[1], ids, gen) for ids, gen in zip(PROMPTS, ours, strict=True))


def test_ping_pong_runs_two_micro_batches_per_layer_off_the_main_thread_and_changes_no_token(llms, ckpt):
    """With remote experts a step splits in two: each layer's expert calls go out twice, from the call thread,
    while the main thread runs the other half's attention; the tokens are those of one batch."""
    import threading

    _, distributed = llms
    engine, backend = distributed.engine, distributed.experts.backend
    assert distributed.experts.overlaps_calls
    calls, real = [], backend.forward

    def recording(layer, x, *args):
        calls.append((threading.current_thread().name, layer, x.shape[0]))
        return real(layer, x, *args)

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    whole = [o.outputs[0].token_ids for o in distributed.generate(PROMPTS, params)]
    backend.forward, engine.ping_pong = recording, True
    try:
        split = [o.outputs[0].token_ids for o in distributed.generate(PROMPTS, params)]
    finally:
        del backend.forward
        engine.ping_pong = False
    assert split == whole
    assert {name.split("_")[0] for name, _, _ in calls} == {"expert-calls"}
    n_layers = Checkpoint(ckpt[0]).args.n_layers
    decode_steps = [calls[i : i + 2 * n_layers] for i in range(0, len(calls), 2 * n_layers)][1:]
    # A decode step of len(PROMPTS) sequences: every layer twice, the halves' rows adding up to the batch.
    assert any([layer for _, layer, _ in step] == [l for l in range(n_layers) for _ in (0, 1)]
               and sum(t for _, _, t in step) == len(PROMPTS) * n_layers for step in decode_steps)


def test_replicas_hold_only_their_share(llms, ckpt):
    _, distributed = llms
    a = Checkpoint(ckpt[0]).args
    expert_bytes = 3 * a.hidden_dim * a.dim * 4
    found = entries(distributed)
    assert sorted(e["shard"] for e in found) == [0, 0, 1, 1]
    for e in found:
        info = rpc(e, "Info", expert_pb2.InfoResponse)(b"")
        share = [(l, x) for l in range(a.n_layers) for x in range(a.n_experts) if x % 2 == info.shard]
        assert sorted((p.layer, p.expert) for p in info.pairs) == share
        assert info.bytes_loaded == len(share) * expert_bytes  # half of all expert weights, nothing else
        assert info.bytes_loaded < a.n_layers * a.n_experts * expert_bytes


def test_malformed_requests_get_invalid_argument(llms, ckpt):
    _, distributed = llms
    entry = next(e for e in entries(distributed) if e["shard"] == 0)  # experts 0 and 2 of every layer
    forward = rpc(entry, "Forward", expert_pb2.ForwardResponse)
    x = torch.randn(3, 64)
    ids = torch.tensor([[0, -1], [2, 0], [-1, 2]], dtype=torch.int32)
    w = torch.rand(3, 2)
    expected = ExpertSet.load(Checkpoint(ckpt[0]), [(1, 0), (1, 2)], torch.float32).forward(1, x, ids, w)

    def request(**changes) -> bytes:
        fields = dict(layer=1, hidden=to_wire(x), expert_ids=to_wire(ids), weights=to_wire(w)) | changes
        return expert_pb2.ForwardRequest(**fields).SerializeToString()

    def check_still_serving():
        out = from_wire(forward(request()).output, "output", torch.float32, ndim=2)
        assert torch.allclose(out, expected, atol=1e-6)

    check_still_serving()
    short = to_wire(x)
    short.data = short.data[:-4]
    bad = {
        "dtype float16 where float32": request(hidden=to_wire(x.half())),
        "unknown dtype 'complex64'": request(hidden=expert_pb2.Tensor(dtype="complex64", shape=[3, 64])),
        "hidden size is 64": request(hidden=to_wire(torch.randn(3, 63))),
        "3 dimensions, expected 2": request(hidden=to_wire(x[None])),
        "bytes of data": request(hidden=short),
        "layer 7 is not a layer of this model": request(layer=7),
        "17 is not an expert id": request(expert_ids=to_wire(ids.masked_fill(ids == 2, 17))),
        "dtype float32 where int32": request(expert_ids=to_wire(ids.float())),
        "differs from expert_ids": request(weights=to_wire(w[:, :1])),
        "1 <= k <= 4": request(expert_ids=to_wire(ids[:, :0]), weights=to_wire(w[:, :0])),
        "not a ForwardRequest": b"\xff\xff\xff\xff",
    }
    for message, raw in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            forward(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in err.value.details()
        check_still_serving()
    # Over the message limit: the transport refuses it before any of it reaches Python.
    with pytest.raises(grpc.RpcError) as err:
        forward(request(hidden=to_wire(torch.randn(MAX_MESSAGE // 256 + 1, 64))), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    check_still_serving()
    # A pair of the model this shard does not hold: a router on an old placement, told to re-read it.
    with pytest.raises(grpc.RpcError) as err:
        forward(request(expert_ids=to_wire(ids.masked_fill(ids == 2, 1))), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expert 1 of layer 1 is not held by shard 0" in err.value.details()
    check_still_serving()
    echo = rpc(entry, "Echo", expert_pb2.EchoResponse)
    with pytest.raises(grpc.RpcError) as err:
        echo(expert_pb2.EchoRequest(payload=b"x", reply_bytes=-1).SerializeToString())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    check_still_serving()
    with pytest.raises(grpc.RpcError) as err:  # a reply bigger than its request: no amplification
        echo(expert_pb2.EchoRequest(payload=b"x", reply_bytes=2).SerializeToString())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with channel_to(entry) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_deployed_replicas_refuse_calls_without_the_token(llms):
    """The plane's replicas got the driver's token through their deployment: a call without it, or with
    another, is UNAUTHENTICATED and runs no expert math; the health service needs none, but TLS."""
    _, distributed = llms
    entry = next(e for e in entries(distributed) if e["shard"] == 0)
    x, ids, w = torch.randn(3, 64), torch.tensor([[0, 2]] * 3, dtype=torch.int32), torch.full((3, 2), 0.5)
    raw = expert_pb2.ForwardRequest(layer=1, hidden=to_wire(x), expert_ids=to_wire(ids),
                                    weights=to_wire(w)).SerializeToString()
    info = rpc(entry, "Info", expert_pb2.InfoResponse)
    before = info(b"", timeout=10).calls
    with channel_to(entry) as channel:
        forward = channel.unary_unary(f"/{SERVICE}/Forward", request_serializer=lambda b: b,
                                      response_deserializer=expert_pb2.ForwardResponse.FromString)
        for metadata in [(), call_metadata("not-the-token")]:
            with pytest.raises(grpc.RpcError) as err:
                forward(raw, timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert entry["tls"] and entry["tls_server_name"] == "raymoe-experts"
    with grpc.insecure_channel(entry["address"]) as plaintext:  # this plane serves TLS only
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info(b"", timeout=10).calls == before
    assert len(rpc(entry, "Forward", expert_pb2.ForwardResponse)(raw, timeout=10).output.data) == 3 * 64 * 4


def test_connect_experts_by_app_name(llms, ckpt):
    """What a Router replica does: find the plane in the directory and dispatch to it."""
    _, distributed = llms
    c = Checkpoint(ckpt[0])
    backend = connect_experts(c, torch.float32, distributed.experts.app_name)
    x, logits = torch.randn(9, 64), torch.randn(9, 4)
    weights, ids = torch.softmax(logits.topk(2).values, -1), logits.topk(2).indices
    try:
        for layer in range(2):
            want = LocalExperts(c, torch.float32).forward(layer, x, ids, weights)
            assert (backend.forward(layer, x, ids, weights) - want).abs().max() < 1e-5
        assert backend.forward(0, x[:0], ids[:0], weights[:0]).shape == (0, 64)
    finally:
        backend.close()
    with pytest.raises(ValueError, match="serves \\['float32'\\] experts, this router runs bfloat16"):
        connect_experts(c, torch.bfloat16, distributed.experts.app_name)


def test_directory_keeps_apps_apart(ray_session):
    a, b = DirectoryClient("test-app-a"), DirectoryClient("test-app-b")
    entry = dict(shard=0, num_shards=1, replica_id="r1", address="127.0.0.1:1", pairs=[[0, 0]])
    try:
        a.register(entry | {"app": "test-app-a"})
        b.register(entry | {"app": "test-app-b", "address": "127.0.0.1:2"})
        assert [e["address"] for e in a.replicas()] == ["127.0.0.1:1"]
        # another app's address: a's entry stays (awaited: the client's report is fire and forget)
        ray.get(get_directory().report_failure.remote("test-app-b", "127.0.0.1:1"))
        assert [e["address"] for e in a.replicas()] == ["127.0.0.1:1"]
        snap = msgpack.unpackb(ray.get(get_directory().snapshot.remote("test-app-b")))
        assert [e["address"] for e in snap["replicas"]] == ["127.0.0.1:2"]
        with pytest.raises(ValueError, match="pass app_name"):
            connect_experts(None, torch.float32)  # several planes: which one is ambiguous
    finally:
        a.remove_app()
        b.remove_app()


def test_the_directory_rechecks_a_tls_replica_and_busy_is_not_dead(ray_session, tmp_path):
    """A router reported a replica that serves TLS and has its only call slot taken: the directory's health
    probe reaches it over TLS, hears RESOURCE_EXHAUSTED (it answered), and keeps it."""
    from test_data_plane_security import TOKEN, SlowServicer, entry, forward_request, method, self_signed, serve, stop

    from experts.security import ClientTLS, ReplicaSecurity, replica_channel

    cert, key = self_signed(tmp_path, "raymoe-experts")
    security = ReplicaSecurity(TOKEN, cert, key, ClientTLS(cert, "raymoe-experts"))
    r = serve(SlowServicer, security=security, max_concurrent_rpcs=1)
    directory = DirectoryClient("test-app-tls")
    try:
        directory.register(entry("r1", r[1], security) | {"app": "test-app-tls"})
        with replica_channel(r[1].address, security.client_tls(), aio=False) as channel:
            held = method(channel, "Forward", expert_pb2.ForwardResponse).future(
                forward_request(), timeout=10, metadata=call_metadata(TOKEN))
            time.sleep(0.2)
            # awaited, so the polling below starts after the report (the client's is fire and forget)
            ray.get(get_directory().report_failure.remote("test-app-tls", r[1].address))
            deadline = time.monotonic() + 10
            while [e["state"] for e in directory.snapshot()["replicas"]] == ["suspect"]:
                assert time.monotonic() < deadline, "the directory never re-checked the replica"
                time.sleep(0.05)
            assert [e["state"] for e in directory.snapshot()["replicas"]] == ["serving"]
            held.result()
    finally:
        directory.remove_app()
        stop(r)


class KillReplicaAt(ExpertBackend):
    """Passes calls on; at call number `at` kills the replica serving shard 0 and waits until it is gone."""

    def __init__(self, inner: ExpertBackend, grpc_backend, app: str, at: int):
        self.inner, self.grpc_backend, self.app, self.at, self.calls = inner, grpc_backend, app, at, 0
        self.killed: dict | None = None

    def forward(self, layer, x, expert_ids, weights, keys=None):
        self.calls += 1
        if self.calls == self.at:
            rep = self.grpc_backend.live(0)[0]
            self.killed = next(e for e in DirectoryClient(self.app).replicas()
                               if e["replica_id"] == rep.replica_id)
            ray.kill(ray.get_actor(self.killed["actor_name"], namespace="serve"), no_restart=True)
            info = rpc(self.killed, "Info", expert_pb2.InfoResponse)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    info(b"", timeout=1)
                    time.sleep(0.05)
                except grpc.RpcError:
                    break
        return self.inner.forward(layer, x, expert_ids, weights)


def test_killing_a_replica_mid_generate_loses_nothing(llms):
    local, distributed = llms
    prompts = [[i + 1, 2 * i + 3, 7] for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in local.generate(prompts, params)]
    backend = distributed.experts.backend
    engine = distributed.engine
    killer = KillReplicaAt(engine.experts, backend, distributed.experts.app_name, at=2 * 10)  # 10th step
    engine.experts = killer
    try:
        outs = distributed.generate(prompts, params)
    finally:
        engine.experts = distributed.experts
    assert killer.killed is not None and killer.calls > killer.at
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * len(prompts)
    assert [o.outputs[0].token_ids for o in outs] == want
    # The router's report made it suspect; the directory's health probe found it dead and dropped it, and
    # the router's view follows the directory.
    dead = killer.killed["address"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (dead in {e["address"] for e in entries(distributed)}
                                           or dead in {r.address for reps in backend.view.values() for r in reps}):
        time.sleep(0.2)
    assert dead not in {e["address"] for e in entries(distributed)}
    assert dead not in {r.address for reps in backend.view.values() for r in reps}
