"""The bundled tiny Mixtral, its tokenizer, the training code that made it, and the routing report."""

import json

import pytest
import torch
from hf_reference import hf_logprobs

from bench.routing import (
    SequenceTrace,
    consecutive_fractions,
    layer_stats,
    load_trace,
    save_trace,
    trace_texts,
)
from checkpoint.bundled import BUNDLED_MODEL
from router import LLM, SamplingParams
from training.bpe import BOS_ID, EOS_ID
from training.corpus import HELD_OUT, split, stdlib_files
from training.evaluate import held_out_texts
from training.train import TrainConfig, train
from training.trainable import load_balancing_loss, window_mask

SOURCE = '''import os


class Config:
    """Settings read from the environment."""

    def __init__(self, prefix: str = "APP_") -> None:
        self.values = {k[len(prefix):]: v for k, v in os.environ.items() if k.startswith(prefix)}

    def get(self, key, default=None):
        try:
            return self.values[key]
        except KeyError:
            return default
'''


def hf_model(path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bundled():
    llm = LLM(BUNDLED_MODEL, expert_backend="local", dtype="float32")
    yield llm, hf_model(BUNDLED_MODEL)
    llm.shutdown()


def test_bundled_checkpoint_layout_and_config():
    files = {p.name for p in BUNDLED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert sum(p.stat().st_size for p in BUNDLED_MODEL.iterdir()) <= 16 * 2**20
    cfg = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert cfg["sliding_window"] and cfg["sliding_window"] < cfg["max_position_embeddings"]
    gen = json.loads((BUNDLED_MODEL / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (BOS_ID, EOS_ID) == (cfg["bos_token_id"], cfg["eos_token_id"])


def test_bundled_agrees_with_transformers_past_the_window(bundled):
    llm, ref = bundled
    ids = llm.encode(SOURCE * 3)[0]
    assert len(ids) > 2 * llm.args.sliding_window
    ours = llm.logprobs([ids], chunk_size=50)[0]
    assert (ours - hf_logprobs(ref, ids)).abs().max().item() < 1e-4


def test_routing_trace_is_the_models_top2(bundled):
    llm, ref = bundled
    (trace,), bpb = trace_texts(llm, {"snippet": SOURCE})
    T = len(trace.token_ids)
    assert trace.expert_ids.shape == trace.weights.shape == (llm.args.n_layers, T, 2)
    assert 0 < bpb < 8
    with torch.no_grad():
        router_logits = ref(torch.tensor([trace.token_ids]), output_router_logits=True).router_logits
    for layer, logits in enumerate(router_logits):  # (T, E) each
        top = logits.view(T, -1).topk(2, dim=-1)
        assert torch.equal(trace.expert_ids[layer], top.indices)
        torch.testing.assert_close(trace.weights[layer], torch.softmax(top.values, -1), atol=1e-5, rtol=0)


def test_tokenizer_round_trips_python_source(bundled):
    llm, _ = bundled
    text = held_out_texts()["textwrap.py"] + SOURCE + "s = 'naïve — ✓ 日本'\n"
    ids = llm.tokenizer.encode(text)
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
    assert llm.tokenizer.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.5  # BPE merges, not bytes


def test_corpus_holds_out_files_and_skips_tests():
    files = stdlib_files()
    train_files, val = split(files)
    assert sorted(val) == sorted(HELD_OUT) and not set(val) & set(train_files)
    assert not any("/test/" in f or f.startswith(("test/", "idlelib/idle_test/")) for f in files)
    assert "argparse.py" in train_files


def test_window_mask_semantics():
    m = window_mask(6, 3)
    for i in range(6):
        assert [j for j in range(6) if m[i, j]] == [j for j in range(6) if i - 3 < j <= i]


def test_load_balancing_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    gates = [torch.randn(37, 8, generator=g) * 3 for _ in range(3)]
    ours = load_balancing_loss(gates, 2)
    torch.testing.assert_close(ours, load_balancing_loss_func(tuple(gates), 8, 2))
    balanced = torch.eye(8).repeat(4, 1)  # every expert first choice equally often
    assert load_balancing_loss([balanced * 100], 1).item() == pytest.approx(1.0)


def test_small_training_run_learns_and_exports_a_loadable_checkpoint(tmp_path):
    cfg = TrainConfig(steps=16, batch_size=4, seq_len=48, lr=1e-2, warmup=2, eval_every=8, eval_tokens=96,
                      max_files=6, vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=32,
                      sliding_window=16, max_position_embeddings=512, dtype="float32")
    summary = train(cfg, tmp_path)
    train(TrainConfig(**vars(cfg)), tmp_path / "again")  # the same seed gives the same weights
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    ce = summary["history"]["train_ce"]
    assert sum(ce[-4:]) / 4 < ce[0] - 0.5
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    llm = LLM(tmp_path, expert_backend="local", dtype="float32")
    try:
        ids = llm.encode(SOURCE)[0]
        ours = llm.logprobs([ids], chunk_size=20)[0]
    finally:
        llm.shutdown()
    assert (ours - hf_logprobs(hf_model(tmp_path), ids)).abs().max().item() < 1e-4


def test_consecutive_fractions_on_a_hand_built_trace():
    a = torch.tensor([[0, 1], [0, 2], [3, 1], [3, 4]])  # pairs: same+share, neither, same+share
    b = torch.tensor([[5, 6]])  # no pair within; nothing pairs across sequences
    assert consecutive_fractions([a, b]) == (2 / 3, 2 / 3)
    c = torch.tensor([[0, 1], [1, 0], [2, 1]])  # first choices differ, sets share an expert
    assert consecutive_fractions([c]) == (0.0, 1.0)


def test_layer_stats_shares_and_shuffled_baseline():
    alternating = torch.tensor([[0, 1], [2, 3]] * 50)  # never alike in order, alike half the time shuffled
    s = layer_stats([alternating], n_experts=8, seed=0)
    assert s.same_first == 0.0 and s.share_topk == 0.0
    assert 0.3 < s.same_first_shuffled < 0.7
    assert s.expert_share == [0.25] * 4 + [0.0] * 4
    constant = layer_stats([torch.tensor([[5, 7]] * 10)], n_experts=8)
    assert constant.same_first == constant.same_first_shuffled == 1.0


def test_trace_round_trips_through_msgpack(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = SequenceTrace("a.py", [1, 5, 9], torch.randint(0, 8, (4, 3, 2), generator=g), torch.rand(4, 3, 2, generator=g))
    save_trace(tmp_path / "t.msgpack", [t], "m")
    (back,) = load_trace(tmp_path / "t.msgpack")
    assert back.path == "a.py" and back.token_ids == [1, 5, 9]
    assert torch.equal(back.expert_ids, t.expert_ids) and torch.equal(back.weights, t.weights)


def test_text_prompts_text_outputs_and_stop_strings(bundled):
    llm = bundled[0]
    prompt = "def fibonacci(n):\n"
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    assert out.prompt == prompt and out.prompt_token_ids == llm.tokenizer.encode(prompt)
    assert out.prompt_token_ids[0] == 1  # <s>
    text = out.outputs[0].text
    assert text == llm.tokenizer.decode(out.outputs[0].token_ids) and text.strip()
    # Stopping at a string: the text ends just before it and generation stops at that token.
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.find(stop)]
    assert len(stopped.token_ids) < len(out.outputs[0].token_ids)
