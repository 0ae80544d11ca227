# syntax=docker/dockerfile:1
# extauthz sidecar image: slim Python, dependencies pinned by constraints.txt, non-root, read-only friendly.
#
#   docker build -t extauthz:0.1.0 .
#   docker run --rm -p 9191:9191 -p 8282:8282 extauthz:0.1.0          # serves the bundled policies/
#
# In Kubernetes the policies come from a ConfigMap mounted at /etc/extauthz/policies (deploy/k8s/).

# ---- build: wheels for extauthz and its pinned dependencies -----------------------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY extauthz ./extauthz
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt .

# ---- runtime ------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --no-index --find-links /wheels --constraint /tmp/constraints.txt extauthz \
 && groupadd --gid 10001 extauthz \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin extauthz
COPY --chown=0:0 policies /etc/extauthz/policies
# Listen on all interfaces inside the container; the Kubernetes manifests narrow gRPC to 127.0.0.1
# (same pod as Envoy). Probes and /metrics on 8282. Decision log on stdout, process logs on stderr.
ENV EXTAUTHZ_POLICIES=/etc/extauthz/policies \
    EXTAUTHZ_LISTEN=0.0.0.0:9191 \
    EXTAUTHZ_HTTP_HOST=0.0.0.0 \
    EXTAUTHZ_HTTP_PORT=8282
EXPOSE 9191 8282
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8282/readyz', timeout=1)"]
ENTRYPOINT ["extauthz"]
CMD ["serve"]
