# One image for the operator and the node agent (entrypoint: `spanvm`).
# Stage 1 builds the wheel and the guest payloads (gcc is needed only here).
FROM python:3.11-slim AS build
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
# The operator runs as an unprivileged user; the agent's DaemonSet overrides this with the
# access to /dev/kvm and /dev/userfaultfd it needs (see the chart).
USER 65532:65532
ENTRYPOINT ["spanvm"]
