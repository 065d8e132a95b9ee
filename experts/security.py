"""Who may call an expert replica, and over what: the application's data-plane token and optional TLS.

Every call but the health service's carries the token in its metadata; the replica's interceptor checks it
(constant time) before any handler runs, so a call without it costs no parsing and no expert math. The
health service stays open: Kubernetes-style probes (grpc_health_probe, the directory's re-check of a
suspect replica) carry no credentials, and it says nothing but SERVING.

TLS is optional: the replica serves with its certificate chain and key, callers verify it against a CA
certificate, under the name the certificate was issued for (replica addresses are pod IPs, which a
certificate rarely names). The paths are settings; the files are mounted (a Secret on Kubernetes).
"""

import hmac
from dataclasses import dataclass, field

import grpc

TOKEN_METADATA = "raymoe-data-plane-token"  # gRPC metadata keys are lower case
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ClientTLS:
    """How a caller checks a replica's certificate: against `ca` (PEM path; None: the system's roots), for
    `server_name` (None: the host of the address called). Public: replicas register it for their callers."""

    ca: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca) if self.ca else None)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def to_entry(self) -> dict:
        return {"tls": True, "tls_ca": self.ca, "tls_server_name": self.server_name}

    @staticmethod
    def from_entry(entry: dict) -> "ClientTLS | None":
        """The TLS a directory entry's replica serves with, or None for plaintext."""
        if not entry.get("tls"):
            return None
        return ClientTLS(entry.get("tls_ca"), entry.get("tls_server_name"))


@dataclass(frozen=True)
class ReplicaSecurity:
    """What a replica is deployed with: the token it requires (None: no check, for in-process tests only),
    and its certificate chain and key (PEM paths; None: plaintext) with what its callers verify them by."""

    token: str | None = field(default=None, repr=False)  # a secret: never in a log line
    cert: str | None = None
    key: str | None = None
    client: ClientTLS | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate chain and its private key")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))])

    def client_tls(self) -> ClientTLS | None:
        """How callers reach this replica (its own health check included)."""
        return (self.client or ClientTLS()) if self.tls else None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []


def replica_channel(address: str, tls: ClientTLS | None, options: list | None = None, aio: bool = True):
    """A channel to a replica: TLS as it registered, else plaintext."""
    opts = list(options or [])
    if tls is None:
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(address, options=opts)
    opts += tls.options()
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(address, tls.credentials(), options=opts)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA, token),) if token else ()


async def _refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong data-plane token "
                        f"(metadata {TOKEN_METADATA!r})")


class TokenCheck(grpc.aio.ServerInterceptor):
    """Lets a call reach its handler only with the token; the health service is open to all."""

    _refusal = grpc.unary_unary_rpc_method_handler(_refuse)  # raw bytes in: the request is never parsed

    def __init__(self, token: str):
        self.token = token.encode()

    def allowed(self, metadata) -> bool:
        return any(key == TOKEN_METADATA and hmac.compare_digest(
            value.encode() if isinstance(value, str) else value, self.token) for key, value in metadata or ())

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method in OPEN_METHODS or self.allowed(details.invocation_metadata):
            return await continuation(details)
        return self._refusal
