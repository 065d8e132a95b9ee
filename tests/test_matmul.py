"""matmul.packed: weights packed for oneDNN multiply as nn.Linear does, and a model whose every weight is packed
matches Hugging Face transformers as the plain one does."""

import pytest
import torch
import torch.nn.functional as F
from hf_reference import build_checkpoint, hf_greedy_oracle, hf_logprobs

import matmul.packed
from checkpoint.reader import Checkpoint
from experts.ffn import ExpertSet
from matmul.packed import Linear, linear, pack
from router import LLM, SamplingParams

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [(0,), (1,), (8,), (33,), (3, 5)])
def test_a_packed_weight_multiplies_as_the_plain_one(rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 512, generator=g) / 512**0.5  # 4 MiB: packed
    packed = pack(w)
    assert packed.is_mkldnn
    x = torch.randn(*rows, 512, generator=g)
    torch.testing.assert_close(linear(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_packed_weight_refuses_what_it_cannot_multiply():
    packed = pack(torch.randn(2048, 512))
    with pytest.raises(TypeError, match="without gradients"):
        linear(torch.randn(2, 512, requires_grad=True), packed)  # oneDNN would drop the gradient silently
    with pytest.raises(TypeError, match="bfloat16"):
        linear(torch.randn(2, 512, dtype=torch.bfloat16), packed)


def test_weights_that_gain_nothing_or_train_stay_as_they_are():
    small = torch.randn(64, 512)  # 128 KiB: stays in the caches
    half = torch.randn(2048, 512, dtype=torch.bfloat16)
    trained = torch.randn(2048, 512, requires_grad=True)
    for w in (small, half, trained):
        assert pack(w) is w
    x = torch.randn(2, 512, requires_grad=True)
    linear(x, trained).sum().backward()  # a weight left as it is trains as nn.Linear's does
    torch.testing.assert_close(trained.grad, x.detach().sum(0).expand(2048, 512))


@needs_onednn
def test_a_model_with_every_weight_packed_matches_hf(tmp_path, monkeypatch):
    """The tiny checkpoints' weights are too small to be packed, so here every one is: the projections, gate and
    LM head of the router model and every expert's."""
    monkeypatch.setattr(matmul.packed, "PACK_MIN_BYTES", 0)
    hf = build_checkpoint(tmp_path, seed=5)
    llm = LLM(tmp_path)
    try:
        linears = [m for m in llm.engine.model.modules() if isinstance(m, Linear)]
        assert len(linears) == 2 * 5 + 1 and all(m.weight.is_mkldnn for m in linears)
        experts = llm.experts.experts
        assert all(w.is_mkldnn for _, w13, w2 in experts.layers.values() for w in (*w13, *w2))
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 9, 40)]
        ours = llm.logprobs(prompts, chunk_size=16)
        assert max(float((a - hf_logprobs(hf, p)).abs().max()) for a, p in zip(ours, prompts, strict=True)) <= 1e-4
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        assert all(hf_greedy_oracle(hf, p, o.outputs[0].token_ids) for p, o in zip(prompts, outs, strict=True))
    finally:
        llm.shutdown()


@needs_onednn
def test_packed_expert_sets_reload_what_they_gain_and_warm_up(tmp_path, monkeypatch):
    """A replica whose placement changes loads only the pairs it gains (reuse=): the packed weights it keeps are
    the same tensors, and the grown set computes what a fresh load of the same pairs does."""
    monkeypatch.setattr(matmul.packed, "PACK_MIN_BYTES", 0)
    build_checkpoint(tmp_path, seed=6)
    ckpt = Checkpoint(tmp_path)
    a = ckpt.args
    even = [(l, e) for l in range(a.n_layers) for e in range(0, a.n_experts, 2)]
    part = ExpertSet.load(ckpt, even, torch.float32)
    assert all(w.is_mkldnn for _, w13, w2 in part.layers.values() for w in (*w13, *w2))
    grown = ExpertSet.load(ckpt, [*even, (1, 3)], torch.float32, reuse=part)
    assert grown.weights(1, 2)[0] is part.weights(1, 2)[0] and grown.weights(1, 3)[0].is_mkldnn
    grown.warm_up()
    fresh = ExpertSet.load(ckpt, [*even, (1, 3)], torch.float32)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, a.dim, generator=g)
    ids = torch.randint(0, a.n_experts, (40, 2), generator=g)
    ids[::3, 1] = -1  # slots routed nowhere
    w = torch.rand(40, 2, generator=g)
    assert torch.equal(grown.forward(1, x, ids, w), fresh.forward(1, x, ids, w))
    assert not torch.allclose(grown.forward(1, x, ids, w), part.forward(1, x, ids, w))  # expert 3 now runs here
    with pytest.raises(ValueError, match="cannot reuse"):
        ExpertSet.load(ckpt, even, torch.float32, reuse=part, device=torch.device("meta"))
