"""In-process cost of abuse detectors: what ``spec.detect`` adds to one whole Check (no gRPC, no Envoy).

    python bench/detect_bench.py                          # in-process store: p50 with and without detectors
    python bench/detect_bench.py --redis-url URL          # Redis, beside a quota: round trips per Check
    python bench/detect_bench.py --requests 20000 --keys 1000
    python bench/detect_bench.py --redis-url URL --script-cost # Redis's CPU per script (INFO commandstats)

Two policies differ only in their ``detect`` section: both have an API-key identity, one rule and
(with ``--quota``, the default with Redis) one quota; the detecting one adds three detectors that
never trip on this load (a brute-force one keyed on the client address, an enumeration one counting
distinct order ids per subject, a spike one per subject): every Check looks up one block and counts
a distinct value and a rate. Requests rotate over ``--keys`` client addresses and order ids. Checks
of the two policies alternate, each timed alone (perf_counter_ns); the table gives p50/p99 of each
and the difference of the medians. With Redis it also counts the writes to Redis per Check (each a
round trip): with a quota and detectors, one. ``--script-cost`` instead runs the scripts alone
against Redis, one call at a time (the quota charge of three counters, the three detectors, both in
one call, and each detector's op alone) and prints Redis's own CPU per call from INFO commandstats.
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


def script_cost(url: str, calls: int = 3000) -> int:
    """Redis's CPU per call of each script (usec_per_call of EVALSHA), the scripts sent alone."""
    import redis

    from extauthz.detection.model import Detector
    from extauthz.detection.redis import COMBINED_SCRIPT, DETECT_SCRIPT
    from extauthz.stores.redis import CHARGE_SCRIPT

    def detector(op: int, **extra: object) -> Detector:
        return Detector(policy="p", name="d", op=op, threshold=10000, window_ms=60000, store_action=2, action=2,
                        dry_run=False, duration_ms=1000, escalation=2.0, max_duration_ms=2000, memory_ms=3600000,
                        **extra)  # type: ignore[arg-type]  # fmt: skip

    spike = detector(3, interval_ms=60000, alpha=0.064516, warmup=10, min_count=1000000, factor=5.0,
                     state_ttl_ms=4800000)  # fmt: skip
    keys = ["extauthz:d:p:a:{aaaa}:b", "extauthz:d:p:w:{bbbb}:b", "extauthz:d:p:s:{aaaa}:b"]
    argv = [detector(1).spec(0), "", "ip", detector(2).spec(2), "/api/orders", "t", spike.spec(3), "", "ip"]
    quota_keys = ["extauthz:q:a:{x}", "extauthz:q:b:{y}", "extauthz:q:c:{global}"]
    from extauthz.stores import Charge

    quota_spec = Charge("x", 1, 1000000000, 1, True, 0).spec * 3
    client = redis.Redis.from_url(url)
    runs = [("quota charge (3 counters)", CHARGE_SCRIPT, quota_keys, [quota_spec]),
            ("3 detectors", DETECT_SCRIPT, keys, argv),
            ("both in one call", COMBINED_SCRIPT, quota_keys + keys, [3, quota_spec, *argv])]  # fmt: skip
    runs += [(f"{name} alone", DETECT_SCRIPT, [keys[i]], argv[3 * i:3 * i + 3])
             for i, name in enumerate(("block lookup", "distinct value", "spike"))]  # fmt: skip
    for name, body, run_keys, run_argv in runs:
        sha = client.script_load(body)
        client.config_resetstat()
        for _ in range(calls):
            client.evalsha(sha, len(run_keys), *run_keys, *run_argv)
        stats = client.info("commandstats")["cmdstat_evalsha"]
        print(f"{name:<28} {stats['usec_per_call']:6.1f} us of Redis CPU per call")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--quota", action="store_true", help="add the quota in memory too (always with Redis)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop timing after this long")
    parser.add_argument("--script-cost", action="store_true", help="Redis's CPU per script call (needs --redis-url)")
    args = parser.parse_args(argv)
    if args.script_cost:
        if not args.redis_url:
            parser.error("--script-cost needs --redis-url")
        return script_cost(args.redis_url)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
