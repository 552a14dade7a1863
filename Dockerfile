# agentworker: the supervisor and its worker processes in one image.
# Build:  docker build -t agentworker .
# Run:    docker run --env-file deploy/.env.example -p 8000:8000 agentworker
# Every dependency ships wheels for linux/amd64 and linux/arm64, so no compiler is needed in either stage.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/agentworker
COPY pyproject.toml README.md ./
COPY agentworker ./agentworker
RUN /opt/agentworker/bin/pip install --no-cache-dir ".[openai]" \
    && /opt/agentworker/bin/python -m compileall -q /opt/agentworker

FROM python:3.11-slim-bookworm
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 agentworker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin agentworker \
    && mkdir -p /var/run/agentworker/metrics /var/run/agentworker/run \
    && chown -R 10001:10001 /var/run/agentworker
COPY --from=build /opt/agentworker /opt/agentworker
ENV PATH=/opt/agentworker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTWORKER_PORT=8000 \
    AGENTWORKER_METRICS_DIR=/var/run/agentworker/metrics \
    AGENTWORKER_RUN_DIR=/var/run/agentworker/run
USER 10001:10001
EXPOSE 8000
# The supervisor is PID 1: it forwards SIGTERM to its workers, drains them and reaps every child, orphans too.
# The probe reads AGENTWORKER_PORT at run time (like ${AGENTWORKER_PORT:-8000}: unset or empty is 8000), so
# `docker run -e AGENTWORKER_PORT=9000` keeps it right; exec form, as hadolint wants (DL3025), so no shell.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('AGENTWORKER_PORT') or '8000'; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)"]
# OCI image annotations, last so that a new REVISION reuses every layer above. VERSION follows
# pyproject.toml (tests/test_deploy.py checks it); pass the real values when building a release:
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://<your forge>/agentworker --build-arg LICENSES=<SPDX id> -t agentworker .
# The project has no license file and no public repository yet: LICENSES defaults to SPDX's NOASSERTION
# and SOURCE to nothing until it has.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=""
ARG LICENSES=NOASSERTION
LABEL org.opencontainers.image.title="agentworker" \
      org.opencontainers.image.description="Multi-tenant worker runtime for LangGraph agents and workflows on ARQ and Redis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="${LICENSES}"
ENTRYPOINT ["agentworker"]
CMD ["run"]
