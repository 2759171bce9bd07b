# One image for the reconciler (Deployment, non-root) and the node agent (DaemonSet, root).
# Base pinned by version; pin by digest in your registry mirror for reproducible builds.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reconciler ./reconciler
COPY node-agent ./node-agent
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# git + ssh for the reconciler's source stage; nothing else from Debian.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl && rm -rf /wheels
USER 65532:65532
ENTRYPOINT ["underlay"]
CMD ["--help"]
