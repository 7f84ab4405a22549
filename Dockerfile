# One image for the operator and the node agent (entrypoint: `spanvm`).
# Stage 1 builds the wheel and the guest payloads (gcc is needed only here).
FROM python:3.11-slim AS build
# The compiler is only in this stage and Debian's point releases move its version: not pinned.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc binutils libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && pip install --no-cache-dir /wheels/*.whl \
    && SPANVM_CACHE_DIR=/opt/spanvm/cache python -m spanvm.payloads.build

# Stage 2: runtime only, no compiler.
FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --from=build /opt/spanvm/cache /opt/spanvm/cache
ENV SPANVM_CACHE_DIR=/opt/spanvm/cache PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="spanvm" \
      org.opencontainers.image.description="Operator and node agent for KVM guests spanning nodes"
# The operator runs as an unprivileged user; the agent's DaemonSet runs as root with only the
# capabilities and devices it needs (/dev/kvm, /dev/userfaultfd; see the chart's values).
USER 65532:65532
ENTRYPOINT ["spanvm"]
