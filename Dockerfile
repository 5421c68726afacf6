# distml on NVIDIA GPUs.
#
#   docker build -t distml .
#   docker run --rm --gpus all --ipc=host \
#     -v "$PWD/data:/workspace/data" -v "$PWD/artifacts:/workspace/artifacts" \
#     distml train --mode ddp --amp
#
# The torch wheels on pip's default index for Linux x86_64 are CUDA builds that bundle the CUDA
# runtime, cuDNN and NCCL (the nvidia-* wheels), so a plain Python base image is
# enough: the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
# See docs/docker.md for the why of every choice below.

ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="distml" \
      org.opencontainers.image.description="Train CIFAR-10 classifiers on one or many GPUs and study/compress them with the Separation Index" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NCCL_DEBUG=WARN \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# A fixed, non-root user; uid 1000 matches the first user of most Linux hosts so
# bind-mounted data/ and artifacts/ stay writable (else: docker run --user).
RUN useradd --no-log-init --create-home --uid 1000 --user-group distml \
 && mkdir -p /workspace/data /workspace/artifacts \
 && chown -R distml:distml /workspace

RUN python -m venv "$VIRTUAL_ENV"

# Layer 1, the big one (several GB): torch + torchvision. Only these build
# arguments invalidate it, never a change to distml's code or pyproject.toml.
# Default (empty): pip's default index, whose Linux torch wheels are the CUDA build.
# A CPU-only image or another CUDA version (e.g. for an older driver): set it to the
# URL of PyTorch's own wheel index for that variant (PyTorch's install page lists them):
#   --build-arg TORCH_INDEX_URL=<PyTorch's wheel index URL for cpu or cuXYZ>
ARG TORCH_VERSION=2.15.0
ARG TORCHVISION_VERSION=0.29.2
ARG TORCH_INDEX_URL=
# torch and torchvision are pinned; hadolint reads the optional --index-url as a package
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Layer 2: the other runtime dependencies and the build backend, read from
# pyproject.toml ([project].dependencies + [build-system].requires). torch and
# torchvision are already satisfied, so pip leaves them alone.
WORKDIR /opt/distml
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Layer 3, small: distml itself (README.md is its long description). A code or
# README change rebuilds only this layer, with no download (no dependencies, no
# isolated build environment).
COPY README.md ./
COPY distml/ ./distml/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info \
 && distml --help > /dev/null

# Numeric, so runtimes (and Kubernetes runAsNonRoot) can tell it is not root.
USER 1000:1000
WORKDIR /workspace
# The dataset cache (distml's --data-dir defaults to data/) and the run outputs
# (artifacts/runs/<name>/) outlive the container: mount host folders here.
VOLUME ["/workspace/data", "/workspace/artifacts"]

ENTRYPOINT ["distml"]
CMD ["--help"]
