"""The `raymoe` command line: it parses arguments and calls. Every flag is derived from a settings or
options dataclass (its field name, type, default and `help` metadata), so flags, the Serve config and
`LLM(...)` keyword arguments never disagree."""

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.dispatch import DispatchBenchOptions
from bench.elastic import ElasticBenchOptions
from bench.engine import EngineBenchOptions
from bench.fuzz import FuzzBenchOptions
from bench.locality import LocalityBenchOptions
from bench.routing import RoutingReportOptions
from bench.serve import ServeBenchOptions
from bench.shutdown import ShutdownBenchOptions
from bench.soak import SoakBenchOptions
from bench.train import TrainBenchOptions
from checkpoint.bundled import BUNDLED_MODEL
from cluster.rebalance import RebalanceOptions
from experiment.hot_experts import HotExpertsOptions
from router.config import EngineConfig, ExpertPlaneConfig
from server.config import ServerConfig
from training.ep_train import EPTrainConfig
from training.train import TrainConfig

SETTINGS = (EngineConfig, ExpertPlaneConfig, ServerConfig)


@dataclass
class RayOptions:
    """Which Ray cluster."""

    address: str | None = field(default=None, metadata={
        "help": "join this Ray cluster ('auto': the local one) instead of starting one (default: $RAY_ADDRESS)"})
    num_cpus: int | None = field(default=None, metadata={
        "help": "logical CPUs (scheduling slots) of a Ray started here (default: this machine's, at least 16)"})


@dataclass
class PlaneOptions:
    """Which running application."""

    app: str = field(default="raymoe", metadata={"help": "the Serve application (`raymoe serve` names it raymoe)"})
    address: str | None = field(default=None, metadata={
        "help": "the Ray cluster (default: $RAY_ADDRESS, else the one running on this machine)"})


@dataclass
class StatusOptions:
    """What to print."""

    json: bool = field(default=False, metadata={"help": "print JSON"})


@dataclass
class ScaleOptions:
    """Which shard, how many replicas."""

    shard: int = field(default=0, metadata={"help": "the expert shard (ExpertShard-<shard>)"})
    replicas: int = field(default=1, metadata={"help": "its replica count (an autoscaled shard is pinned there)"})


@dataclass
class ConfigOutput:
    """Where the config goes."""

    output: str | None = field(default=None, metadata={"help": "write the YAML here (default: stdout)",
                                                        "flags": ["-o", "--output"]})


@dataclass
class GenerateOptions:
    """What to generate."""

    prompts: list[str] = field(default_factory=lambda: ["def fibonacci(n):", "import os\n"], metadata={
        "help": "prompt texts", "positional": True})
    max_tokens: int = field(default=64, metadata={"help": "tokens generated per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy"})


