"""In-process cost of the quota check: what ``spec.quotas`` adds to one Check, without gRPC or Envoy.

    python bench/quota_bench.py                      # memory store (the default store)
    python bench/quota_bench.py --redis-url URL      # a Redis store (start your own redis-server)
    python bench/quota_bench.py --requests 50000 --keys 1000 --quotas 2
    python bench/quota_bench.py --redis-url URL --rate 500 --requests 15000   # added latency at 500 req/s
    python bench/quota_bench.py --algorithm sliding-log [--redis-url URL]    # the exact sliding window

The policy has ``--quotas`` quotas (a per-key one with RateLimit headers, plus keyless global ones),
all charged on every request, keyed by ``--keys`` distinct API keys in rotation, with limits that
never refuse (a refusal is cheaper than an allow, so allowing measures the expensive path). Each
``QuotaCheck.check(ctx)`` call is timed alone (perf_counter_ns, one event loop, GC on); the table
gives p50/p90/p99 in microseconds, the calls per second of the sequential loop, and the CPU this
process spent per call (``time.process_time`` over the timed loop: the sidecar's side of the cost,
without the time spent waiting for Redis). With ``--concurrency N`` against Redis, N tasks run at
once and the per-call times include queueing. With ``--rate R`` the calls start on an open-loop
schedule of R per second (the rate of issue 4's "added p99 at 500 req/s"), each timed from its start;
``--ping`` times a bare Redis PING on the same connection and schedule instead: the round-trip floor
of the machine, to read the quota check's figures against. ``--algorithm sliding-log`` gives every
quota the exact sliding window (a limit of 100,000 a second, the most a log may hold, and no burst)
instead of GCRA, so the two are compared on the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extauthz.context import CheckContext
from extauthz.policy import Services, load_folder
from extauthz.request import request_from_check
from extauthz.samples import check_request_from_sample

POLICY = """\
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: bench}}
spec:
  match: {{hosts: [bench.example.com]}}
  rules:
    - {{name: all, decision: allow}}
  quotas:
    - name: per-key
      key: "request.headers['x-api-key']"
      {limits}
      headers: true
{extra}
"""
#: Limits that never refuse within a run: GCRA with a huge burst; a sliding log at its largest limit.
LIMITS = {
    "gcra": {"limit": 1000000, "window": "1s", "burst": 1000000000},
    "sliding-log": {"limit": 100000, "window": "1s", "algorithm": "sliding-log"},
}


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


async def _run(args: argparse.Namespace) -> dict[str, float]:
    fields = [f"{name}: {value}" for name, value in LIMITS[args.algorithm].items()]
    extra = "".join(f"    - {{name: global-{i}, {', '.join(fields)}}}\n" for i in range(args.quotas - 1))
    per_key = "\n      ".join(fields)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bench.yaml").write_text(POLICY.format(extra=extra, limits=per_key))
        settings = {"redis_url": args.redis_url} if args.redis_url else {}
        services = Services(settings=settings)
        policy_set = load_folder(Path(folder), services)
    policy = policy_set.policies[0]
    check = policy.checks[policy.check_names.index("quotas")]
    for service in services.all():
        if hasattr(service, "start"):
            await service.start()
    requests = [
        request_from_check(check_request_from_sample(
            {"host": "bench.example.com", "path": "/v1/items", "headers": {"x-api-key": f"key-{i:06d}"}}))
        for i in range(args.keys)
    ]  # fmt: skip
    timings: list[float] = []

    store = getattr(check, "store", None)

    async def one(i: int) -> None:
        ctx = CheckContext(request=requests[i % len(requests)], policy=policy)
        t0 = time.perf_counter_ns()
        denial = await check.check(ctx)
        timings.append((time.perf_counter_ns() - t0) / 1000)
        if denial is not None:
            raise SystemExit(f"unexpected denial: {denial}")

    if args.ping:  # the floor: a Redis round trip with no work, through the same connection

        async def one(i: int) -> None:
            t0 = time.perf_counter_ns()
            await store._call("ping", ("PING",))  # type: ignore[union-attr]
            timings.append((time.perf_counter_ns() - t0) / 1000)

    for i in range(min(2000, args.requests)):  # warm-up: CEL memo, digests, connections
        await one(i)
    timings.clear()
    started = time.perf_counter()
    cpu_started = time.process_time()
    if args.rate:
        # Open loop: call i starts at i / rate seconds (never earlier), whether or not earlier calls
        # have finished; each call is timed from its own start, so this is the latency the quota
        # check adds to a request at that rate, not the event loop timer's lateness.
        pending: set[asyncio.Task[None]] = set()
        for i in range(args.requests):
            delay = started + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    elif args.concurrency <= 1:
        for i in range(args.requests):
            await one(i)
    else:
        per_task = args.requests // args.concurrency

        async def worker(w: int) -> None:
            for j in range(per_task):
                await one(w * per_task + j)

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    for service in services.all():
        if hasattr(service, "aclose"):
            await service.aclose()
    return {
        "p50": _percentile(timings, 50), "p90": _percentile(timings, 90), "p99": _percentile(timings, 99),
        "mean": statistics.fmean(timings), "rate": len(timings) / elapsed, "cpu": cpu * 1e6 / len(timings),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--keys", type=int, default=1000, help="distinct API keys (counters of the per-key quota)")
    p.add_argument("--quotas", type=int, default=2, help="quotas charged per request (1 per-key + N-1 global)")
    p.add_argument("--redis-url", help="measure a Redis store instead of the memory store")
    p.add_argument("--concurrency", type=int, default=1, help="concurrent tasks (useful with --redis-url)")
    p.add_argument("--ping", action="store_true",
                   help="with --redis-url: time a PING on the store's connection instead of the check (the floor)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="open loop: start this many calls per second, whatever earlier ones are doing (e.g. 500)")
    p.add_argument("--rounds", type=int, default=3, help="repeat and report the median round")
    p.add_argument("--algorithm", choices=sorted(LIMITS), default="gcra", help="the quotas' algorithm (default gcra)")
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 1_000_000 and 1 <= args.keys <= 100_000 and 1 <= args.quotas <= 10
            and 1 <= args.concurrency <= 256 and 1 <= args.rounds <= 10 and 0 <= args.rate <= 20_000):  # fmt: skip
        p.error("bounds: requests 1..1e6, keys 1..1e5, quotas 1..10, concurrency 1..256, rounds 1..10, rate 0..20000")
    if args.rate and args.requests / args.rate > 120:
        p.error("--requests / --rate must be at most 120 seconds")
    if args.rate and args.concurrency > 1:
        p.error("--rate and --concurrency exclude each other (an open loop has no fixed concurrency)")
    if args.ping and not args.redis_url:
        p.error("--ping needs --redis-url")
    store = "redis" if args.redis_url else "memory"
    try:  # the event loop `extauthz serve` uses by default
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    rounds = [run(_run(args)) for _ in range(args.rounds)]
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{'PING (the floor)' if args.ping else 'quota check'}, {store} store, {args.quotas} {args.algorithm} quota(s), {args.keys} keys, {args.requests} calls x "
          f"{args.rounds} rounds, " + (f"open loop at {args.rate:g}/s" if args.rate else f"concurrency {args.concurrency}"))
    for i, r in enumerate(rounds, 1):
        print(f"  round {i}: p50 {r['p50']:7.1f} us  p90 {r['p90']:7.1f} us  p99 {r['p99']:7.1f} us  "
              f"{r['rate']:9.0f} checks/s  cpu {r['cpu']:6.1f} us/check")  # fmt: skip
    print(f"median:    p50 {median['p50']:7.1f} us  p90 {median['p90']:7.1f} us  p99 {median['p99']:7.1f} us  "
          f"{median['rate']:9.0f} checks/s  cpu {median['cpu']:6.1f} us/check")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
