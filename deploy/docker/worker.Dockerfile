# syntax=docker/dockerfile:1.7
# The Triton "worker" variant: triton.Dockerfile plus PyTorch and the faceedit package, for
# repositories with python-backend models that run torch -- the `refine` model of the
# optimization edit methods (latent optimization needs autograd through the generator,
# which ONNX/TensorRT do not give). The gpu overlay runs this image.
#
# Build from the repository root (BuildKit uses worker.Dockerfile.dockerignore):
#   faceedit export --flavor gpu --out build/model_repository-gpu
#   docker build -f deploy/docker/worker.Dockerfile \
#     --build-arg MODEL_REPOSITORY=build/model_repository-gpu -t faceedit/triton-worker:0.1.0-gpu .
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# faceedit with its `torch` extra (torch==2.13.0, the version the networks are exported
# and tested with; it has wheels for the container's Python 3.10), installed into the Python
# the python backend's stub runs, so `refine`'s model.py can import faceedit.nets. The PyPI
# torch wheel bundles its own CUDA runtime: the node's driver must support that CUDA version
# (check `nvidia-smi` on the GPU nodes).
WORKDIR /opt/faceedit-src
COPY pyproject.toml ./
COPY protos/ protos/
COPY faceedit/ faceedit/
COPY services/ services/
COPY exporters/ exporters/
RUN python3 -m pip install --no-cache-dir ".[torch]" \
    && cd / \
    && python3 -c "import torch, faceedit.nets, onnxruntime; print('torch', torch.__version__)"

ARG MODEL_REPOSITORY=build/model_repository
COPY ${MODEL_REPOSITORY}/ /models/
RUN set -e; n=0; \
    for cfg in /models/*/config.pbtxt; do \
      [ -f "$cfg" ] || { echo "no <model>/config.pbtxt under /models: not a Triton repository" >&2; exit 1; }; \
      dir=$(dirname "$cfg"); \
      ls "$dir"/1/model.* >/dev/null 2>&1 || { echo "$dir has no 1/model.*" >&2; exit 1; }; \
      n=$((n + 1)); \
    done; \
    echo "repository has $n models"

WORKDIR /opt/tritonserver
# triton-server, uid/gid 1000 in the NGC image
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true"]
