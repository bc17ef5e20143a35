# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t congeal-api .     # FastAPI, no torch, no CUDA (~200 MB)
#   docker build --target worker -t congeal-worker .  # Celery worker + CUDA torch
# docker-compose.yml builds both.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONGEAL_DATA_DIR=/data
# The artifact volume is mounted at /data; owning it here makes a fresh named volume writable.
RUN useradd --create-home --uid 10001 congeal \
 && mkdir /data && chown congeal:congeal /data
WORKDIR /app
# The versions CI tested (.ci/run installs from it too): every pip install below is constrained by it.
COPY constraints.txt ./
ENV PIP_CONSTRAINT=/app/constraints.txt

# ---------------------------------------------------------------- API
FROM base AS api
# The package's runtime dependencies minus torch, safetensors and tqdm, which only the
# worker's training child uses (tests/service/test_service_docker.py keeps this in step
# with pyproject.toml).
RUN pip install "fastapi>=0.110" "uvicorn>=0.27" "pydantic>=2.5" "pydantic-settings>=2.1" \
        "python-multipart>=0.0.9" "celery[redis]>=5.4" "redis>=5.0" "numpy>=1.24" "pillow>=10.0" \
        "prometheus-client>=0.20"
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY congeal ./congeal
RUN pip install --no-deps .
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
# congeal serve checks the configuration first (no API keys: one line and exit 2, not a traceback).
CMD ["congeal", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------- worker
FROM base AS worker
# PyPI's default Linux torch wheel ships the CUDA runtime libraries (pinned by torch itself); the
# host needs only the NVIDIA driver and the NVIDIA container toolkit. Installed first: the slowest,
# most stable layer. The version CI tests on the CPU (constraints.txt; a test keeps them equal).
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY congeal ./congeal
RUN pip install .
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "worker.health"]
# One worker process per GPU, one job at a time; each job trains in a child process. The compose
# file (congeal compose) runs one such service per GPU, each reserving its own device.
CMD ["celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1", \
     "-Q", "congeal,congeal.inference", "-n", "worker@%h", "--loglevel=INFO"]
