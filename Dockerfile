# The worker and flow-run image: the official Prefect image for Python 3.12, the locked
# environment, and the code under /opt/marketpipe. Runs as a non-root user.
FROM prefecthq/prefect:3.9.1-python3.12

ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    MARKETPIPE_ENV=production

RUN pip install --no-cache-dir uv==0.9.* \
    && useradd --create-home --uid 10001 marketpipe

WORKDIR /opt/marketpipe
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY configs/ configs/
COPY blocks/ blocks/
COPY tasks/ tasks/
COPY flows/ flows/
COPY prefect.yaml ./
RUN uv sync --frozen --no-dev \
    && python -c "import tasks.indicators" \
    && mkdir -p /opt/numba-cache && chown -R marketpipe /opt/numba-cache

USER 10001
CMD ["prefect", "worker", "start", "--pool", "marketpipe", "--type", "kubernetes"]
