"""`raymoe bench fuzz`: Schemathesis runs the server's own OpenAPI schema against it, live, and counts server
errors (there must be none).

The OpenAI app runs in uvicorn on loopback with its experts in-process: the same FastAPI app and engine thread
that Serve runs, without a Ray cluster, so that thousands of cases take minutes. Every phase runs: the
coverage phase sends each field's boundary and out-of-range values, the fuzzing phase random bodies.
Schemathesis draws only strings that encode in UTF-8; `bench/fuzz_hooks.py` puts odd unicode (lone
surrogates, NUL, bidi controls, combining marks) into about half the bodies of the fuzzing phase.
"""

import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint.bundled import BUNDLED_MODEL
from router.config import EngineConfig
from server.api import OpenAIServer, build_fastapi
from server.config import ServerConfig

log = logging.getLogger(__name__)


@dataclass
class FuzzBenchOptions:
    """How much Schemathesis generates, and against which model."""

    model: Path = field(default=Path(BUNDLED_MODEL), metadata={"help": "checkpoint to serve"})
    max_examples: int = field(default=1000, metadata={"help": "test cases per API operation and phase"})
    max_model_len: int = field(default=128, metadata={
        "help": "the served context: it bounds max_tokens, so that a valid case costs milliseconds"})
    seed: int = field(default=0, metadata={"help": "Schemathesis's random seed (the run is reproducible)"})
    out: Path | None = field(default=None, metadata={"help": "also write Schemathesis's JUnit XML report here"})


@dataclass
class FuzzResult:
    generated: int
    passed: int
    returncode: int
    output: str

    @property
    def server_errors(self) -> bool:
        return self.returncode != 0


@contextmanager
def serving(engine: EngineConfig, server: ServerConfig | None = None, experts=None
            ) -> Iterator[tuple[str, OpenAIServer]]:
    """The OpenAI app in uvicorn on a free loopback port: yields (base URL, OpenAIServer)."""
    import uvicorn

    from cluster.deploy import free_port

    api = OpenAIServer(engine, server or ServerConfig(), experts)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_fastapi(api), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    while not uv.started:
        if not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", api
    finally:
        uv.should_exit = True
        thread.join(10)
        api.close()


def fuzz(base: str, max_examples: int, seed: int, junit: Path | None = None) -> FuzzResult:
    """Schemathesis's CLI against base's /openapi.json, checking only that no response is a 5xx."""
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{base}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--seed", str(seed),
           "--generation-database", "none", "--request-timeout", "120", "--no-color", "--workers", "1"]
    if junit is not None:
        cmd += ["--report", "junit", "--report-junit-path", str(junit.resolve())]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("fuzz_hooks.py"))}
    with tempfile.TemporaryDirectory() as scratch:  # Schemathesis keeps a cache in its working directory
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=scratch)
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    generated, passed = (int(m[1]), int(m[2])) if m else (0, 0)
    return FuzzResult(generated, passed, proc.returncode, out)


def run(args: FuzzBenchOptions) -> None:
    engine = EngineConfig(model=str(args.model), max_model_len=args.max_model_len)
    with serving(engine) as (base, _):
        t = time.perf_counter()
        result = fuzz(base, args.max_examples, args.seed, args.out)
    summary = "\n".join(line for line in result.output.splitlines()
                        if re.search(r"passed|failed|generated|Operations|errors?", line))
    print(summary)
    print(f"{result.generated} cases, {result.generated - result.passed} failing, "
          f"{time.perf_counter() - t:.0f}s; server errors: {'yes' if result.server_errors else 'none'}")
    if result.server_errors:
        print(result.output[-8000:])
        raise SystemExit(1)