@dataclass
class TrainOutput:
    """Where the checkpoint goes."""

    out: Path = field(default=BUNDLED_MODEL, metadata={"help": "checkpoint directory to write (default: the "
                                                               "bundled one)"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (one wastes least on a busy machine; results may differ with more)"})


# --- flags from dataclasses ---------------------------------------------------------------------------


def _flag_type(annotation) -> tuple[type, bool]:
    """(element type, is a list) of a field's annotation, None stripped from unions."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls`, unless its metadata says cli False (values only a config file holds)."""
    hints = typing.get_type_hints(cls)
    group = p.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind, many = _flag_type(hints[f.name])
        shown = "" if default is None else " [%(default)s]"  # argparse fills in set_defaults' value too
        kw: dict = {"help": meta.get("help", "").replace("%", "%%") + shown,
                    "default": default, "dest": f.name}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if many:
                kw["nargs"] = "*"  # an empty list is a choice too (--long-tokens with none: skip them)
        if meta.get("positional"):
            kw.pop("dest")
            group.add_argument(f.name, **kw)
        else:
            group.add_argument(*meta.get("flags", ["--" + f.name.replace("_", "-")]), **kw)


def build(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def settings(args: argparse.Namespace) -> tuple[EngineConfig, ExpertPlaneConfig, ServerConfig]:
    """The three settings dataclasses from parsed `serve`/`config` flags (API key from $RAYMOE_API_KEY)."""
    engine, plane, server = (build(cls, args) for cls in SETTINGS)
    if server.api_key is None and os.environ.get("RAYMOE_API_KEY"):
        server = dataclasses.replace(server, api_key=os.environ["RAYMOE_API_KEY"])
    return engine, plane, server


# --- what each command calls ---------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from checkpoint.reader import CheckpointError
    from cluster.deploy import serve_until_stopped

    ray = build(RayOptions, args)
    try:
        serve_until_stopped(*settings(args), address=ray.address, num_cpus=ray.num_cpus)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"raymoe serve: {e}")
    return 0


def config(args: argparse.Namespace) -> int:
    from cluster.serve_config import serve_config, to_yaml

    text = to_yaml(serve_config(*settings(args)))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def join(address: str | None) -> None:
    """Join a running cluster (never start one: these commands look at what runs)."""
    from cluster.ray_init import start_or_join_ray

    start_or_join_ray(address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)


def status(args: argparse.Namespace) -> int:
    import json

    from cluster.status import format_status, plane_status

    plane = build(PlaneOptions, args)
    join(plane.address)
    try:
        s = plane_status(plane.app)
    except ValueError as e:
        sys.exit(f"raymoe status: {e}")
    print(json.dumps(s, indent=1) if args.json else format_status(s))
    return 0


def scale(args: argparse.Namespace) -> int:
    from cluster.deploy import scale_shard

    plane, o = build(PlaneOptions, args), build(ScaleOptions, args)
    join(plane.address)
    try:
        scale_shard(plane.app, o.shard, o.replicas)
    except ValueError as e:
        sys.exit(f"raymoe scale: {e}")
    print(f"ExpertShard-{o.shard} of {plane.app!r}: {o.replicas} replicas")
    return 0


def rebalance(args: argparse.Namespace) -> int:
    import json

    from cluster.rebalance import format_result
    from cluster.rebalance import rebalance as run

    plane, o = build(PlaneOptions, args), build(RebalanceOptions, args)
    join(plane.address)
    try:
        r = run(plane.app, o)
    except (ValueError, TimeoutError) as e:
        sys.exit(f"raymoe rebalance: {e}")
    print(json.dumps(r, indent=1) if args.json else format_result(r))
    return 0


def generate(args: argparse.Namespace) -> int:
    import time

    from router import LLM, SamplingParams

    o = build(GenerateOptions, args)
    engine, plane = build(EngineConfig, args), build(ExpertPlaneConfig, args)
    llm = LLM(**dataclasses.asdict(engine), **dataclasses.asdict(plane))
    try:
        t = time.perf_counter()
        outs = llm.generate(o.prompts, SamplingParams(temperature=o.temperature, max_tokens=o.max_tokens))
        dt = time.perf_counter() - t
    finally:
        llm.shutdown()
    n = sum(len(out.outputs[0].token_ids) for out in outs)
    for out in outs:
        print(f"--- {out.prompt!r}\n{out.prompt}{out.outputs[0].text}")
    print(f"--- {n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s), experts: {plane.expert_backend}")
    return 0


def train_tiny(args: argparse.Namespace) -> int:
    from training.train import main

    out = build(TrainOutput, args)
    return main(build(TrainConfig, args), Path(out.out), out.threads)


def train(args: argparse.Namespace) -> int:
    import ray

    from cluster.ray_init import start_or_join_ray
    from training.ep_train import main

    ray_opts, cfg = build(RayOptions, args), build(EPTrainConfig, args)
    try:
        cfg.resolved()  # a bad layout fails before Ray starts
        started = start_or_join_ray(ray_opts.address, num_cpus=ray_opts.num_cpus, log_to_driver=False)
    except ValueError as e:
        sys.exit(f"raymoe train: {e}")
    try:
        return main(cfg)
    finally:
        if started:
            ray.shutdown()


def inspect(args: argparse.Namespace) -> int:
    from bench.routing import run

    return run(build(RoutingReportOptions, args))


def run_module(options_cls, module: str) -> Callable[[argparse.Namespace], int]:
    """The command that calls `module.run` with the options built from the parsed flags."""
    def call(args: argparse.Namespace) -> int:
        import importlib

        importlib.import_module(module).run(build(options_cls, args))
        return 0
    return call


# name -> (help, option dataclasses, function)
COMMANDS = {
    "serve": ("serve a model over the OpenAI API on Ray Serve (experts as Ray actors)",
              (*SETTINGS, RayOptions), serve),
    "config": ("write the Ray Serve config YAML that `serve` and KubeRay run", (*SETTINGS, ConfigOutput), config),
    "status": ("the expert plane: shards, replicas, their state and load, recent scaling decisions",
               (PlaneOptions, StatusOptions), status),
    "scale": ("set one expert shard's replica count (a lightweight update: the Router keeps serving)",
              (PlaneOptions, ScaleOptions), scale),
    "rebalance": ("re-place hot (layer, expert) pairs over the shards by the routers' recent load, live "
                  "(EPLB-style: redundant copies for the hottest)", (PlaneOptions, RebalanceOptions, StatusOptions),
                  rebalance),
    "generate": ("generate from prompts offline, in this process (experts: local unless told)",
                 (GenerateOptions, EngineConfig, ExpertPlaneConfig), generate),
    "train-tiny": ("train the bundled tiny Mixtral on the standard library's Python",
                   (TrainConfig, TrainOutput), train_tiny),
    "train": ("expert-parallel training on Ray Train (--ep x --dp ranks; gloo on CPUs, NCCL on GPUs), saved in "
              "the layout `serve` reads", (EPTrainConfig, RayOptions), train),
}
BENCHMARKS = {
    "engine": ("decode/prefill of the engine beside HF transformers; long-generation decode rate",
               EngineBenchOptions, "bench.engine"),
    "dispatch": ("gRPC scatter/gather latency and ray-vs-local decode", DispatchBenchOptions, "bench.dispatch"),
    "serve": ("HTTP streaming latency and throughput beside offline generate", ServeBenchOptions, "bench.serve"),
    "fuzz": ("Schemathesis against the live OpenAI server's own schema: cases run, and server errors (must be 0)",
             FuzzBenchOptions, "bench.fuzz"),
    "train": ("expert-parallel training: tokens/s per rank and all-to-all share of step time at each --ep",
              TrainBenchOptions, "bench.train"),
    "elastic": ("a Zipf-skewed load, the hottest shard scaled out, then hot pairs re-placed: time to serving, "
                "imbalance, step gaps",
                ElasticBenchOptions, "bench.elastic"),
    "soak": ("thousands of mixed HTTP requests (streamed, cancelled, invalid) at high concurrency: unexpected "
             "errors, router and replica memory growth, latency percentiles", SoakBenchOptions, "bench.soak"),
    "shutdown": ("LLM with Ray experts created and shut down many times in one process: nothing left behind",
                 ShutdownBenchOptions, "bench.shutdown"),
    "locality": ("expert-locality grouping against the locality-blind baseline on the bundled model's real routing, "
                 "decoding on a plane of several replicas per shard: tokens per expert matmul, messages per token, "
                 "dispatch time hidden, step times, tokens/s (JSON + PNG)", LocalityBenchOptions, "bench.locality"),
}

EXPERIMENTS = {
    "hot-experts": ("autoscaling policies (static, Serve's default, raymoe's, raymoe's with re-placement) on skewed "
                    "expert load at one replica budget, live or simulated at scale: result.json, PNGs, a table",
                    HotExpertsOptions, "experiment.hot_experts"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymoe",
        description="Serve Mixtral-style Mixture-of-Experts models on Ray, every expert shard its own actor.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, classes, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        for cls in classes:
            add_flags(p, cls)
        p.set_defaults(func=fn)
    sub.choices["generate"].set_defaults(expert_backend="local")  # LLM's offline default
    p = sub.add_parser("inspect", help="inspect a model: `inspect routing` prints expert-locality tables",
                       description="expert locality of a model on the held-out standard-library files")
    p.add_argument("what", choices=["routing"], help="what to inspect")
    add_flags(p, RoutingReportOptions)
    p.set_defaults(func=inspect)
    runners(sub, "experiment", "experiments whose results go into papers and design reviews", EXPERIMENTS)
    runners(sub, "bench", "benchmarks, each side by side with its reference, reported as ratios", BENCHMARKS)
    return parser


def runners(sub, name: str, help: str, table: dict[str, tuple[str, type, str]]) -> None:
    """`raymoe <name> <entry>`: one subcommand per table entry, its flags from the entry's options dataclass."""
    group = sub.add_parser(name, help=help).add_subparsers(dest=name, required=True, metavar=name.upper())
    for entry, (entry_help, cls, module) in table.items():
        p = group.add_parser(entry, help=entry_help, description=entry_help)
        add_flags(p, cls)
        p.set_defaults(func=run_module(cls, module))


def parse_settings(argv: list[str]) -> tuple[EngineConfig, ExpertPlaneConfig, ServerConfig]:
    """`raymoe config` flags as settings, for code that builds configs (tests, benchmarks)."""
    return settings(build_parser().parse_args(["config", *argv]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
