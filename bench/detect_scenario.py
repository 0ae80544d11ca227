"""The ``detect-redis`` and ``detect-memory`` sidecar scenarios of bench/run.py: quota-redis's policy
(orders-api and its three quotas) plus three abuse detectors, so every request runs both.

The detectors never trip on this load (thresholds far above it), so every request is allowed and does
the full work: a brute-force detector keyed on the client address (its block looked up), an
enumeration detector counting distinct paths per tenant (a HyperLogLog in Redis), and a spike
detector per client address (its baseline updated). With Redis the detectors' script is queued by
the detect check and leaves in the same write as the quotas' charge: one round trip per request, as
for ``quota-redis``. Comparing ``detect-redis`` with ``quota-redis`` gives what detection adds with a
quota; with ``allow-all``, the ratio the issue asks for (at least 0.65). ``detect-memory`` is the same
policy in the in-process stores.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from quota_scenario import policy_with_quotas  # noqa: E402
from redisd import RedisServer  # noqa: E402  (tests/redisd.py: real redis-server processes)

DETECT = """
  detect:
    - name: guessing
      failures: {identity: true}
      by: client_ip
      threshold: 10
      window: 10m
      action: {block: {duration: 15m}}
    - name: walking
      distinct: {value: request.path}
      key: "request.headers[?'x-tenant'].orValue('default')"
      threshold: 10000
      window: 1m
      action: {block: {duration: 10m, status: 403}}
    - name: burst
      spike: {interval: 1m, baseline: 30, warmup: 10, minCount: 1000000, factor: 5}
      by: client_ip
      action: {throttle: {limit: 60, window: 1m, duration: 10m}}
"""


def policy_with_detectors() -> str:
    return policy_with_quotas().rstrip("\n") + "\n" + DETECT.lstrip("\n")


@contextlib.contextmanager
def detect_memory_setup(workdir: Path) -> Iterator[dict]:
    (workdir / "policies").mkdir(parents=True, exist_ok=True)
    (workdir / "policies" / "orders-detect.yaml").write_text(policy_with_detectors())
    yield {"extra_args": ["--policies", str(workdir / "policies")]}


@contextlib.contextmanager
def detect_redis_setup(workdir: Path) -> Iterator[dict]:
    redis = RedisServer(workdir / "redis").start()
    try:
        (workdir / "policies").mkdir(parents=True, exist_ok=True)
        (workdir / "policies" / "orders-detect.yaml").write_text(policy_with_detectors())
        yield {
            "extra_args": ["--policies", str(workdir / "policies"), "--redis-url", redis.url],
            "cpu_pids": [redis.proc.pid] if redis.proc is not None else [],
        }
    finally:
        redis.stop()
