"""In-process cost of identity: a cached token, first verifications (RS256, ES256), mTLS, API keys.

    python bench/identity_bench.py                 # defaults: 20000 cached, 400 first verifications
    python bench/identity_bench.py --quick --json out.json

Each figure is the time of one ``await IdentityCheck.check(ctx)`` on a ready CheckContext (the
request view is built once, as the pipeline does before any check), measured one call at a time
with perf_counter_ns; p50/p90/p99 over all calls after a warm-up. "first verification" uses a new
token (new jti) every call, so it pays the signature check and claim validation; "cached" repeats
one token. The whole-pipeline row is Authorizer.check on the serialized CheckRequest (parse, policy
selection, identity, rules, response headers), for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit" / "identity"))

import material  # noqa: E402  (test key material and certificates, made fresh)
from _timing import measure as _measure  # noqa: E402

from extauthz.context import CheckContext  # noqa: E402
from extauthz.decision import Authorizer  # noqa: E402
from extauthz.policy import load_folder  # noqa: E402
from extauthz.request import request_from_check  # noqa: E402
from extauthz.samples import check_request_from_sample  # noqa: E402


def _write_policies(folder: Path, rsa, ec, pki: material.Pki) -> None:
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "jwks.json").write_text(json.dumps(
        {"keys": [material.public_jwk(rsa, "rsa-1"), material.public_jwk(ec, "ec-1")]}))
    import hashlib

    (folder / "secrets" / "keys.yaml").write_text(
        f"- {{id: k1, owner: acme, sha256: {hashlib.sha256(b'ak_bench_0123456789abcdef0123456789').hexdigest()}}}\n")
    (folder / "secrets" / "ca.pem").write_text(pki.ca.pem)
    policies = folder / "policies"
    policies.mkdir()
    (policies / "bench.yaml").write_text(f"""apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: bench-jwt}}
spec:
  match: {{hosts: [jwt.bench]}}
  identity:
    - name: users
      jwt: {{issuer: "{material.ISSUER}", audiences: [{material.AUDIENCE}], jwksFile: ../secrets/jwks.json}}
  rules: [{{name: readers, when: "'orders:read' in identity.scopes", decision: allow}}]
  response: {{headers: {{x-user: identity.subject}}}}
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: bench-mtls}}
spec:
  match: {{hosts: [mtls.bench]}}
  identity:
    - name: mesh
      mtls: {{trustDomains: [cluster.local], principals: ["spiffe://cluster.local/ns/*/sa/*"],
              certificate: {{caFile: ../secrets/ca.pem}}}}
  rules: [{{name: all, decision: allow}}]
---
apiVersion: extauthz.dev/v1
kind: AuthPolicy
metadata: {{name: bench-apikey}}
spec:
  match: {{hosts: [key.bench]}}
  identity:
    - name: partners
      apiKey: {{keys: ../secrets/keys.yaml}}
  rules: [{{name: all, decision: allow}}]
""")


async def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    rsa, ec = material.rsa_key(), material.ec_key()
    pki = material.Pki()
    client = pki.client("bench", uris=("spiffe://cluster.local/ns/orders/sa/api",))
    with tempfile.TemporaryDirectory(prefix="identity-bench-") as tmp:
        folder = Path(tmp)
        _write_policies(folder, rsa, ec, pki)
        policy_set = load_folder(folder / "policies")
        authorizer = Authorizer(policy_set)

        def context(sample: dict) -> tuple[CheckContext, object]:
            request = request_from_check(check_request_from_sample({"path": "/orders", **sample}))
            policy = policy_set.select(request.host, request.path, request.method)
            assert policy is not None
            return CheckContext(request=request, policy=policy), policy.checks[0]

        results: dict[str, dict[str, float]] = {}

        token = material.mint(rsa, kid="rsa-1")
        ctx, check = context({"host": "jwt.bench", "headers": {"authorization": f"Bearer {token}"}})

        async def cached(_: int) -> None:
            assert await check.check(ctx) is None  # type: ignore[attr-defined]

        results["jwt cached token (RS256)"] = await _measure(cached, args.cached, 1000)

        for alg, key, kid in (("RS256", rsa, "rsa-1"), ("ES256", ec, "ec-1")):
            total = args.first + 50
            tokens = [material.mint(key, material.claims(jti=f"bench-{alg}-{i}"), kid=kid, alg=alg)
                      for i in range(total)]
            contexts = [context({"host": "jwt.bench", "headers": {"authorization": f"Bearer {t}"}}) for t in tokens]

            async def first(i: int, contexts: list = contexts) -> None:
                ctx_i, check_i = contexts[i]
                assert await check_i.check(ctx_i) is None

            results[f"jwt first verification ({alg})"] = await _measure(first, args.first, 50)

        ctx, check = context({"host": "mtls.bench", "source": {
            "address": "10.0.0.1", "principal": "spiffe://cluster.local/ns/orders/sa/api", "certificate": client.pem}})

        async def mtls(_: int) -> None:
            assert await check.check(ctx) is None  # type: ignore[attr-defined]

        results["mtls principal + forwarded certificate (CA-verified, cached)"] = await _measure(mtls, args.cached, 1000)

        ctx, check = context({"host": "key.bench", "headers": {"x-api-key": "ak_bench_0123456789abcdef0123456789"}})

        async def apikey(_: int) -> None:
            assert await check.check(ctx) is None  # type: ignore[attr-defined]

        results["api key lookup"] = await _measure(apikey, args.cached, 1000)

        message = check_request_from_sample({"host": "jwt.bench", "path": "/orders",
                                             "headers": {"authorization": f"Bearer {token}"}})

        async def pipeline(_: int) -> None:
            decision = await authorizer.check(message)
            assert decision.allowed

        results["whole pipeline, cached JWT (Authorizer.check)"] = await _measure(pipeline, args.cached, 1000)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", type=int, default=20000, help="calls for the cached/steady-state rows")
    parser.add_argument("--first", type=int, default=400, help="first verifications per algorithm")
    parser.add_argument("--quick", action="store_true", help="2000 cached calls, 100 first verifications")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.cached, args.first = 2000, 100
    results = asyncio.run(run(args))
    print(f"python {platform.python_version()} on {platform.machine()} | one call at a time, perf_counter_ns")
    print(f"{'what':<62} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'n':>7}")
    for name, r in results.items():
        print(f"{name:<62} {r['p50_us']:>8.1f} {r['p90_us']:>8.1f} {r['p99_us']:>8.1f} {r['n']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
