# One image for the aggregator (default command) and the mock workers (compose overrides
# the command). Build: docker build -t llm-fleet-metrics .
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fleet_protocol ./fleet_protocol
COPY fleet_runtime ./fleet_runtime
COPY fleet_worker ./fleet_worker
COPY aggregator ./aggregator
COPY mock_worker ./mock_worker
RUN pip install ".[aggregator,worker]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app

USER 10001
EXPOSE 9091

# slim has no curl: ask /health with Python's urllib. urlopen raises on the 503 that
# /health answers while NATS is down, so the check fails then too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('AGGREGATOR_PORT', '9091') + '/health', timeout=2)"]

CMD ["llm-aggregator"]
