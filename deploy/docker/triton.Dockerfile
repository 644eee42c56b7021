# syntax=docker/dockerfile:1.7
# Triton Inference Server 2.51 (NGC release 24.10) with a faceedit model repository baked in.
# Serves either flavor written by `faceedit export --flavor cpu|gpu --out DIR`:
#   gpu: onnxruntime backend + TensorRT accelerator (engines cached under /engine-cache,
#        a volume in the gpu overlay) or tensorrt_plan models -- nothing to install;
#   cpu: python backend running model.onnx with onnxruntime -- needs onnxruntime and numpy
#        in the image's Python (3.10), installed below.
# No PyTorch: models served by the python backend with torch (`refine`) need
# worker.Dockerfile instead.
#
# Build from the repository root; MODEL_REPOSITORY is the exported folder, relative to the
# context (BuildKit uses triton.Dockerfile.dockerignore, which sends only build/):
#   faceedit export --flavor cpu --out build/model_repository-cpu
#   docker build -f deploy/docker/triton.Dockerfile \
#     --build-arg MODEL_REPOSITORY=build/model_repository-cpu -t faceedit/triton:0.1.0-cpu .
#
# Baking the repository into the image (rather than pulling it in an init container) makes
# an image tag name exactly one set of models: a rollback is an image rollback, and a pod
# never starts with a half-downloaded repository.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# onnxruntime for the cpu flavor's python-backend models (exporters/python_backend/model.py);
# the last release with wheels for the container's Python 3.10. numpy<2 like the project.
ARG ONNXRUNTIME_VERSION=1.23.2
RUN python3 -m pip install --no-cache-dir "onnxruntime==${ONNXRUNTIME_VERSION}" "numpy<2"

ARG MODEL_REPOSITORY=build/model_repository
COPY ${MODEL_REPOSITORY}/ /models/
# Fail the build, not the pod, when the folder is not a repository: every model folder has
# a config.pbtxt and a version 1/ with a model file.
RUN set -e; n=0; \
    for cfg in /models/*/config.pbtxt; do \
      [ -f "$cfg" ] || { echo "no <model>/config.pbtxt under /models: not a Triton repository" >&2; exit 1; }; \
      dir=$(dirname "$cfg"); \
      ls "$dir"/1/model.* >/dev/null 2>&1 || { echo "$dir has no 1/model.*" >&2; exit 1; }; \
      n=$((n + 1)); \
    done; \
    echo "repository has $n models"

# triton-server (uid/gid 1000) is created by the NGC image; the repository stays root-owned
# and read-only to it.
USER 1000:1000
# 8000 HTTP (health: /v2/health/live, /v2/health/ready), 8001 gRPC, 8002 Prometheus metrics
EXPOSE 8000 8001 8002
# The NGC entrypoint (nvidia_entrypoint.sh) is kept; Kubernetes passes its own flags.
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true"]
