"""The CUDA paths: expert math on the GPU in bfloat16, a replica's gRPC service on the GPU, and the expert
plane on Ray + Serve with two replicas sharing one GPU.

Every test is skipped where torch sees no CUDA device, so the CPU suite skips them and starts no Ray.
RAYMOE_CUDA_CHECK_ON_CPU=1 runs them anyway, on the CPU, to check this module and the Ray + Serve path on a
machine without a GPU: Ray is given a fake GPU (num_gpus=1 is only a resource count), and the replicas
must then see a GPU id yet keep their experts on the CPU, since torch has no CUDA there.
"""

import os

import grpc
import pytest
import torch
import torch.nn.functional as F

from checkpoint.bundled import BUNDLED_MODEL
from checkpoint.reader import Checkpoint
from experts.ffn import ExpertSet
from experts.wire import from_wire, to_wire
from protos import expert_pb2
from router import LLM, SamplingParams

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("RAYMOE_CUDA_CHECK_ON_CPU") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")

pytestmark = pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs a CUDA GPU: torch.cuda.is_available() is "
                                "False (RAYMOE_CUDA_CHECK_ON_CPU=1 runs these checks on the CPU)")

# bfloat16 keeps 8 significant bits: unit roundoff 2**-9 ~ 2e-3. The bundled weights are bfloat16 and the inputs
# here are too, so only the rounding of the intermediate activations, the outputs and the sum of a token's two
# experts counts: the CPU's bfloat16 path lands at ~4e-3 relative (Frobenius) from float32. 1.5e-2 leaves room for
# another summation order; a wrong expert, weight or row is off by O(1).
BF16_REL = 1.5e-2
# float32 on the GPU differs from the CPU only in summation order (~1e-7 relative); TF32 matmuls, which torch leaves
# off by default, would show as ~1e-3.
F32_REL = 1e-5


def need_ray() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs ray[serve], which experts.replica imports: {e!r}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float().cpu() - ref).norm() / ref.norm())


def reference(ckpt: Checkpoint, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
              held: set[int] | None = None) -> torch.Tensor:
    """sum_k w_k * w2(silu(w1 x) * w3 x) in float32 on the CPU, read straight from the checkpoint in nn.Linear's
    layout: independent of how ExpertSet keeps its weights and of its batching."""
    x, ids, w = x.float().cpu(), ids.cpu(), w.float().cpu()
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        if e < 0 or (held is not None and e not in held):
            continue
        w1, w2, w3 = ckpt.expert(layer, e, torch.float32)
        rows, slot = (ids == e).nonzero(as_tuple=True)
        h = x[rows]
        out.index_add_(0, rows, F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2) * w[rows, slot, None])
    return out


def routed(n: int, dim: int, n_experts: int, seed: int, only: list[int] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, dim) bfloat16, top-2 expert ids (n, 2) int32 and their softmax weights (n, 2) float32, as the gate
    makes them; `only` restricts the choice to those experts (some held experts then get no token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g).bfloat16()
    logits = torch.randn(n, n_experts, generator=g)
    if only is not None:
        mask = torch.full((n_experts,), float("-inf"))
        mask[only] = 0.0
        logits = logits + mask
    top = logits.topk(2)
    return x, top.indices.int(), torch.softmax(top.values, -1)


@pytest.fixture(scope="module")
def ckpt() -> Checkpoint:
    return Checkpoint(BUNDLED_MODEL)


def all_pairs(ckpt: Checkpoint) -> list[tuple[int, int]]:
    a = ckpt.args
    return [(l, e) for l in range(a.n_layers) for e in range(a.n_experts)]


# --- (a) the expert math on the device ------------------------------------------------------------------------


def test_expert_set_on_device_matches_float32_reference(ckpt):
    a = ckpt.args
    experts = ExpertSet.load(ckpt, all_pairs(ckpt), torch.bfloat16, device=DEVICE)
    assert experts.device.type == DEVICE.type
    assert {(t.device.type, t.dtype) for _, w13, w2 in experts.layers.values() for t in (*w13, *w2)} == \
        {(DEVICE.type, torch.bfloat16)}
    assert all(lut.device.type == DEVICE.type for lut in experts.local.values())
    experts.warm_up()
    # 256 tokens reach every expert; 40 tokens over experts 0-2 leave the other held experts without a token (they
    # run nothing); 4096 tokens: a prefill-sized call; 1 token: a decode step's.
    for n, only in ((256, None), (40, [0, 1, 2]), (4096, None), (1, None)):
        for layer in range(a.n_layers):
            x, ids, w = routed(n, a.dim, a.n_experts, seed=100 * n + layer, only=only)
            if n == 40:
                ids[::5, 1] = -1  # slots routed nowhere
            out = experts.forward(layer, x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE))
            assert out.device.type == DEVICE.type and out.dtype == torch.bfloat16 and out.shape == x.shape
            assert rel_err(out, reference(ckpt, layer, x, ids, w)) < BF16_REL, (n, layer)


