"""Expert-parallel training on Ray Train: every (E, D) layout trains the single-process model, capacity drops
are counted, and the checkpoint is one the server reads.

All runs share one TorchTrainer launch of 4 workers (a launch costs seconds of start-up): (4, 1) and (2, 2)
on all four, then (2, 1) on ranks 0-1 while (1, 1) and a dropping (2, 1) run on ranks 2-3.
"""

import json
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from router.model import route
from training.ep_layer import ExchangeTimer, capacity_keep, expert_capacity, expert_parallel_moe
from training.ep_train import EPTrainConfig, Job, fit, load_tokens
from training.train import make_optimizer, sample_batch, seeded_model, train_step

LAYOUTS = {"ep1": (1, 1), "ep2": (2, 1), "ep2dp2": (2, 2), "ep4": (4, 1)}
CAPACITY = 1.0  # an even share: what overflows depends on how unevenly layer 0 routes


def base_config() -> EPTrainConfig:
    # warmup 0: full-size Adam steps from the first, so a wrong gradient moves weights by ~lr, not lr / 30
    return EPTrainConfig(tiny=True, steps=3, batch_size=8, warmup=0, seed=3).resolved()


def reference(cfg: EPTrainConfig, data: torch.Tensor) -> dict:
    """Single-process training (train-tiny's step) on the same seed and data."""
    model, gen = seeded_model(cfg)
    opt = make_optimizer(model, cfg)
    losses, norms = [], []
    for step in range(cfg.steps):
        ce, aux, norm = train_step(model, opt, sample_batch(data, cfg, gen), cfg, step)
        losses.append(ce.item() + cfg.aux_loss_coef * aux.item())
        norms.append(norm.item())
    return {"losses": losses, "norms": norms, "model": model.eval()}


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # notice finished workers sooner than 2 s
    root = tmp_path_factory.mktemp("ep-train")
    cfg = base_config()
    cfg, data, tokenizer_json = load_tokens(cfg)
    jobs = [Job(name, replace(cfg, ep=ep, dp=dp, out=root / name)) for name, (ep, dp) in LAYOUTS.items()]
    jobs = {j.name: j for j in jobs}
    jobs["ep1"].first_rank = 2
    dropping = Job("dropping", replace(cfg, ep=2, dp=1, steps=1, capacity_factor=CAPACITY, out=root / "dropping"),
                   first_rank=2)
    order = [jobs["ep4"], jobs["ep2dp2"], jobs["ep2"], jobs["ep1"], dropping]
    fit(order, data, tokenizer_json, cpus_per_worker=0.25)
    return {"cfg": cfg, "data": data, "root": root, "ref": reference(cfg, data)}


def test_train_command_flags():
    from cli.main import build, build_parser

    args = build_parser().parse_args(["train", "--tiny", "--ep", "2", "--dp", "2", "--steps", "3", "--out", "d",
                                      "--capacity-factor", "1.25", "--cpus-per-worker", "0.25"])
    cfg = build(EPTrainConfig, args).resolved()
    assert (cfg.ep, cfg.dp, cfg.world_size, cfg.steps, cfg.capacity_factor) == (2, 2, 4, 3, 1.25)
    assert (cfg.dim, cfg.n_layers, str(cfg.out), cfg.cpus_per_worker) == (32, 2, "d", 0.25)
    assert args.func.__name__ == "train"
    with pytest.raises(ValueError, match="does not divide"):
        replace(cfg, ep=3).resolved()


