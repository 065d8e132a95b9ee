"""The model core against Hugging Face transformers' MixtralForCausalLM on tiny random checkpoints."""

import pytest
import torch
from hf_reference import build_checkpoint, hf_greedy_oracle, hf_logprobs

from attention.cache import RollingKVCache
from router import LLM, SamplingParams

# (name, config overrides): GQA, MHA without a window, MQA with top-1, many experts with top-3.
CONFIGS = {
    "gqa-window": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=16),
    "mha-full": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=None, num_local_experts=8),
    "mqa-top1": dict(num_attention_heads=8, num_key_value_heads=1, sliding_window=8, head_dim=16,
                     num_local_experts=3, num_experts_per_tok=1),
    "top3": dict(num_attention_heads=2, num_key_value_heads=1, sliding_window=12, num_local_experts=6,
                 num_experts_per_tok=3, num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_checkpoint(path, seed=len(request.param), **CONFIGS[request.param])
    llm = LLM(path)
    yield hf, llm, hf.config.sliding_window
    llm.shutdown()


def random_prompts(lengths: list[int], vocab: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def max_diff(ours: list[torch.Tensor], prompts: list[list[int]], hf) -> float:
    return max(float((a - hf_logprobs(hf, p)).abs().max()) for a, p in zip(ours, prompts, strict=True))


def test_slot_arithmetic_of_the_worked_example():
    cache = RollingKVCache(1, 1, 4, 1, 2, torch.float32)
    assert cache.slot_positions(torch.tensor([6]))[0].tolist() == [4, 5, 2, 3]
    assert (cache.slot_positions(torch.tensor([2]))[0] >= 0).tolist() == [True, True, False, False]
    meta = cache.plan([], [], [(0, 2, 5)])  # chunk of 5 at positions 2..6 after 2 cached tokens
    mask = meta.prefills[0].mask  # keys: cached positions 0, 1, then 2..6
    assert mask[-1].tolist() == [False, False, False, True, True, True, True]
    assert mask[0].tolist() == [True, True, True, False, False, False, False]


@pytest.mark.parametrize("chunk", ["below", "equal", "above"])
def test_logprobs_match_hf_for_ragged_batches(model, chunk):
    hf, llm, window = model
    w = window or 16
    chunk_size = {"below": max(1, w // 3), "equal": w, "above": 2 * w + 3}[chunk]
    prompts = random_prompts([1, 5, w, 3 * w + 7, 4 * w + 1], seed=w)
    ours = llm.logprobs(prompts, chunk_size=chunk_size)
    assert [t.shape for t in ours] == [(len(p), 128) for p in prompts]
    assert max_diff(ours, prompts, hf) <= 1e-4


def test_greedy_decode_far_past_the_window_matches_hf(model):
    """Each generated token is the reference's argmax over the whole sequence so far."""
    hf, llm, window = model
    w = window or 16
    prompts = random_prompts([3, w + 1, 2 * w + 5], seed=1)
    n_new = 4 * w
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True))
    for out, prompt in zip(outs, prompts, strict=True):
        gen = out.outputs[0].token_ids
        assert len(gen) == n_new and out.outputs[0].finish_reason == "length"
        assert hf_greedy_oracle(hf, prompt, gen)


def test_engine_queues_and_splits_without_changing_results(tmp_path):
    hf = build_checkpoint(tmp_path, seed=3)
    prompts = random_prompts([7, 40, 2, 23, 31, 9], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    wide = LLM(tmp_path).generate([{"prompt_token_ids": p} for p in prompts], params)
    # Two cache rows and a 10-token budget: sequences wait, join mid-way, and prompts split unevenly.
    narrow_llm = LLM(tmp_path, max_num_seqs=2, max_num_batched_tokens=10, chunk_size=10)
    narrow = narrow_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in narrow] == [o.outputs[0].token_ids for o in wide]
    assert max_diff(narrow_llm.logprobs(prompts), prompts, hf) <= 1e-4


def test_sharded_bfloat16_checkpoint(tmp_path):
    hf = build_checkpoint(tmp_path, dtype=torch.bfloat16, max_shard_size="40KB", seed=5)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    prompts = random_prompts([9, 33, 50], seed=5)
    # float32 compute on the bfloat16 weights is exact against the reference on the same weights.
    assert max_diff(LLM(tmp_path, dtype="float32").logprobs(prompts), prompts, hf) <= 1e-4
    # bfloat16 compute: as close to the float32 reference as transformers' own bfloat16 run is.
    from transformers import MixtralForCausalLM

    hf_bf16 = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = LLM(tmp_path, dtype="bfloat16").logprobs(prompts)
    ref = torch.cat([hf_logprobs(hf, p) for p in prompts])
    err_ours = float((torch.cat(ours) - ref).abs().mean())
    err_hf = float((torch.cat([hf_logprobs(hf_bf16, p) for p in prompts]) - ref).abs().mean())
    assert 0 < err_ours <= 1.5 * err_hf + 0.005


def test_sampling_is_seeded_and_respects_top_k_and_stops(tmp_path):
    build_checkpoint(tmp_path, seed=7)
    llm = LLM(tmp_path)
    prompt = [{"prompt_token_ids": [5, 6, 7]}]

    def run(**kw):
        return llm.generate(prompt, SamplingParams(max_tokens=20, ignore_eos=True, **kw))[0].outputs[0]

    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert run(top_k=1, seed=3).token_ids == run(temperature=0.0).token_ids
    assert run(top_p=1e-6, seed=4).token_ids == run(temperature=0.0).token_ids
    # top_k=3: every sampled token is among the 3 most likely at its step.
    s = run(top_k=3, temperature=5.0, seed=5).token_ids
    lps = llm.logprobs([[5, 6, 7] + s])[0][2:-1]
    assert all(t in row.topk(3).indices.tolist() for t, row in zip(s, lps, strict=True))
    greedy = run(temperature=0.0).token_ids
    stop_at = greedy[4]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_at]))[0]
    assert out.outputs[0].token_ids == greedy[: greedy.index(stop_at) + 1]
    assert out.outputs[0].finish_reason == "stop"


def test_eos_ends_a_sequence_unless_ignored(tmp_path):
    build_checkpoint(tmp_path, seed=11)
    greedy = LLM(tmp_path).generate([[9, 8]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    first = greedy[0].outputs[0].token_ids[2]
    build_checkpoint(tmp_path, seed=11, eos_token_id=first)
    llm = LLM(tmp_path)
    out = llm.generate([[9, 8]], SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
    assert out.token_ids[-1] == first and len(out.token_ids) <= 3 and out.finish_reason == "stop"
    out = llm.generate([[9, 8]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 10


def test_requests_are_validated(tmp_path):
    build_checkpoint(tmp_path, max_position_embeddings=64)
    llm = LLM(tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 500]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="no tokenizer.json"):
        llm.generate("text needs a tokenizer")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tmp_path, dtype="float64")
