VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-kuberay serve lint protos bench fuzz

install: $(STAMP)

# torch is pinned first so pip never resolves the multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# KubeRay's deploy path on real multi-node Rays of their own (tests/test_kuberay*.py): minutes, so not in `test`.
test-kuberay: install
	RAYMOE_KUBERAY_TESTS=1 $(PY) -m pytest -q -s tests/test_kuberay.py tests/test_kuberay_autoscaling.py

serve: install
	$(VENV)/bin/raymoe serve

lint: install
	$(VENV)/bin/ruff check .

# Rooted at the repository (-I.) so the generated code imports `from protos import expert_pb2`.
protos: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/expert.proto

# A long Schemathesis run over the server's schema (the test suite runs a bounded one): 0 server errors.
fuzz: install
	$(VENV)/bin/raymoe bench fuzz --max-examples 1000