def test_capacity_keeps_first_choices_first():
    ids = torch.tensor([[0, 1], [0, 2], [1, 0]])
    # capacity 1: e0 takes t0's first choice; t1's first choice and t2's second are over; e1 takes t2's
    # first choice before t0's second.
    assert capacity_keep(ids, 3, 1).tolist() == [True, False, False, True, True, False]
    assert capacity_keep(ids, 3, None).all()
    assert expert_capacity(16, 2, 8, 0.5) == 2 and expert_capacity(16, 2, 8, None) is None


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone: the exchange is the identity, the rest is all there."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_exchange_layer_is_the_single_process_moe_and_drops_to_zero(one_rank_group):
    cfg = base_config()
    model = seeded_model(cfg)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, cfg.dim, generator=g, requires_grad=True)
    weights, ids = route(model.core.layers[0].gate(x), cfg.top_k)
    ref_x = x.detach().clone().requires_grad_()
    ref = model.moe(0, ref_x, ids, weights.detach())
    timer = ExchangeTimer()
    out, dropped = expert_parallel_moe(x, ids, weights.detach(), model.w13[0], model.w2[0], cfg.n_experts,
                                       one_rank_group, timer)
    assert dropped == 0 and timer.calls == 3  # counts, rows out, rows back
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    assert timer.calls == 5  # backward: both row exchanges reversed
    w13_grad = model.w13.grad.clone()
    model.w13.grad = None
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(w13_grad, model.w13.grad)

    capacity = 2
    keep = capacity_keep(ids, cfg.n_experts, capacity).view(ids.shape)
    out, dropped = expert_parallel_moe(x, ids, weights.detach(), model.w13[0], model.w2[0], cfg.n_experts,
                                       one_rank_group, timer, capacity)
    assert dropped == (~keep).sum().item() > 0
    torch.testing.assert_close(out, model.moe(0, x, ids, weights.detach() * keep))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_the_single_process_model(runs, name):
    ref, out = runs["ref"], runs["root"] / name
    losses = json.loads((out / "losses.json").read_text())
    summary = json.loads((out / "training.json").read_text())
    assert (summary["layout"]["ep"], summary["layout"]["dp"]) == LAYOUTS[name]
    assert summary["layout"]["backend"] == "gloo"
    ep, dp = LAYOUTS[name]
    assert summary["layout"]["experts_per_rank"] == runs["cfg"].n_experts // ep
    first = 2 if name == "ep1" else 0  # global ranks of the run's leader's groups
    assert summary["layout"]["leader_groups"] == {"token_exchange": [first + i for i in range(ep)],
                                                  "expert_grads": [first + d * ep for d in range(dp)],
                                                  "dense_grads": [first + r for r in range(ep * dp)]}
    assert losses == pytest.approx(ref["losses"], rel=1e-5)
    assert summary["history"]["grad_norm"] == pytest.approx(ref["norms"], rel=1e-4)
    assert summary["history"]["dropped"] == [[0, 0]] * runs["cfg"].steps
    assert losses[-1] < losses[0]
    ours = load_file(out / "model.safetensors")
    theirs = ref["model"].hf_state_dict()
    assert ours.keys() == theirs.keys()
    initial = seeded_model(runs["cfg"])[0].hf_state_dict()
    for k, v in theirs.items():
        assert (ours[k] - v).abs().max().item() < 2e-5, k
    # the weights did move (by ~lr per step), far beyond that tolerance
    moved = max((theirs[k] - initial[k]).abs().max().item() for k in theirs)
    assert moved > 100 * 2e-5


def test_dropped_slots_are_counted(runs):
    """Layer 0's routing at step 0 depends on nothing dropped: count its overflow by hand per rank."""
    cfg, out = runs["cfg"], runs["root"] / "dropping"
    model, gen = seeded_model(cfg)
    batch = sample_batch(runs["data"], cfg, gen)
    n = cfg.batch_size // 2
    expected = 0
    with torch.no_grad():
        for rank in range(2):
            _, gates = model(batch[rank * n : (rank + 1) * n, :-1])
            ids = gates[0].topk(cfg.top_k, dim=-1).indices
            capacity = expert_capacity(len(ids), cfg.top_k, cfg.n_experts, CAPACITY)
            per_expert = torch.bincount(ids.flatten(), minlength=cfg.n_experts)
            expected += (per_expert - capacity).clamp(min=0).sum().item()
    summary = json.loads((out / "training.json").read_text())
    assert expected > 0
    assert summary["history"]["dropped"][0][0] == expected
    assert sum(summary["history"]["dropped"][0]) < cfg.batch_size * cfg.seq_len * cfg.top_k


def test_the_checkpoint_is_served(runs):
    from router.llm import LLM

    ref = runs["ref"]["model"]
    llm = LLM(runs["root"] / "ep2dp2", expert_backend="local", dtype="float32")
    try:
        ids = llm.encode("def f(x):\n    return x + 1\n")[0]
        ours = llm.logprobs([ids])[0]
    finally:
        llm.shutdown()
    with torch.no_grad():
        theirs = torch.log_softmax(ref(torch.tensor([ids]))[0][0], -1)
    assert (ours - theirs).abs().max().item() < 1e-4
