# One image for the reconciler (Deployment, non-root) and the node agent (DaemonSet, root).
# Multi-stage: the build stage turns the project and its dependencies into wheels (with a
# compiler, for dependencies that ship C extensions); the runtime stage installs only the wheels.
# The base is pinned by exact version; for bit-for-bit rebuilds pin it by digest too, e.g.
#   docker build --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest> .
# tests/unit/test_deploy.py checks this file statically (no Docker on the CI machine).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reconciler ./reconciler
COPY node-agent ./node-agent
COPY schemas ./schemas
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="underlay" \
      org.opencontainers.image.description="Git-driven underlay networking for Kubernetes pods on Open vSwitch" \
      org.opencontainers.image.licenses="Apache-2.0"
# git + ssh for the reconciler's source stage (ssh-keygen and gpg verify commit signatures);
# nothing else from Debian.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client gnupg ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl \
 && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["underlay"]
CMD ["--help"]
