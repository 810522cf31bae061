# GPU image for Baton (prefill and decode workers; runs every component): CUDA runtime, CUDA torch.
# Build: docker build -t ghcr.io/baton-serving/baton:0.1.0 .
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/baton/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/baton/venv \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin baton

# torch on its own layer: the largest download, rebuilt only when this line changes.
# PyPI's Linux torch wheels are the CUDA builds and bring their own CUDA libraries.
RUN pip install "torch>=2.4"

WORKDIR /opt/baton/src
COPY pyproject.toml ./
COPY baton baton
COPY router router
COPY prefill_worker prefill_worker
COPY decode_worker decode_worker
COPY embed_worker embed_worker
COPY kernels kernels
COPY controlplane controlplane
COPY proto proto
# gRPC stubs are generated: build them fresh into the tree before it is packaged.
RUN pip install "grpcio-tools>=1.62" \
    && python proto/build.py \
    && pip install ".[gpu,nixl]" \
    && cd / && rm -rf /opt/baton/src

USER 10001
WORKDIR /home/baton
# router HTTP/gRPC, prefill gRPC/HTTP, decode gRPC/HTTP, control plane HTTP/gRPC (docs/architecture.md)
EXPOSE 8000 50051 50061 8081 50062 8082 50063 8083 8090 50070
ENTRYPOINT ["baton"]
CMD ["--help"]
