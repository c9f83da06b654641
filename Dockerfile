# syntax=docker/dockerfile:1.7
#
# rewardserve images. Targets:
#   cpu     (default) python:3.11-slim + onnxruntime
#   gpu     NVIDIA CUDA 12 + cuDNN 9 runtime (Ubuntu 24.04, Python 3.12) + onnxruntime-gpu + onnx
#           (onnx: the fp16 conversion at load, REWARDSERVE_FP16, on by default with CUDA)
#   gpu-decoder  Ubuntu 24.04 + torch (CUDA wheels) + transformers: serves `model_format: "transformers"`
#           bundles, the bf16 decoder reward models of `rewardserve export --format transformers`
#           (docs/decoders.md); ONNX bundles too (onnxruntime CPU build, as a fallback only)
#   bundle  busybox with a model bundle under /bundle, for the Helm chart's init container
#
#   docker build -t rewardserve:0.1.0-cpu .
#   docker build --target gpu -t rewardserve:0.1.0-gpu .
#   docker build --target gpu-decoder -t rewardserve:0.1.0-gpu-decoder .
#   docker build --build-arg BUNDLE=models/default/bundle -t rewardserve:0.1.0-cpu-baked .
#   docker build --target bundle --build-arg BUNDLE=models/default/bundle -t rewardserve-bundle:0.1.0 .
#
# The bundle (manifest.json, model.onnx, tokenizer.json) is read from /models/bundle: mount it there
# (docker run -v "$PWD/models/default/bundle:/models/bundle:ro" ...), or bake it in with the BUNDLE build arg
# (a directory inside the build context; .dockerignore lets models/ through). docs/deploy.md has the
# full docker build / docker run lines.
#
# Runtime stages hold a venv with the serving dependencies only: no compiler, no pip, and no torch except
# in gpu-decoder, whose runtime is torch itself.

ARG PYTHON_VERSION=3.11
# onnxruntime-gpu 1.26 is the last release built for CUDA 12 (1.27+ need CUDA 13 and an NVIDIA
# driver >= 580). For CUDA 13: --build-arg CUDA_VERSION=13.0.1 --build-arg ORT_GPU_VERSION=1.31.1
ARG CUDA_VERSION=12.8.1

# ---------------------------------------------------------------- bundle: optional baked-in model
FROM python:${PYTHON_VERSION}-slim-bookworm AS bundle-src
# Path of a bundle directory inside the build context, e.g. models/default/bundle. Empty: nothing baked in.
ARG BUNDLE=""
RUN --mount=type=bind,target=/ctx \
    mkdir -p /out \
    && if [ -n "${BUNDLE}" ]; then \
         test -f "/ctx/${BUNDLE}/manifest.json" \
           || { echo "BUNDLE=${BUNDLE}: no manifest.json there (is it excluded by .dockerignore?)" >&2; exit 1; }; \
         cp -R "/ctx/${BUNDLE}/." /out/; \
       fi

# ---------------------------------------------------------------- cpu build: venv with the wheel
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# README* is optional (pyproject names README.md as the long description).
COPY pyproject.toml README* ./
# Serving code only: the trainer and exporter (export/) stay out of the image (`rewardserve train`/`export`
# answer that they need the offline side installed).
COPY service ./service
# The venv gets no pip of its own: the image's pip installs into it from outside.
RUN python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir /src \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit('torch must not be in the serving image' if u.find_spec('torch') else 0)" \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit('the trainer must not be in the serving image' if u.find_spec('export') else 0)" \
    && /opt/venv/bin/python -c "import onnxruntime, fastapi, uvicorn, service.cli" \
    && /opt/venv/bin/rewardserve --help >/dev/null

