"""In-process cost of verifying one signed request, per algorithm (no Envoy, no gRPC).

    python bench/signature_bench.py              # ~20 s
    python bench/signature_bench.py --seconds 2  # per row
    python bench/signature_bench.py --profile    # + cProfile of the hmac-sha256 full verification

For each algorithm it times the whole verification a request pays for — parse Signature-Input and
Signature, check the policy's requirements, build the signature base, verify the signature, check the
Content-Digest of a 1 KiB JSON body — and, separately, the bare cryptographic verify over the same
base, so the table shows what RFC 9421 processing adds on top of the primitive. Also the two webhook
presets. Single thread. Every row is timed in many short batches (~2 ms each) and reports the median
(p50) and the minimum of the per-call wall time, plus the median per-call CPU time of this thread:
on a shared machine the other processes inflate wall time (a batch that loses the CPU counts the
wait), not CPU time, so a wall p50 far above the CPU p50 means "noisy box", not "slow code".
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cryptography  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402

from extauthz.signatures.algorithms import ALGORITHMS, VerificationKey  # noqa: E402
from extauthz.signatures.base import Message  # noqa: E402
from extauthz.signatures.digest import content_digest  # noqa: E402
from extauthz.signatures.keys import load_key_set  # noqa: E402
from extauthz.signatures.signer import sign_message  # noqa: E402
from extauthz.signatures.verify import Requirements, component_identifier, verify_request_signature  # noqa: E402
from extauthz.signatures.webhook import WebhookScheme, sign_webhook  # noqa: E402

BODY = json.dumps({"items": [{"sku": f"sku-{i}", "qty": i} for i in range(40)]}).encode()[:1024]
COMPONENTS = ("@method", "@authority", "@path", "@query", "x-tenant", "content-type", "content-digest")
NOW = 1_700_000_000
SECRET = os.urandom(32)
_PEM = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


def _private_keys() -> dict[str, object]:
    return {
        "hmac-sha256": SECRET,
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ecdsa-p256-sha256": ec.generate_private_key(ec.SECP256R1()),
        "ecdsa-p384-sha384": ec.generate_private_key(ec.SECP384R1()),
        "rsa-pss-sha512": rsa.generate_private_key(65537, 2048),
        "rsa-v1_5-sha256": rsa.generate_private_key(65537, 2048),
    }


@dataclass(frozen=True, slots=True)
class Timing:
    p50_us: float
    min_us: float
    cpu_p50_us: float


def _time(fn: Callable[[], object], seconds: float) -> Timing:
    """Per-call microseconds over short batches (~2 ms) filling ``seconds``."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    batch = max(1, int(0.002 / one))
    wall: list[float] = []
    cpu: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(wall) < 5:
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(batch):
            fn()
        c1, t1 = time.thread_time(), time.perf_counter()
        wall.append((t1 - t0) / batch)
        cpu.append((c1 - c0) / batch)
    return Timing(statistics.median(wall) * 1e6, min(wall) * 1e6, statistics.median(cpu) * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per row (default 1.5)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the hmac-sha256 full verification (cProfile, top functions)")
    args = parser.parse_args(argv)
    if not 0.1 <= args.seconds <= 30:
        parser.error("--seconds must be between 0.1 and 30")
    private = _private_keys()
    fields = {"x-tenant": "acme", "content-type": "application/json", "content-digest": content_digest(BODY)}
    message = Message(method="POST", scheme="https", authority="api.example.com", target="/v1/orders?dry=1",
                      fields=fields)
    requirements = Requirements(components=tuple(component_identifier(c) for c in COMPONENTS[:-1]),
                                body_components=(component_identifier("content-digest"),))
    print(f"python {platform.python_version()} | cryptography {cryptography.__version__} | "
          f"{os.cpu_count()} CPUs | body {len(BODY)} B | {len(COMPONENTS)} covered components")
    print(f"{'':<20} {'full verify (µs)':^26}  {'crypto only (µs)':^17}  {'overhead':>8}")
    print(f"{'algorithm':<20} {'p50':>8} {'min':>8} {'cpu p50':>8}  {'p50':>8} {'cpu p50':>8}  "
          f"{'cpu µs':>8} {'verifies/s':>11}")
    profile_target: Callable[[], object] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        meta = []
        for name, key in private.items():
            if isinstance(key, bytes):
                (folder / f"k-{name}.secret").write_bytes(key)
            else:
                (folder / f"k-{name}.pem").write_bytes(key.public_key().public_bytes(*_PEM))  # type: ignore[attr-defined]
            meta.append(f"k-{name}: {{algorithm: {name}}}")
        (folder / "keys.yaml").write_text("\n".join(meta) + "\n")
        keys = load_key_set(folder)
        for name, key in private.items():
            signed = sign_message(message, COMPONENTS, key_id=f"k-{name}", algorithm=name, private_key=key,
                                  created=NOW, nonce="n-1")
            request = Message(message.method, message.scheme, message.authority, message.target,
                              {**fields, "signature-input": signed.signature_input, "signature": signed.signature})
            raw = base64.b64decode(signed.signature.split(":")[1])
            verification_key: VerificationKey = keys.get(f"k-{name}")  # type: ignore[assignment]

            def full(request: Message = request) -> object:
                return verify_request_signature(request, body=BODY, partial_body=False, has_content=True, keys=keys,
                                                requirements=requirements, now=NOW + 1)

            def crypto(k: VerificationKey = verification_key, base: bytes = signed.base, sig: bytes = raw) -> bool:
                return k.verify(base, sig)

            assert crypto(), name
            if name == "hmac-sha256":
                profile_target = full
            f, c = _time(full, args.seconds), _time(crypto, args.seconds)
            print(f"{name:<20} {f.p50_us:>8.1f} {f.min_us:>8.1f} {f.cpu_p50_us:>8.1f}  {c.p50_us:>8.1f} "
                  f"{c.cpu_p50_us:>8.1f}  {f.cpu_p50_us - c.cpu_p50_us:>8.1f} {1e6 / f.p50_us:>11.0f}")
    secrets = [VerificationKey(f"s{i}", ALGORITHMS["hmac-sha256"], os.urandom(32)) for i in range(2)]
    for preset, header in (("sha256-hex", "x-hub-signature-256"), ("timestamp-v1", "x-signature")):
        scheme = WebhookScheme(preset, header)
        value = sign_webhook(preset, secrets[1].material, BODY, timestamp=NOW)
        headers = {header: value}

        def webhook(scheme: WebhookScheme = scheme, headers: dict[str, str] = headers) -> object:
            return scheme.verify(headers, BODY, False, secrets, NOW + 1)

        w = _time(webhook, args.seconds)
        print(f"{'webhook ' + preset:<20} {w.p50_us:>8.1f} {w.min_us:>8.1f} {w.cpu_p50_us:>8.1f}  {'':>8} {'':>8}  "
              f"{'':>8} {1e6 / w.p50_us:>11.0f}   (2 secrets tried)")
    if args.profile and profile_target is not None:
        _profile(profile_target)
    return 0


def _profile(fn: Callable[[], object], calls: int = 20_000) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\ncProfile, hmac-sha256 full verification x {calls}: {stats.total_calls / calls:.0f} function calls "
          "per verification (profiling slows every call; read the shares, not the times)")
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    sys.exit(main())
