# The worker and flow-run image: the official Prefect image for Python 3.12, the locked environment
# (no dev dependencies), the code under /opt/marketpipe, and numba's cache warmed. Runs as uid 10001
# and works with a read-only root filesystem: it writes only to /tmp and the spool directory.
FROM prefecthq/prefect:3.9.1-python3.12 AS build

ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv

RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /opt/marketpipe
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY configs/ configs/
COPY blocks/ blocks/
COPY tasks/ tasks/
COPY flows/ flows/
RUN uv sync --frozen --no-dev


FROM prefecthq/prefect:3.9.1-python3.12

ENV PATH=/opt/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    PREFECT_HOME=/tmp/prefect \
    MARKETPIPE_ENV=production \
    MARKETPIPE__STORAGE__SPOOL_DIR=/var/spool/marketpipe

WORKDIR /opt/marketpipe
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/marketpipe /opt/marketpipe
COPY prefect.yaml ./
# The first indicator call otherwise compiles for seconds in every flow run: pay it once, here.
RUN useradd --uid 10001 --no-create-home --home-dir /tmp marketpipe \
    && mkdir -p /opt/numba-cache /var/spool/marketpipe \
    && python -m flows.warmup \
    && chown -R 10001 /opt/numba-cache /var/spool/marketpipe

USER 10001
CMD ["prefect", "worker", "start", "--pool", "marketpipe-k8s", "--type", "kubernetes"]