# ---------------------------------------------------------------- gpu build: same on the CUDA base
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04 AS gpu-build
ARG ORT_GPU_VERSION=1.26.0
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# Distribution packages follow the base image tag (Ubuntu 24.04 security updates); pinning their
# exact versions would break the build every time the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README* ./
COPY service ./service
# onnxruntime-gpu replaces onnxruntime (both in one venv clobber each other's files): install the
# project's dependencies minus onnxruntime, then onnxruntime-gpu, then the project without deps.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(''.join(d + chr(10) for d in deps if re.split('[^A-Za-z0-9._-]', d, maxsplit=1)[0].lower() != 'onnxruntime'))" \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt "onnxruntime-gpu==${ORT_GPU_VERSION}" \
         "onnx>=1.16,<1.24" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit('torch must not be in the serving image' if u.find_spec('torch') else 0)" \
    && /opt/venv/bin/python -c "import importlib.metadata as m, sys; sys.exit('onnxruntime (CPU) must not be installed next to onnxruntime-gpu' if any(d.metadata['Name'].lower() == 'onnxruntime' for d in m.distributions()) else 0)" \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit('the trainer must not be in the serving image' if u.find_spec('export') else 0)" \
    && /opt/venv/bin/python -c "import onnxruntime, onnxruntime.transformers.float16, fastapi, uvicorn, service.cli" \
    && /opt/venv/bin/rewardserve --help >/dev/null

# ---------------------------------------------------------------- gpu runtime
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04 AS gpu
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rewardserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/rewardserve --create-home \
         --shell /usr/sbin/nologin rewardserve
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=bundle-src /out/ /models/bundle/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REWARDSERVE_HOST=0.0.0.0 \
    REWARDSERVE_PORT=8000 \
    REWARDSERVE_BUNDLE=/models/bundle \
    REWARDSERVE_PROVIDER=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/rewardserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARDSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["rewardserve", "serve"]
CMD ["--bundle", "/models/bundle"]

# ---------------------------------------------------------------- gpu-decoder build: torch + transformers
FROM ubuntu:24.04 AS gpu-decoder-build
# torch's Linux wheels on PyPI carry their own CUDA 12 libraries (the nvidia-* wheels), so no CUDA base
# image is needed, only the NVIDIA driver on the node (the container toolkit mounts it).
ARG TORCH_VERSION=2.13.0
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README* ./
COPY service ./service
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir "/src[decoder]" \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit('the trainer must not be in the serving image' if u.find_spec('export') else 0)" \
    && /opt/venv/bin/python -c "import torch, transformers, safetensors, fastapi, uvicorn, service.cli, service.torch_runtime" \
    && /opt/venv/bin/rewardserve --help >/dev/null

# ---------------------------------------------------------------- gpu-decoder runtime
FROM ubuntu:24.04 AS gpu-decoder
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rewardserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/rewardserve --create-home \
         --shell /usr/sbin/nologin rewardserve
COPY --from=gpu-decoder-build /opt/venv /opt/venv
COPY --from=bundle-src /out/ /models/bundle/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REWARDSERVE_HOST=0.0.0.0 \
    REWARDSERVE_PORT=8000 \
    REWARDSERVE_BUNDLE=/models/bundle \
    REWARDSERVE_PROVIDER=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/rewardserve
USER 10001:10001
EXPOSE 8000
# start period: an 8 B bundle is ~16 GB to hash and load before /healthz answers
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARDSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["rewardserve", "serve"]
CMD ["--bundle", "/models/bundle"]

# ---------------------------------------------------------------- bundle image (init container)
FROM busybox:1.37.0 AS bundle
COPY --from=bundle-src /out/ /bundle/
USER 10001:10001
# Copies /bundle into the directory given as argument (the chart mounts an emptyDir there).
HEALTHCHECK NONE
ENTRYPOINT ["cp", "-R", "/bundle/."]
CMD ["/models/bundle/"]

# ---------------------------------------------------------------- cpu runtime (default target)
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu
# The base image's own pip/setuptools/wheel are not needed at run time.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
    && groupadd --system --gid 10001 rewardserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/rewardserve --create-home \
         --shell /usr/sbin/nologin rewardserve
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=bundle-src /out/ /models/bundle/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REWARDSERVE_HOST=0.0.0.0 \
    REWARDSERVE_PORT=8000 \
    REWARDSERVE_BUNDLE=/models/bundle \
    REWARDSERVE_PROVIDER=cpu
WORKDIR /home/rewardserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REWARDSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["rewardserve", "serve"]
CMD ["--bundle", "/models/bundle"]
