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
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["agentworker"]
CMD ["run"]