def test_expert_subset_and_reuse_stay_on_device(ckpt):
    """A replica holds some experts and, when the placement moves, loads more beside them (reuse=): the new
    ones must land on the device of the old ones, and experts it does not hold contribute nothing."""
    a = ckpt.args
    even = [(l, e) for l, e in all_pairs(ckpt) if e % 2 == 0]
    part = ExpertSet.load(ckpt, even, torch.bfloat16, device=DEVICE)
    x, ids, w = routed(64, a.dim, a.n_experts, seed=7)
    out = part.forward(1, x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE))
    assert rel_err(out, reference(ckpt, 1, x, ids, w, held={0, 2, 4, 6})) < BF16_REL
    grown = ExpertSet.load(ckpt, [*even, (1, 3)], torch.bfloat16, reuse=part)  # no device: the reused one's
    assert grown.device.type == DEVICE.type and grown.weights(1, 3)[0].device.type == DEVICE.type
    out = grown.forward(1, x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE))
    assert rel_err(out, reference(ckpt, 1, x, ids, w, held={0, 2, 3, 4, 6})) < BF16_REL


def test_float32_on_device_keeps_float32_precision(ckpt):
    a = ckpt.args
    experts = ExpertSet.load(ckpt, all_pairs(ckpt), torch.float32, device=DEVICE)
    for layer in range(a.n_layers):
        x, ids, w = routed(512, a.dim, a.n_experts, seed=layer)
        out = experts.forward(layer, x.float().to(DEVICE), ids.to(DEVICE), w.to(DEVICE))
        assert out.dtype == torch.float32
        assert rel_err(out, reference(ckpt, layer, x, ids, w)) < F32_REL, layer


