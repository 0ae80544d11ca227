"""The ``quota-redis`` and ``quota-memory`` sidecar scenarios of bench/run.py: every request is
charged to three quotas, in Redis or in the sidecar's own in-process store.

The setup starts a private redis-server (tests/redisd.py: a free port, no persistence, stopped by
pid afterwards) and writes a policy folder holding the ``orders-api`` example policy (the one the
plain ``extauthz`` scenario decides the default request with) plus three quotas: per client
address (``source.client_ip``, with RateLimit headers), per tenant header, and a global one. The
limits are far above the load, so every request is allowed and all three counters are charged in
Redis, in one Lua script, on every request. Comparing this row with ``extauthz`` gives what quotas
with a local Redis add; with ``allow-all`` the ratio the issue asks for. ``quota-memory`` runs the
same policy without ``--redis-url``: the quota logic alone, with no I/O and no wait.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redisd import RedisServer  # noqa: E402  (tests/redisd.py: real redis-server processes)

QUOTAS = """
  quotas:
    - name: per-client
      key: source.client_ip
      limit: 1000000
      window: 1s
      headers: true
    - name: per-tenant
      key: "request.headers[?'x-tenant'].orValue('default')"
      limit: 1000000
      window: 1s
    - name: total
      limit: 1000000
      window: 1s
"""


def policy_with_quotas() -> str:
    """policies/orders.yaml's orders-api document, with the quotas appended to its spec."""
    text = (ROOT / "policies" / "orders.yaml").read_text()
    first = text.split("\n---", 1)[0].rstrip("\n")
    return first + "\n" + QUOTAS.lstrip("\n")


@contextlib.contextmanager
def quota_memory_setup(workdir: Path) -> Iterator[dict]:
    """The same policy and quotas with the default in-process store: what the quota logic itself costs."""
    (workdir / "policies").mkdir(parents=True, exist_ok=True)
    (workdir / "policies" / "orders-quotas.yaml").write_text(policy_with_quotas())
    yield {"extra_args": ["--policies", str(workdir / "policies")]}


@contextlib.contextmanager
def quota_redis_setup(workdir: Path) -> Iterator[dict]:
    redis = RedisServer(workdir / "redis").start()
    try:
        (workdir / "policies").mkdir(parents=True, exist_ok=True)
        (workdir / "policies" / "orders-quotas.yaml").write_text(policy_with_quotas())
        yield {
            # the last --policies wins
            "extra_args": ["--policies", str(workdir / "policies"), "--redis-url", redis.url],
            # Redis works for the sidecar on the same cores: its CPU is counted as the sidecar's.
            "cpu_pids": [redis.proc.pid] if redis.proc is not None else [],
        }
    finally:
        redis.stop()
