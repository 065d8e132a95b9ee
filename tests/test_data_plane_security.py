"""The data plane's defences, on real grpc.aio servers over loopback (no Ray): the token, TLS, message and
concurrency limits, Echo's reply size, and the router's check of every reply's rows."""

import datetime
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.plane_token import TOKEN_ENV, give_token
from experts.ffn import ExpertSet
from experts.replica import SERVICE, ExpertServicer, GrpcServer
from experts.security import TOKEN_METADATA, ClientTLS, ReplicaSecurity, call_metadata, replica_channel
from experts.wire import grpc_options, to_wire
from protos import expert_pb2
from router.grpc_dispatch import ExpertDispatchError, GrpcExperts, ShardUnavailable

DIM, HIDDEN, LAYERS, N_EXPERTS = 32, 64, 2, 4
LIMIT = 64 << 10  # a small message limit, so that messages over it are cheap to make
TOKEN = "s3cret-token"
PAIRS = [(l, e) for l in range(LAYERS) for e in range(N_EXPERTS)]


def expert_set() -> ExpertSet:
    g = torch.Generator().manual_seed(0)
    return ExpertSet({l: (list(range(N_EXPERTS)), list(torch.randn(N_EXPERTS, 2 * HIDDEN, DIM, generator=g) * 0.1),
                          list(torch.randn(N_EXPERTS, DIM, HIDDEN, generator=g) * 0.1)) for l in range(LAYERS)},
                     N_EXPERTS)


EXPERTS = expert_set()


def serve(cls=ExpertServicer, security: ReplicaSecurity | None = None, max_concurrent_rpcs: int | None = None
          ) -> tuple[ExpertServicer, GrpcServer]:
    servicer = cls(EXPERTS, DIM, LAYERS, N_EXPERTS, torch.float32, expert_pb2.InfoResponse(), torch.device("cpu"))
    return servicer, GrpcServer(servicer, "127.0.0.1", LIMIT, security or ReplicaSecurity(TOKEN),
                                max_concurrent_rpcs)


def stop(*servers: tuple[ExpertServicer, GrpcServer]) -> None:
    for servicer, server in servers:
        server.stop()
        servicer.close()


@pytest.fixture
def replica() -> Iterator[tuple[ExpertServicer, GrpcServer]]:
    r = serve()
    yield r
    stop(r)


def tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    top = torch.randn(n, N_EXPERTS, generator=g).topk(2)
    return torch.randn(n, DIM, generator=g), top.indices.int(), torch.softmax(top.values, -1)


def forward_request(n: int = 3) -> bytes:
    x, ids, w = tokens(n)
    return expert_pb2.ForwardRequest(layer=1, hidden=to_wire(x), expert_ids=to_wire(ids),
                                     weights=to_wire(w)).SerializeToString()


def method(channel: grpc.Channel, name: str, response_cls):
    return channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=lambda b: b,
                               response_deserializer=response_cls.FromString)


class Source:
    """A fixed replica list, as the directory would give it; records the failures routers report."""

    def __init__(self, entries: list[dict]):
        self.entries, self.failed = entries, []

    def view(self) -> dict:
        return {"replicas": self.entries, "placement": None}

    def report_failure(self, address: str) -> None:
        self.failed.append(address)

    def report_load(self, tokens, critical_s, waiting) -> None:
        pass


def entry(replica_id: str, server: GrpcServer, security: ReplicaSecurity | None = None) -> dict:
    e = dict(shard=0, num_shards=1, replica_id=replica_id, address=server.address, pairs=PAIRS,
             max_message_bytes=LIMIT)
    tls = (security or ReplicaSecurity(TOKEN)).client_tls()
    return e | (tls.to_entry() if tls else {})


# --- the token ----------------------------------------------------------------------------------------


