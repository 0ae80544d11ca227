# syntax=docker/dockerfile:1
# extauthz sidecar image: slim Python, dependencies pinned by constraints.txt, non-root, read-only friendly.
#
#   docker build -t extauthz:0.1.0 .
#   docker run --rm -p 9191:9191 -p 8282:8282 extauthz:0.1.0          # serves the bundled policies/
#
# The image carries the repository's example policies (not their PolicyTest files, which stay in the
# repository with the test keys they sign with) at /etc/extauthz/policies and the key material they
# name as ../examples/keys/... at /etc/extauthz/examples/keys: public DEMO keys (verification side only;
# .dockerignore keeps private keys and scripts out), so the default command starts; the sidecar logs a
# warning for each demo key file it loads. In production mount
# your real policies and keys over both folders, e.g.
#   docker run -v "$PWD/my-policies:/etc/extauthz/policies:ro" -v "$PWD/my-keys:/etc/extauthz/examples/keys:ro" ...
# In Kubernetes the policies come from a ConfigMap mounted at /etc/extauthz/policies and the keys from
# Secrets projected at /etc/extauthz/examples/keys (deploy/k8s/, docs/kubernetes.md).

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
# Policies name key files relative to their folder (../examples/keys/identity/jwks.json): same layout
# as the Kubernetes pod. Demo material only: mount real keys over this folder.
COPY --chown=0:0 examples/keys /etc/extauthz/examples/keys
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
