"""`raymoe bench engine`: the engine's decode and prefill beside HF transformers on the same weights, each
decode rate as a fraction of this machine's roof (weight bandwidth and FLOP rate, measured in the same run),
and decode speed over a long generation (per-token cost must not grow with the output)."""

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.harness import bench_checkpoint, best_of, best_of_pair
from checkpoint.bundled import BUNDLED_MODEL


@dataclass
class EngineBenchOptions:
    """The decode, prefill and long-generation runs."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "decode batch sizes"})
    new_tokens: int = field(default=48, metadata={"help": "tokens generated per sequence in the decode runs"})
    prompt_len: int = field(default=16, metadata={"help": "prompt tokens per sequence in the decode runs"})
    prefill_len: int = field(default=1024, metadata={"help": "prompt tokens of the prefill run"})
    repeats: int = field(default=3, metadata={"help": "timed runs per measurement (the best counts)"})
    checkpoint: Path | None = field(default=None, metadata={
        "help": "benchmark checkpoint dir (default: a fresh random one)"})
    long_tokens: list[int] = field(default_factory=lambda: [1024, 16384], metadata={
        "help": "output lengths of the long-generation runs (bundled model, one sequence, text and stop "
                "strings on); empty to skip"})


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, repeats)


def gemv_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s this machine streams float32 weights at in a vector-matrix product over input-major weights far
    larger than the caches: the rate a decode step's weights could stream at, whatever kernel reads them."""
    n = 4096
    w, x = torch.randn(n, mbytes * 2**20 // (4 * n)), torch.randn(1, n)
    return w.numel() * 4 / best_of(lambda: x @ w, repeats)


def expert_matmul_bandwidth(cfg, rows: int, n_experts: int = 32, repeats: int = 3) -> float:
    """Bytes/s the engine's own expert kernel (experts.ffn.swiglu on weights as matmul.packed.pack keeps them)
    streams weights at with `rows` tokens an expert, over n_experts experts' weights, far larger than the caches:
    the rate a decode step's expert math can reach on this machine."""
    from experts.ffn import swiglu
    from matmul.packed import pack

    d, inter = cfg.hidden_size, cfg.intermediate_size
    w13 = [pack(torch.randn(2 * inter, d)) for _ in range(n_experts)]
    w2 = [pack(torch.randn(d, inter)) for _ in range(n_experts)]
    x = torch.randn(rows, d)

    def run() -> None:
        for a, b in zip(w13, w2, strict=True):
            swiglu(x, a, b)
    return n_experts * 3 * d * inter * 4 / best_of(run, repeats)


def experts_touched(cfg, batch: int) -> float:
    """Experts of a layer a decode step of `batch` tokens touches, in expectation, with routing spread over them:
    E * (1 - (1 - k / E) ** batch) (k = 2: 2 at batch 1, 7.2 of 8 at batch 8)."""
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - k / E) ** batch)


def weight_bytes_per_step(cfg, batch: int) -> float:
    """float32 weight bytes one decode step of `batch` sequences reads: every dense matrix, the LM head, and
    the experts its tokens touch (experts_touched)."""
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    E = cfg.num_local_experts
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = attn + d * E + experts_touched(cfg, batch) * 3 * d * cfg.intermediate_size
    return 4 * (cfg.num_hidden_layers * per_layer + d * cfg.vocab_size)


def roof_tokens_per_s(cfg, batch: int, bandwidth: float, flop_rate: float) -> tuple[float, str]:
    """The decode rate a step of `batch` cannot beat on this machine: it must read its weights at `bandwidth`
    and do its matmuls at `flop_rate`; -> (tokens/s, which of the two binds)."""
    read_s = weight_bytes_per_step(cfg, batch) / bandwidth
    math_s = batch * flops_per_token(cfg) / flop_rate
    return batch / max(read_s, math_s), ("memory" if read_s >= math_s else "compute")


def flops_per_token(cfg) -> int:
    """Matmul FLOPs of one decoded token, attention score work over the window included."""
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    experts = cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size
    scores = 2 * cfg.num_attention_heads * hd * (cfg.sliding_window or 0)
    per_layer = attn + d * cfg.num_local_experts + experts + scores
    return 2 * (cfg.num_hidden_layers * per_layer + d * cfg.vocab_size)


