# The GPU worker image: gpujobs-worker on a PyTorch CUDA runtime. The orchestrator is not
# installed here; the instance only needs the worker package and what it imports.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# tini runs as PID 1, forwards SIGTERM to the worker and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/gpujobs
COPY pyproject.toml README.md ./
COPY worker/ worker/

# --no-deps: pyproject.toml lists the orchestrator's dependencies too (one distribution for
# the three packages), so the worker's own are installed by name; torch comes with the base.
# Only worker/ is copied, so the `gpujobs` console script in the image has no module behind it.
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir "aioboto3>=15.5" "aiohttp>=3.14" "numpy>=1.26" \
       "scikit-learn>=1.5"

RUN useradd --create-home --uid 1000 worker
USER worker
WORKDIR /home/worker

ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["/usr/bin/tini", "--", "gpujobs-worker"]
CMD ["train-digits"]
