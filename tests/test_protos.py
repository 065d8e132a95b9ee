"""The committed gRPC modules are what `make protos` generates from protos/expert.proto today."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_modules_are_current(tmp_path):
    # The same protoc invocation as the Makefile's `protos` target, written elsewhere.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "protos/expert.proto"], cwd=REPO, check=True)
    for name in ("expert_pb2.py", "expert_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / name).read_bytes()
        committed = (REPO / "protos" / name).read_bytes()
        assert fresh == committed, f"protos/{name} is stale: run `make protos` and commit the result"


def test_makefile_target_matches_this_test():
    assert "grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/expert.proto" in \
        (REPO / "Makefile").read_text()