def long_generation(lengths: list[int], rounds: int = 2) -> None:
    """Decode tokens/s of one sequence of the bundled model for each output length, best of `rounds`
    interleaved runs: with incremental detokenization and stop-string checks the rate must not fall as
    the output grows."""
    from router import LLM, SamplingParams

    llm = LLM(BUNDLED_MODEL, expert_backend="local", max_num_seqs=1)
    try:
        print(f"\n== long generation: bundled model, one sequence, text decoded and 2 stop strings checked "
              f"every token, torch threads {torch.get_num_threads()}, best of {rounds} interleaved runs")
        rates: dict[int, float] = {}
        chars: dict[int, int] = {}
        for _ in range(rounds):
            for n in lengths:
                params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                        stop=["\x00never-1", "\x00never-2"])
                t = time.perf_counter()
                out = llm.generate(["def fibonacci(n):"], params)[0].outputs[0]
                rates[n] = max(rates.get(n, 0.0), len(out.token_ids) / (time.perf_counter() - t))
                chars[n] = len(out.text)
        for n in lengths:
            print(f"{n:>6} tokens: {rates[n]:>7.1f} tok/s ({chars[n]} characters of text)")
        if len(lengths) > 1:
            lo, hi = min(lengths), max(lengths)
            print(f"{hi} vs {lo} tokens: {rates[hi] / rates[lo]:.2f}x the rate")
    finally:
        llm.shutdown()


def run(o: EngineBenchOptions) -> None:
    from transformers import MixtralForCausalLM

    from router import LLM, SamplingParams

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = bench_checkpoint(o.checkpoint or Path(tmp) / "bench")
        hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        llm = LLM(path, max_num_seqs=max(o.batch_sizes))
        vocab = hf.config.vocab_size
        print(f"checkpoint {path}: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, "
              f"torch threads {torch.get_num_threads()}")
        print(f"{'measure':<22}{'raymoe':>12}{'transformers':>14}{'ratio':>8}")

        def row(name: str, ours: float, ref: float, unit: str) -> None:
            print(f"{name:<22}{ours:>10.1f}{unit:>2}{ref:>12.1f}{unit:>2}{ours / ref:>7.2f}x")

        n = o.new_tokens
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        ours_tps, ref_tps = {}, {}
        for b in o.batch_sizes:
            prompts = torch.randint(0, vocab, (b, o.prompt_len))
            ours_t, ref_t = best_of_pair(
                lambda p=prompts: llm.generate([{"prompt_token_ids": x} for x in p.tolist()], params),
                lambda p=prompts: hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0),
                o.repeats)
            ours_tps[b], ref_tps[b] = b * n / ours_t, b * n / ref_t
            row(f"decode b={b} (tok/s)", ours_tps[b], ref_tps[b], "")

        prompt = torch.randint(0, vocab, (1, o.prefill_len))
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        ours_t, ref_t = best_of_pair(lambda: llm.generate([{"prompt_token_ids": prompt[0].tolist()}], one),
                                     lambda: hf(prompt, logits_to_keep=1), o.repeats)
        row(f"prefill {o.prefill_len} (tok/s)", o.prefill_len / ours_t, o.prefill_len / ref_t, "")

        peak, bandwidth = matmul_peak_flops(), gemv_bandwidth()
        print(f"\nroofline: this machine multiplies at {peak / 1e9:.1f} GFLOP/s (float32 1024^3 matmul) and reads "
              f"weights at {bandwidth / 1e9:.1f} GB/s (256 MB vector-matrix product), measured now")
        for b in o.batch_sizes:
            roof, bound = roof_tokens_per_s(hf.config, b, bandwidth, peak)
            print(f"decode b={b:<3} roof {roof:>7.0f} tok/s ({bound}-bound: "
                  f"{weight_bytes_per_step(hf.config, b) / 2**20:.0f} MiB read a step); raymoe "
                  f"{ours_tps[b]:>6.0f} = {ours_tps[b] / roof:.0%}, transformers {ref_tps[b]:>6.0f} = "
                  f"{ref_tps[b] / roof:.0%} of it")
        cfg = hf.config
        print("the expert kernel (swiglu, packed weights) on this machine, at the rows an expert gets a step:")
        for b in o.batch_sizes:
            rows = max(1, round(b * cfg.num_experts_per_tok / experts_touched(cfg, b)))
            rate = expert_matmul_bandwidth(cfg, rows)
            kernel_roof, _ = roof_tokens_per_s(cfg, b, rate, peak)
            print(f"decode b={b:<3} {rows:>2} rows an expert: {rate / 1e9:5.1f} GB/s ({rate / bandwidth:.0%} of the "
                  f"probe's); roof at that rate {kernel_roof:>6.0f} tok/s, raymoe {ours_tps[b] / kernel_roof:.0%} "
                  "of it")
        llm.shutdown()
    if o.long_tokens:
        long_generation(o.long_tokens)
