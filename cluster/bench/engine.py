"""`raymoe bench engine`: the engine's decode and prefill beside HF transformers on the same weights."""

import argparse
import tempfile
from pathlib import Path

import torch

from cluster.bench.common import bench_checkpoint, best_of, best_of_pair


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence in the decode runs")
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best counts)")
    p.add_argument("--checkpoint", type=Path, help="benchmark checkpoint dir (default: a fresh random one)")


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, repeats)


def flops_per_token(cfg) -> int:
    """Matmul FLOPs of one decoded token, attention score work over the window included."""
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    experts = cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size
    scores = 2 * cfg.num_attention_heads * hd * (cfg.sliding_window or 0)
    per_layer = attn + d * cfg.num_local_experts + experts + scores
    return 2 * (cfg.num_hidden_layers * per_layer + d * cfg.vocab_size)


def run(args: argparse.Namespace) -> None:
    from transformers import MixtralForCausalLM

    from router import LLM, SamplingParams

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = bench_checkpoint(args.checkpoint or Path(tmp) / "bench")
        hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        llm = LLM(path, max_num_seqs=max(args.batch_sizes))
        vocab = hf.config.vocab_size
        print(f"checkpoint {path}: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, "
              f"torch threads {torch.get_num_threads()}")
        print(f"{'measure':<22}{'raymoe':>12}{'transformers':>14}{'ratio':>8}")

        def row(name: str, ours: float, ref: float, unit: str) -> None:
            print(f"{name:<22}{ours:>10.1f}{unit:>2}{ref:>12.1f}{unit:>2}{ours / ref:>7.2f}x")

        n = args.new_tokens
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        ours_tps = {}
        for b in args.batch_sizes:
            prompts = torch.randint(0, vocab, (b, args.prompt_len))
            ours_t, ref_t = best_of_pair(
                lambda p=prompts: llm.generate([{"prompt_token_ids": x} for x in p.tolist()], params),
                lambda p=prompts: hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0),
                args.repeats)
            ours_tps[b] = b * n / ours_t
            row(f"decode b={b} (tok/s)", ours_tps[b], b * n / ref_t, "")

        prompt = torch.randint(0, vocab, (1, args.prefill_len))
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        ours_t, ref_t = best_of_pair(lambda: llm.generate([{"prompt_token_ids": prompt[0].tolist()}], one),
                                     lambda: hf(prompt, logits_to_keep=1), args.repeats)
        row(f"prefill {args.prefill_len} (tok/s)", args.prefill_len / ours_t, args.prefill_len / ref_t, "")

        peak = matmul_peak_flops()
        b = max(args.batch_sizes)
        achieved = ours_tps[b] * flops_per_token(hf.config)
        print(f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s (1024^3 mm); decode b={b} reaches "
              f"{achieved / 1e9:.2f} GFLOP/s = {achieved / peak:.1%} of it")
        llm.shutdown()
