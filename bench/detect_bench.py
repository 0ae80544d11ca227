"""In-process cost of abuse detectors: what ``spec.detect`` adds to one whole Check (no gRPC, no Envoy).

    python bench/detect_bench.py                          # in-process store: p50 with and without detectors
    python bench/detect_bench.py --redis-url URL          # Redis, beside a quota: round trips per Check
    python bench/detect_bench.py --requests 20000 --keys 1000

Two policies differ only in their ``detect`` section: both have an API-key identity, one rule and
(with ``--quota``, the default with Redis) one quota; the detecting one adds three detectors that
never trip on this load (a brute-force one keyed on the client address, an enumeration one counting
distinct order ids per subject, a spike one per subject): every Check looks up one block and counts
a distinct value and a rate. Requests rotate over ``--keys`` client addresses and order ids. Checks
of the two policies alternate, each timed alone (perf_counter_ns); the table gives p50/p99 of each
and the difference of the medians. With Redis it also counts the writes to Redis per Check (each a
round trip): with a quota and detectors, one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extauthz.decision import Authorizer  # noqa: E402
from extauthz.policy import Services, load_folder  # noqa: E402
from extauthz.samples import check_request_from_sample  # noqa: E402
from extauthz.stores import store_for  # noqa: E402

ACME = "ak_example_acme_7Qm2xV9pL4sT8wZ1nB6cD3fH"
POLICY = """\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: {name}}}
spec:
  match: {{hosts: [{name}.example.com]}}
  identity:
    - name: partners
      apiKey:
        keys: {root}/examples/keys/identity/apikeys
        in: [{{header: x-api-key}}]
  rules:
    - {{name: all, decision: allow}}
{quota}{detect}"""
QUOTA = """  quotas:
    - {name: per-key, key: identity.key_id, limit: 1000000, window: 1s, burst: 1000000000}
"""
DETECT = """  detect:
    - name: guessing
      failures: {identity: true}
      by: client_ip
      threshold: 10
      window: 10m
      action: {block: {duration: 15m}}
    - name: walking
      distinct: {pathSegment: 2}
      by: subject
      threshold: 10000
      window: 1m
      action: {block: {duration: 10m, status: 403}}
    - name: burst
      spike: {interval: 1m, baseline: 30, warmup: 10, minCount: 1000000, factor: 5}
      by: subject
      action: {throttle: {limit: 60, window: 1m, duration: 10m}}
"""


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def _run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="detect-bench-"))
    quota = QUOTA if args.quota or args.redis_url else ""
    for name, detect in (("plain", ""), ("detect", DETECT)):
        (folder / f"{name}.yaml").write_text(POLICY.format(name=name, root=ROOT, quota=quota, detect=detect))
    services = Services(settings={"redis_url": args.redis_url} if args.redis_url else {})
    authorizer = Authorizer(load_folder(folder, services), check_timeout=5.0)
    store = store_for(services)
    if args.redis_url:
        await store.start()  # type: ignore[attr-defined]
    messages = {
        name: [check_request_from_sample({
            "host": f"{name}.example.com", "path": f"/orders/{i % args.keys}", "headers": {"x-api-key": ACME},
            "source": {"address": f"10.{i % 250}.{(i // 250) % 250}.{i % 7 + 1}", "port": 40000},
        }) for i in range(args.keys)]
        for name in ("plain", "detect")
    }  # fmt: skip
    times: dict[str, list[float]] = {"plain": [], "detect": []}
    writes: dict[str, int] = {"plain": 0, "detect": 0}
    pipeline = getattr(store, "_pipeline", None)
    for i in range(args.warmup):
        for name in ("plain", "detect"):
            await authorizer.check(messages[name][i % args.keys])
    deadline = time.monotonic() + args.max_seconds
    for i in range(args.requests):
        for name in ("detect", "plain") if i % 2 else ("plain", "detect"):
            message = messages[name][i % args.keys]
            before = pipeline.batches if pipeline is not None else 0
            started = time.perf_counter_ns()
            decision = await authorizer.check(message)
            times[name].append((time.perf_counter_ns() - started) / 1000)
            if pipeline is not None:
                writes[name] += pipeline.batches - before
            if not decision.allowed:
                print(f"unexpected denial: {decision.reason}", file=sys.stderr)
                return 1
        if time.monotonic() > deadline:
            break
    if args.redis_url:
        await store.aclose()  # type: ignore[attr-defined]
    n = len(times["plain"])
    store_name = "redis" if args.redis_url else "memory"
    print(f"{n} Checks per policy, {args.keys} keys, store {store_name}, quota {'yes' if quota else 'no'}")
    print(f"{'policy':<8} {'p50 us':>8} {'p99 us':>8} {'writes/Check':>13}")
    for name in ("plain", "detect"):
        per = writes[name] / n if pipeline is not None else float("nan")
        print(f"{name:<8} {_percentile(times[name], 50):8.1f} {_percentile(times[name], 99):8.1f} {per:13.2f}")
    diffs = [d - p for d, p in zip(times["detect"], times["plain"], strict=True)]
    print(f"detectors add: p50 {_percentile(times['detect'], 50) - _percentile(times['plain'], 50):+.1f} us "
          f"(median of per-pair differences {statistics.median(diffs):+.1f} us)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--quota", action="store_true", help="add the quota in memory too (always with Redis)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop timing after this long")
    args = parser.parse_args(argv)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
