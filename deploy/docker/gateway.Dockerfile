# syntax=docker/dockerfile:1.7
# The gRPC gateway: `faceedit serve` with the embedded (onnxruntime) and Triton backends.
# No PyTorch and no Triton server in here -- the image stays a few hundred MB and starts in
# seconds, which is what lets the gateway HPA react to bursts.
#
# Build from the repository root (BuildKit picks up gateway.Dockerfile.dockerignore next to
# this file as the ignore list of the build context):
#   docker build -f deploy/docker/gateway.Dockerfile -t faceedit/gateway:0.1.0-cpu .
#   docker build -f deploy/docker/gateway.Dockerfile \
#     --build-arg MODEL_SET=build/model_set -t faceedit/gateway:0.1.0-gpu .
#
# MODEL_SET: the model set folder (manifest.json, directions, ONNX files) baked in at
# /opt/faceedit/model-set, relative to the build context. It must be the set the Triton
# image's repository was exported from (generator id, tensor shapes, directions). The
# default is the bundled default set, which the `cpu` overlay serves.

# ---------------------------------------------------------------------------------------
FROM python:3.11-slim AS build

# (bytecode is written here, at install time: the runtime's root filesystem is read-only)
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv at the same path in both stages, so the runtime stage copies one folder.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
# Only [project].dependencies (no extras: no torch, onnx, scipy, nvidia-pytriton), plus the
# Triton *client* pinned in the `triton` extra -- the Triton backend of the gateway
# (services/gateway/backends.py) imports tritonclient.grpc.aio. The server wheel of that
# extra (nvidia-pytriton) is not installed.
COPY pyproject.toml ./
RUN python - <<'EOF' > /tmp/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = list(project["dependencies"])
wanted += [r for r in project["optional-dependencies"]["triton"] if r.startswith("tritonclient")]
print("\n".join(wanted))
EOF
RUN pip install -r /tmp/requirements.txt \
    && ! pip show torch >/dev/null 2>&1

# The code. The gRPC stubs are generated here, not copied: faceedit/v1/*_pb2*.py are build
# outputs of protos/ (ignored by git and by the build context). After the install, import
# from site-packages (cd /, not /src) to prove the wheel is complete: the stubs and
# everything the gateway and its backends import.
COPY protos/ protos/
COPY faceedit/ faceedit/
COPY services/ services/
COPY exporters/ exporters/
RUN python -m faceedit.protos \
    && pip install --no-deps . \
    && cd / \
    && python -c "import faceedit.v1.faceedit_pb2_grpc, services.gateway.server, services.gateway.serve, tritonclient.grpc.aio, onnxruntime, dlib"

# The model set the pods serve (--model-set in the Deployment): verified here, every file
# present with its checksum, so a broken copy fails the build rather than the rollout.
ARG MODEL_SET=faceedit/default_bundle
COPY ${MODEL_SET}/ /opt/faceedit/model-set/
RUN python -c "from faceedit.modelset import load_manifest; load_manifest('/opt/faceedit/model-set')"

# ---------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

# An unprivileged user with a fixed uid, so the pod's runAsUser/runAsNonRoot
# (deploy/k8s/base/gateway-deployment.yaml) matches the image.
RUN groupadd --system --gid 10001 faceedit \
    && useradd --system --uid 10001 --gid faceedit --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin faceedit

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/faceedit/model-set /opt/faceedit/model-set
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /tmp
# 50051: gRPC API (+ grpc.health.v1), 9090: Prometheus /metrics
EXPOSE 50051 9090
# No HEALTHCHECK: Kubernetes probes the gRPC health service itself (native grpc probes).
ENTRYPOINT ["faceedit"]
# Standalone default (docker run): the embedded backend on the baked-in model set. The
# Kubernetes Deployment passes its own arguments (Triton backend).
CMD ["serve", "--port", "50051", "--metrics-port", "9090", "--model-set", "/opt/faceedit/model-set"]
