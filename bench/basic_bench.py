"""In-process cost of HTTP Basic: a cached verification against bcrypt/argon2id verifications.

    python bench/basic_bench.py                  # 20000 cached calls, 30 verifications per hash
    python bench/basic_bench.py --quick --json out.json

Each figure is the time of one ``await IdentityCheck.check(ctx)`` on a ready CheckContext (the
request view built once, as the pipeline does), one call at a time, perf_counter_ns; p50/p90/p99
after a warm-up. "cached" repeats one user:password (an HMAC-SHA256 and a dict lookup); the
verification rows use a source without a cache, so every call hashes on the password thread pool
(the thread hop included), the three variants of a hash interleaved call by call. "unknown user" is verified against the dummy hash made like the file's
most common hash: compare it with "wrong password" of the same hash (what an attacker sees). The last
row is the pool's throughput with 16 verifications in flight (bounded by maxConcurrent=16).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bcrypt  # noqa: E402
from _timing import measure as _measure  # noqa: E402
from _timing import percentiles as _percentiles  # noqa: E402
from argon2 import PasswordHasher  # noqa: E402

from extauthz.context import CheckContext  # noqa: E402
from extauthz.policy import load_folder  # noqa: E402
from extauthz.request import request_from_check  # noqa: E402
from extauthz.samples import check_request_from_sample  # noqa: E402

PASSWORD = "bench-password-Q7x"




HASHES = {
    "bcrypt cost 10": lambda: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode(),
    "bcrypt cost 12": lambda: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode(),
    "argon2id m=19MiB t=2 p=1": lambda: PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash(PASSWORD),
}


def _write(folder: Path) -> None:
    secrets = folder / "secrets"
    secrets.mkdir(parents=True)
    policies = folder / "policies"
    policies.mkdir()
    docs = []
    for i, make in enumerate(HASHES.values()):
        (secrets / f"htpasswd{i}").write_text(f"user:{make()}\n")
        for cached in (True, False):
            name = f"b{i}-{'cached' if cached else 'fresh'}"
            docs.append(f"""apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: {name}}}
spec:
  match: {{hosts: [{name}.bench]}}
  identity:
    - name: staff
      basic: {{htpasswd: ../secrets/htpasswd{i}, minArgon2: {{memoryKiB: 19456, iterations: 2}},
              cacheDuration: {"60s" if cached else "0"}, maxConcurrent: 16}}
  rules: [{{name: all, decision: allow}}]
""")
    (policies / "bench.yaml").write_text("---\n".join(docs))


def _header(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="basic-bench-") as tmp:
        folder = Path(tmp)
        _write(folder)
        policy_set = load_folder(folder / "policies")

        def context(host: str, user: str, password: str) -> tuple[CheckContext, object]:
            request = request_from_check(check_request_from_sample(
                {"host": host, "path": "/", "headers": _header(user, password)}))
            policy = policy_set.select(request.host, request.path, request.method)
            assert policy is not None
            return CheckContext(request=request, policy=policy), policy.checks[0]

        results: dict[str, dict[str, float]] = {}
        ctx, check = context("b0-cached.bench", "user", PASSWORD)

        async def cached(_: int) -> None:
            ctx.remove_headers.clear()
            assert await check.check(ctx) is None  # type: ignore[attr-defined]

        results["cached user:password (bcrypt cost 10 file)"] = await _measure(cached, args.cached, 1000)

        clock = time.perf_counter_ns
        for i, label in enumerate(HASHES):
            host = f"b{i}-fresh.bench"
            variants = [(what, *context(host, user, password), allowed)
                        for what, user, password, allowed in (("right password", "user", PASSWORD, True),
                                                              ("wrong password", "user", "wrong", False),
                                                              ("unknown user", "nobody", PASSWORD, False))]
            samples: dict[str, list[int]] = {what: [] for what, *_ in variants}
            # Interleaved, one call of each in turn: the machine's noise falls on all three alike.
            for round_ in range(args.verifications + 2):
                for what, ctx_i, check_i, allowed in variants:
                    ctx_i.remove_headers.clear()
                    started = clock()
                    denial = await check_i.check(ctx_i)  # type: ignore[attr-defined]
                    elapsed = clock() - started
                    assert (denial is None) == allowed, denial
                    if round_ >= 2:
                        samples[what].append(elapsed)
            for what, taken in samples.items():
                results[f"{label}: {what}"] = _percentiles(taken)

        ctx16 = [context("b0-fresh.bench", "user", PASSWORD) for _ in range(16)]
        done = 0
        deadline = time.monotonic() + args.seconds

        async def worker(ctx_i: CheckContext, check_i) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                ctx_i.remove_headers.clear()
                assert await check_i.check(ctx_i) is None
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(c, k) for c, k in ctx16))
        elapsed = time.perf_counter() - started
        results["bcrypt cost 10, 16 in flight (verifications/s)"] = {
            "p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "mean_us": elapsed / max(done, 1) * 1e6, "n": done,
            "per_second": done / elapsed}
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", type=int, default=20000, help="calls for the cached row")
    parser.add_argument("--verifications", type=int, default=30, help="calls per verification row")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput row")
    parser.add_argument("--quick", action="store_true", help="2000 cached calls, 8 verifications, 2 s")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.cached, args.verifications, args.seconds = 2000, 8, 2.0
    results = asyncio.run(run(args))
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs | one call at a time, "
          "perf_counter_ns")
    print(f"{'what':<52} {'p50 us':>10} {'p90 us':>10} {'p99 us':>10} {'n':>7}")
    for name, r in results.items():
        if "per_second" in r:
            print(f"{name:<52} {r['per_second']:>10.1f} per second over {r['n']} verifications")
            continue
        print(f"{name:<52} {r['p50_us']:>10.1f} {r['p90_us']:>10.1f} {r['p99_us']:>10.1f} {r['n']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