def test_calls_without_the_token_are_refused_before_any_expert_math(replica):
    servicer, server = replica
    with grpc.insecure_channel(server.address) as channel:
        forward = method(channel, "Forward", expert_pb2.ForwardResponse)
        for metadata in [(), call_metadata("wrong"), call_metadata(TOKEN + "x")]:
            for name, raw in [("Forward", forward_request()), ("Info", b""),
                              ("Echo", expert_pb2.EchoRequest(payload=b"ab", reply_bytes=1).SerializeToString())]:
                with pytest.raises(grpc.RpcError) as err:
                    method(channel, name, expert_pb2.ForwardResponse)(raw, timeout=5, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
                assert TOKEN_METADATA in err.value.details()
        # Nothing reached the expert math: no call queued, batched or measured.
        assert servicer.coalescer.stats.calls == 0 and servicer.load.calls == 0 and servicer.inflight == 0
        # Probes carry no token: the health service answers them.
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reply = forward(forward_request(), timeout=5, metadata=call_metadata(TOKEN))
        assert list(reply.output.shape) == [3, DIM] and servicer.coalescer.stats.calls == 1


def test_the_router_sends_its_token_and_a_wrong_one_fails_clearly(replica):
    _, server = replica
    x, ids, w = tokens(5)
    for token, ok in [(TOKEN, True), ("wrong", False)]:
        backend = GrpcExperts(Source([entry("r", server)]), LAYERS, N_EXPERTS, refresh_s=3600, token=token)
        try:
            if ok:
                assert torch.allclose(backend.forward(1, x, ids, w), EXPERTS.forward(1, x, ids, w), atol=1e-6)
            else:  # not a passing fault: no retry, and the status says why
                with pytest.raises(ExpertDispatchError, match="refused layer 1: UNAUTHENTICATED"):
                    backend.forward(1, x, ids, w)
        finally:
            backend.close()


def test_a_new_app_gets_a_token_and_a_deployed_one_keeps_its_own(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    fresh, other = {"name": "a"}, {"name": "b", "runtime_env": {"working_dir": "."}}
    give_token(fresh, None)
    give_token(other, None)
    made = fresh["runtime_env"]["env_vars"][TOKEN_ENV]
    assert len(made) >= 32 and made != other["runtime_env"]["env_vars"][TOKEN_ENV]  # one per app
    assert other["runtime_env"]["working_dir"] == "."
    again = {"name": "a"}  # the same app applied again (a scale, a re-deploy): same token, no restart
    give_token(again, fresh)
    assert again["runtime_env"]["env_vars"][TOKEN_ENV] == made
    from_secret = {"name": "k"}  # deployed with the token in its pods' env (a Kubernetes Secret): left alone
    give_token(from_secret, {"name": "k"})
    assert "runtime_env" not in from_secret
    monkeypatch.setenv(TOKEN_ENV, "from-the-deployer")
    given = {"name": "c"}
    give_token(given, None)
    assert given["runtime_env"]["env_vars"][TOKEN_ENV] == "from-the-deployer"


def test_an_expert_plane_is_not_built_without_a_token(monkeypatch):
    from cluster.expert_plane import build_expert_plane
    from router.config import ExpertPlaneConfig

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} is not set"):
        build_expert_plane("models/tiny-mixtral", "float32", ExpertPlaneConfig(expert_num_cpus=0.1))


# --- TLS -------------------------------------------------------------------------------------------------


def self_signed(tmp_path, name: str) -> tuple[str, str]:
    """(certificate, key) PEM paths of a self-signed certificate for DNS `name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_over_loopback(tmp_path):
    """A replica serving TLS with a self-signed certificate for a name (not its IP): a router that learns
    CA and name from the entry gets correct outputs; plaintext, or a certificate from another CA, does not
    connect; the health service answers over TLS without the token."""
    cert, key = self_signed(tmp_path, "raymoe-experts")
    other_ca, _ = self_signed(tmp_path, "someone-else")
    security = ReplicaSecurity(TOKEN, cert, key, ClientTLS(cert, "raymoe-experts"))
    r = serve(security=security)
    x, ids, w = tokens(6)
    try:
        e = entry("tls", r[1], security)
        assert e["tls"] and e["tls_ca"] == cert
        backend = GrpcExperts(Source([e]), LAYERS, N_EXPERTS, refresh_s=3600, token=TOKEN, timeout_s=5)
        try:
            assert torch.allclose(backend.forward(0, x, ids, w), EXPERTS.forward(0, x, ids, w), atol=1e-6)
        finally:
            backend.close()
        with replica_channel(r[1].address, ClientTLS.from_entry(e), aio=False) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        for tls in [None, ClientTLS(other_ca, "raymoe-experts")]:
            with replica_channel(r[1].address, tls, aio=False) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    method(channel, "Forward", expert_pb2.ForwardResponse)(
                        forward_request(), timeout=5, metadata=call_metadata(TOKEN))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert r[0].coalescer.stats.calls == 1  # the router's call only
    finally:
        stop(r)


def test_tls_settings_come_in_pairs():
    from router.config import ExpertPlaneConfig

    with pytest.raises(ValueError, match="go together"):
        ExpertPlaneConfig(data_plane_tls_cert="c.pem")
    with pytest.raises(ValueError, match="need data_plane_tls_cert"):
        ExpertPlaneConfig(data_plane_tls_ca="ca.pem")
    with pytest.raises(ValueError, match="both"):
        ReplicaSecurity(TOKEN, cert="c.pem")
    assert "s3cret" not in repr(ReplicaSecurity(TOKEN))  # the token never reaches a log line


# --- limits ---------------------------------------------------------------------------------------------


def test_message_limits_are_the_same_on_both_sides(replica):
    """The replica's transport takes messages up to its limit and refuses bigger ones before they reach Python
    (it used to take 4x the limit); the router's channels have the same limit both ways."""
    assert dict(grpc_options(LIMIT)) == {"grpc.max_send_message_length": LIMIT,
                                         "grpc.max_receive_message_length": LIMIT}
    _, server = replica
    with grpc.insecure_channel(server.address) as channel:
        echo = method(channel, "Echo", expert_pb2.EchoResponse)
        fits = expert_pb2.EchoRequest(payload=bytes(LIMIT - 16), reply_bytes=8)
        assert fits.ByteSize() <= LIMIT
        assert echo(fits.SerializeToString(), timeout=5, metadata=call_metadata(TOKEN)).payload == bytes(8)
        over = expert_pb2.EchoRequest(payload=bytes(2 * LIMIT), reply_bytes=0)
        with pytest.raises(grpc.RpcError) as err:
            echo(over.SerializeToString(), timeout=5, metadata=call_metadata(TOKEN))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_echo_replies_no_more_than_it_was_sent(replica):
    _, server = replica
    with grpc.insecure_channel(server.address) as channel:
        echo = method(channel, "Echo", expert_pb2.EchoResponse)
        for reply_bytes in (5, LIMIT // 2):  # 5 bytes out, more back: an amplifier
            with pytest.raises(grpc.RpcError) as err:
                echo(expert_pb2.EchoRequest(payload=b"hello"[:4], reply_bytes=reply_bytes).SerializeToString(),
                     timeout=5, metadata=call_metadata(TOKEN))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no bigger than its request" in err.value.details()
        ok = echo(expert_pb2.EchoRequest(payload=b"hello", reply_bytes=5).SerializeToString(), timeout=5,
                  metadata=call_metadata(TOKEN))
        assert ok.payload == b"hello"


class SlowServicer(ExpertServicer):
    """Holds every Forward for a while (on the event loop, as a long queue would)."""

    async def Forward(self, raw, context):
        import asyncio

        await asyncio.sleep(0.6)
        return await super().Forward(raw, context)


def test_concurrent_calls_are_bounded_and_the_router_goes_elsewhere():
    busy, free = serve(SlowServicer, max_concurrent_rpcs=1), serve()
    try:
        with grpc.insecure_channel(busy[1].address) as channel:
            forward = method(channel, "Forward", expert_pb2.ForwardResponse)
            first = forward.future(forward_request(), timeout=5, metadata=call_metadata(TOKEN))
            time.sleep(0.2)  # the first call holds the only slot
            with pytest.raises(grpc.RpcError) as err:
                forward(forward_request(), timeout=5, metadata=call_metadata(TOKEN))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert list(first.result().output.shape) == [3, DIM]
            # A router whose rows land on the busy replica takes them to the other replica of the shard.
            source = Source([entry("busy", busy[1]), entry("free", free[1])])
            backend = GrpcExperts(source, LAYERS, N_EXPERTS, refresh_s=3600, token=TOKEN, timeout_s=5)
            x, ids, w = tokens(16)
            try:
                hold = forward.future(forward_request(), timeout=5, metadata=call_metadata(TOKEN))
                time.sleep(0.2)
                assert torch.allclose(backend.forward(1, x, ids, w), EXPERTS.forward(1, x, ids, w), atol=1e-6)
                # Busy is not broken: left alone a while, not reported to the directory.
                assert [r.replica_id for r in backend.live(0)] == ["free"]
                assert source.failed == []
                hold.result()
            finally:
                backend.close()
    finally:
        stop(busy, free)


# --- replies ------------------------------------------------------------------------------------------------


class OneRowServicer(ExpertServicer):
    """Answers every call with its first row only: a buggy or hostile replica."""

    def run_batch(self, layer, jobs):
        return [(y[:1], ns) for y, ns in super().run_batch(layer, jobs)]


def test_a_reply_with_the_wrong_row_count_is_a_failed_call():
    """(1, dim) would broadcast into every row's sum: the router must take it as the replica failing, send its
    rows to another replica, and with none left fail with a clear error, never return such an output."""
    bad, good = serve(OneRowServicer), serve()
    x, ids, w = tokens(12)
    want = EXPERTS.forward(1, x, ids, w)
    try:
        source = Source([entry("bad", bad[1]), entry("good", good[1])])
        backend = GrpcExperts(source, LAYERS, N_EXPERTS, refresh_s=3600, token=TOKEN)
        try:
            assert torch.allclose(backend.forward(1, x, ids, w), want, atol=1e-6)
            assert source.failed == [bad[1].address] and bad[0].coalescer.stats.calls == 1
        finally:
            backend.close()
        alone = GrpcExperts(Source([entry("bad", bad[1])]), LAYERS, N_EXPERTS, refresh_s=3600, token=TOKEN)
        try:
            with pytest.raises(ShardUnavailable, match=r"shape \[1, 32\] for a request of shape \[12, 32\]"):
                alone.forward(1, x, ids, w)
        finally:
            alone.close()
    finally:
        stop(bad, good)

