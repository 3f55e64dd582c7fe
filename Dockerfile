# Two images, each with one side installed (pyproject.toml's extras):
#   docker build --target aggregator -t llm-fleet-aggregator .    (the default target: the last one)
#   docker build --target mock-worker -t llm-fleet-mock-worker .
# compose.yml builds each service with its target.
FROM python:3.11.13-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && install -d -o app -g app /var/lib/dynamo/discovery
# compose.yml mounts its discovery volume (DYN_FILE_KV) here in both images: a new volume takes
# this directory's owner, so the mock workers (uid 10001) can write their entries in it.
# What both sides share: the wire protocol and the programs' conventions.
COPY pyproject.toml README.md ./
COPY fleet_protocol ./fleet_protocol
COPY fleet_runtime ./fleet_runtime


# Simulated workers: the worker library, no aiohttp, bcrypt, isal or nats-server.
FROM base AS mock-worker
COPY fleet_worker ./fleet_worker
COPY mock_worker ./mock_worker
RUN pip install ".[worker]"

USER 10001
# Mock workers serve no HTTP unless DYN_SYSTEM_PORT is set; they show up in the aggregator's metrics.
HEALTHCHECK NONE
CMD ["llm-mock-worker"]


# The service: no worker library, no NVML.
FROM base AS aggregator
COPY aggregator ./aggregator
RUN pip install ".[aggregator]"

USER 10001
EXPOSE 9091

# slim has no curl: ask /health with Python's urllib. urlopen raises on the 503 that
# /health answers while NATS is down, so the check fails then too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('AGGREGATOR_PORT', '9091') + '/health', timeout=2)"]

CMD ["llm-aggregator"]
