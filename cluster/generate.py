"""`raymoe generate`: a short offline generation, handy to check a checkpoint end to end."""

import argparse
import time

from router.bundled import BUNDLED_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", default=["def fibonacci(n):", "import os\n"], help="prompt texts")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="HF checkpoint directory (default: bundled)")
    p.add_argument("--expert-backend", choices=["local", "ray"], default="local")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)


def run(args: argparse.Namespace) -> None:
    from router import LLM, SamplingParams

    llm = LLM(args.model, expert_backend=args.expert_backend, dtype=args.dtype)
    t = time.perf_counter()
    outs = llm.generate(args.prompts, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens))
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    for o in outs:
        print(f"--- {o.prompt!r}\n{o.prompt}{o.outputs[0].text}")
    print(f"--- {n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s), experts: {args.expert_backend}")
    llm.shutdown()