def test_the_trainable_model_trains_on_the_device():
    """The trainer's model (dense part, gate, MoE arranged for autograd) steps on the device as on the CPU: its
    rope tables, attention mask and permutations follow the model there (they did not, and the expert-parallel
    trainer failed on its first CUDA step)."""
    from training.train import TrainConfig, losses, seeded_model

    cfg = TrainConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, seq_len=32)
    model, gen = seeded_model(cfg)
    batch = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=gen)
    ce_cpu, aux_cpu = losses(model, batch)
    (ce_cpu + aux_cpu).backward()
    grads_cpu = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.to(DEVICE)
    ce, aux = losses(model, batch.to(DEVICE))
    (ce + aux).backward()
    torch.testing.assert_close(ce.cpu(), ce_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux.cpu(), aux_cpu, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        assert p.grad.device.type == DEVICE.type, name
        torch.testing.assert_close(p.grad.cpu(), grads_cpu[name], rtol=1e-3, atol=1e-5, msg=name)


# --- (b) a replica's gRPC service with its experts on the device ---------------------------------------------

MAX_MESSAGE = 8 << 20


class StaticSource:
    """The replica source of a router that knows its replicas up front (no directory)."""

    def __init__(self, entries: list[dict]):
        self.entries = entries

    def view(self) -> dict:
        return {"replicas": self.entries, "placement": None}

    def report_failure(self, address: str) -> None:
        pass

    def report_load(self, tokens, critical_s, waiting) -> None:
        pass


def test_replicas_on_device_serve_bfloat16_over_grpc(ckpt):
    """Two shards (even and odd experts), each an ExpertServicer with bfloat16 experts on the device behind a
    real grpc.aio server on loopback; the router's gRPC backend sends bfloat16 hidden states and sums the
    replies. Decode-sized and prefill-sized calls both run on the servicer's math thread, off the gRPC loop."""
    need_ray()
    from experts.replica import SERVICE, ExpertServicer, GrpcServer
    from router.grpc_dispatch import GrpcExperts

    a = ckpt.args
    shards = [[(l, e) for l, e in all_pairs(ckpt) if e % 2 == s] for s in range(2)]
    servicers, servers, entries = [], [], []
    for s, pairs in enumerate(shards):
        experts = ExpertSet.load(ckpt, pairs, torch.bfloat16, device=DEVICE)
        info = expert_pb2.InfoResponse(shard=s, replica_id=f"r{s}", dtype="bfloat16", dim=a.dim,
                                       max_message_bytes=MAX_MESSAGE)
        servicer = ExpertServicer(experts, a.dim, a.n_layers, a.n_experts, torch.bfloat16, info, DEVICE)
        servicers.append(servicer)
        servers.append(GrpcServer(servicer, "127.0.0.1", MAX_MESSAGE))
        entries.append(dict(shard=s, num_shards=2, replica_id=f"r{s}", address=servers[-1].address,
                            pairs=[list(p) for p in pairs], max_message_bytes=MAX_MESSAGE))
    backend = GrpcExperts(StaticSource(entries), a.n_layers, a.n_experts, timeout_s=60)
    full = ExpertSet.load(ckpt, all_pairs(ckpt), torch.bfloat16, device=DEVICE)
    sent = [0, 0]  # (token, slot) pairs each shard was sent
    try:
        for n in (5, 4096):
            for layer in range(a.n_layers):
                x, ids, w = routed(n, a.dim, a.n_experts, seed=1000 + 10 * n + layer)
                out = backend.forward(layer, x, ids, w)
                assert out.dtype == torch.bfloat16 and out.shape == x.shape
                assert rel_err(out, reference(ckpt, layer, x, ids, w)) < BF16_REL, (n, layer)
                # The same math in-process on the device: apart from where two shards' partial sums meet in the
                # router (one bfloat16 rounding each), the replicas computed exactly this.
                here = full.forward(layer, x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE)).float().cpu()
                assert rel_err(out, here) < BF16_REL
                for s in (0, 1):
                    sent[s] += int((ids % 2 == s).sum())
        # bfloat16 on the wire, both ways: the replica refuses float32 hidden states and answers bfloat16.
        x, ids, w = routed(3, a.dim, a.n_experts, seed=3, only=[0, 2])
        forward = grpc.insecure_channel(servers[0].address).unary_unary(
            f"/{SERVICE}/Forward", request_serializer=lambda b: b,
            response_deserializer=expert_pb2.ForwardResponse.FromString)
        req = expert_pb2.ForwardRequest(layer=0, hidden=to_wire(x), expert_ids=to_wire(ids), weights=to_wire(w))
        reply = forward(req.SerializeToString(), timeout=30)
        assert reply.output.dtype == "bfloat16" and reply.compute_ns > 0
        assert rel_err(from_wire(reply.output, "output", torch.bfloat16, ndim=2),
                       reference(ckpt, 0, x, ids, w)) < BF16_REL
        req.hidden.CopyFrom(to_wire(x.float()))
        with pytest.raises(grpc.RpcError) as err:
            forward(req.SerializeToString(), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "where bfloat16" in err.value.details()
        # Every routed slot was counted where it ran (the load the autoscaler and the rebalancer read).
        sent[0] += 3 * 2
        assert [sum(servicer.load.report().tokens.values()) for servicer in servicers] == sent
    finally:
        backend.close()
        for srv in servers:
            srv.stop()


# --- (c) the expert plane on Ray + Serve, two replicas on one GPU ----------------------------------------------

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\nclass Matrix:", "for i in range(10):\n    print("]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray with one GPU (num_gpus=1 also fakes one under RAYMOE_CUDA_CHECK_ON_CPU), or the one this
    process already runs when it has a GPU."""
    need_ray()
    import ray

    from cluster.directory import DirectoryClient
    from cluster.ray_init import start_or_join_ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("this process already runs a Ray without a GPU; run tests/test_cuda.py alone")
    os.environ.pop("RAY_ADDRESS", None)  # a Ray of the test's own, never a cluster the machine happens to run
    started = start_or_join_ray(num_cpus=8, num_gpus=1, configure_logging=False)
    # The directory actor, up before the replicas: the first replica would otherwise create it, and its first
    # call fails (and Serve restarts the replica) if that takes longer than the directory's call deadline.
    DirectoryClient().app_names()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_llms():
    llms = {dtype: LLM(BUNDLED_MODEL, expert_backend="local", dtype=dtype) for dtype in ("float32", "bfloat16")}
    yield llms
    for llm in llms.values():
        llm.shutdown()


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def gpu_plane(request, gpu_ray):
    """The bundled model with its experts on Ray: 2 shards of 1 replica, 0.5 GPU each, so both share the GPU."""
    llm = LLM(BUNDLED_MODEL, expert_backend="ray", dtype=request.param, num_shards=2, replicas_per_shard=1,
              num_gpus=0.5)
    yield llm
    llm.shutdown()


def test_replicas_share_the_gpu_and_keep_their_experts_on_it(gpu_plane):
    import ray

    from cluster.directory import DirectoryClient

    def replica_state(serve_replica) -> dict:
        """Run inside a Serve replica actor (through __ray_call__; defined here, so that it travels by value):
        where its ExpertShard keeps its experts."""
        import os

        import ray
        import torch

        shard = serve_replica._replica_impl._user_callable_wrapper.user_callable
        experts = shard.holdings.experts
        cuda = torch.cuda.is_available()
        return dict(device=str(shard.holdings.device), servicer_device=str(shard.servicer.device),
                    weights={str(t.device) for _, w13, w2 in experts.layers.values() for t in (*w13, *w2)},
                    nbytes=experts.nbytes, gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                    gpu_share=ray.get_runtime_context().get_assigned_resources().get("GPU"),
                    visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                    cuda_allocated=torch.cuda.memory_allocated() if cuda else 0,
                    gpu_name=torch.cuda.get_device_name() if cuda else None)

    entries = DirectoryClient(gpu_plane.experts.app_name).replicas()
    assert sorted(e["shard"] for e in entries) == [0, 1]
    states = [ray.get(ray.get_actor(e["actor_name"], namespace="serve").__ray_call__.remote(replica_state),
                      timeout=60) for e in entries]
    print(states)  # in the log: which GPU, how many bytes of experts on it
    for s in states:
        assert s["gpu_share"] == 0.5 and s["gpu_ids"], s  # num_gpus reached the replica actor
        assert s["device"].startswith(DEVICE.type) and s["servicer_device"].startswith(DEVICE.type), s
        assert {d.split(":")[0] for d in s["weights"]} == {DEVICE.type}, s
        if CUDA:
            assert s["cuda_allocated"] >= s["nbytes"] > 0, s
    if ray.cluster_resources().get("GPU") == 1:  # one GPU, two halves of it: both replicas on GPU 0
        assert states[0]["gpu_ids"] == states[1]["gpu_ids"]
        assert ray.available_resources().get("GPU", 0.0) == 0.0


def test_ray_plane_on_gpu_matches_local(gpu_plane, local_llms):
    dtype = gpu_plane.config.dtype
    local = local_llms[dtype]
    ours = gpu_plane.generate(PROMPTS, GREEDY)
    ids = [o.prompt_token_ids + o.outputs[0].token_ids for o in ours]
    if dtype == "float32":
        # Only the summation order differs from the CPU's experts: the same tokens, logprobs within 1e-4 (the
        # CPU-only distributed tests see 1e-5 between Ray and local backends on the same device).
        assert [o.outputs[0].token_ids for o in ours] == \
            [o.outputs[0].token_ids for o in local.generate(PROMPTS, GREEDY)]
        for r, l in zip(gpu_plane.logprobs(ids), local.logprobs(ids), strict=True):
            assert (r - l).abs().max() < 1e-4
        return
    # bfloat16: the GPU's and the CPU's roundings differ, so compare with the float32 model instead. Scoring: as
    # close to it as the local bfloat16 run is (the bound tests/test_model.py puts on bfloat16 against
    # transformers). Decoding: every token the plane picked greedily is within 0.25 nats of the float32 argmax
    # after the same prefix: bfloat16 moves the top tokens' logprobs by up to ~0.1 here (CPU, measured), so a
    # near tie may go either way; a wrong expert output would not stay that close for long.
    ref = local_llms["float32"].logprobs(ids)
    err_ours = float(torch.cat([r - f for r, f in zip(gpu_plane.logprobs(ids), ref, strict=True)]).abs().mean())
    err_local = float(torch.cat([l - f for l, f in zip(local.logprobs(ids), ref, strict=True)]).abs().mean())
    assert 0 < err_ours <= 1.5 * err_local + 0.005, (err_ours, err_local)
    for o, lp in zip(ours, ref, strict=True):
        n = len(o.prompt_token_ids)
        rows = lp[n - 1 : -1]  # row t predicts token t + 1: one row per generated token
        picked = rows.gather(1, torch.tensor(o.outputs[0].token_ids)[:, None]).squeeze(1)
        assert (rows.max(-1).values - picked).max() < 0.25
