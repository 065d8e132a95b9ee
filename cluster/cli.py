"""The `raymoe` command line. Each command lives in its own module with `add_arguments` and `run`."""

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). A module exposes add_arguments(parser) and run(args) -> int | None.
COMMANDS = {
    "serve": ("cluster.serve", "serve a model over the OpenAI API on Ray Serve (experts as Ray actors)"),
    "config": ("cluster.serve_config", "write the Ray Serve config YAML that `serve` and KubeRay run"),
    "generate": ("cluster.generate", "generate from prompts offline, in this process"),
    "train-tiny": ("router.train", "train the bundled tiny Mixtral on the standard library's Python"),
    "inspect": ("router.routing_report", "inspect a model: `inspect routing` prints expert-locality tables"),
}
BENCHMARKS = {
    "engine": ("cluster.bench.engine", "decode/prefill of the engine beside HF transformers"),
    "dispatch": ("cluster.bench.dispatch", "gRPC scatter/gather latency and ray-vs-local decode"),
    "serve": ("cluster.bench.serve", "HTTP streaming latency and throughput beside offline generate"),
}


def _add(sub, name: str, module: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        p.set_defaults(func=lambda args: sys.exit(f"raymoe {name}: not available in this build"))
        return
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymoe",
        description="Serve Mixtral-style Mixture-of-Experts models on Ray, every expert shard its own actor.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help) in COMMANDS.items():
        _add(sub, name, module, help)
    bench = sub.add_parser("bench", help="benchmarks, each side by side with its reference, reported as ratios")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help) in BENCHMARKS.items():
        _add(bench_sub, name, module, help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
