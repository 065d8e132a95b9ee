# raymoe's image: the official Ray image of the Ray version raymoe runs on, with raymoe installed from this
# repository (at /app, editable, so the bundled model in /app/models is found beside the code).
#
#   CPU (kind, CI):  docker build -t raymoe:latest .
#   CUDA (GPUs):     docker build -t raymoe:latest-gpu --build-arg CUDA_TAG=-gpu \
#                      --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# CUDA_TAG is the suffix of a CUDA tag of rayproject/ray ("-gpu" is Ray's default CUDA, "-cu128" names one);
# TORCH_INDEX must be the PyTorch wheel index of the same CUDA. tests/test_kuberay.py checks that RAY_VERSION,
# the Python tag and TORCH_VERSION match what raymoe is tested with (pyproject, Makefile, the venv).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${CUDA_TAG}

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# torch first, from the index that matches the base image (the CPU wheels are a fraction of the CUDA ones); then
# raymoe with Ray pinned to the base image's own version, so pip never replaces the Ray the image runs.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# Ray's images run as the user `ray`, who owns the Python environment; /app is theirs too (the editable
# install writes its metadata there).
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
COPY --chown=ray:users . /app
RUN pip install --no-cache-dir -e /app "ray[serve]==${RAY_VERSION}" \
    && python -c "import cluster.app, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# The image runs whatever KubeRay starts in it (`ray start ...`); Serve imports cluster.app:build_app from
# the installed package, and the serveConfigV2's relative `models/tiny-mixtral` resolves to /app/models.
WORKDIR /app
