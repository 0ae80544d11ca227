"""The ``openapi`` sidecar scenario of bench/run.py, and the OpenAPI figures measured in process.

    python bench/openapi_scenario.py compile --spec /path/to/twilio_api_v2010.json   # a real spec
    python bench/openapi_scenario.py compile                                         # a generated one
    python bench/openapi_scenario.py decide                                          # in-process cost

``compile`` reads and compiles a spec (median of --rounds), as a policy load or a spec reload does:
with --spec, any file (Twilio's public v2010 spec, 1.9 MB and 197 operations, is the reference;
fetch it for measurement only), without it a generated spec of about that size (``generated_spec``).

``decide`` measures, in process and on the Authorizer the sidecar runs, what the openapi section adds
to deciding the scenario's request (a POST of a 1 KiB JSON body to a documented operation with a
path parameter): the same policy with and without its ``openapi:`` section, interleaved rounds,
per-Check wall time percentiles, and the difference of the medians.

The scenario for bench/run.py writes the spec and the policy, and sends that request; run.py measures
allow-all with the very same request too, (b:openapi), so the ratio (c)/(b:openapi) is the sidecar's
own cost of reading the body and enforcing the spec.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOST, PATH = "shop.example.com", "/api/v1/customers/acme-corp/orders"

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Shop API (benchmark)", "version": "1"},
    "servers": [{"url": "/api/v1"}],
    "components": {"schemas": {
        "Order": {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {
            "id": {"type": "string", "format": "uuid", "readOnly": True},
            "items": {"type": "array", "minItems": 1, "maxItems": 50, "items": {"$ref": "#/components/schemas/Item"}},
            "note": {"type": ["string", "null"], "maxLength": 2000},
            "shipping": {"$ref": "#/components/schemas/Address"}}},
        "Item": {"type": "object", "required": ["sku", "qty"], "additionalProperties": False, "properties": {
            "sku": {"type": "string", "pattern": "^sku-[0-9]+$"},
            "qty": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 100}}},
        "Address": {"type": "object", "required": ["street", "city", "zip"], "properties": {
            "street": {"type": "string", "maxLength": 100}, "city": {"type": "string", "maxLength": 60},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    }},
    "paths": {
        "/customers/{customerId}/orders": {
            "parameters": [{"name": "customerId", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[a-z][a-z0-9-]{2,31}$"}}],
            "get": {"operationId": "listOrders", "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}}],
                "responses": {"200": {"description": "orders"}}},
            "post": {"operationId": "createOrder", "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
                "responses": {"201": {"description": "created"}}},
        },
        "/customers/{customerId}/orders/{orderId}": {
            "parameters": [{"name": "customerId", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "orderId", "in": "path", "required": True,
                            "schema": {"type": "string", "format": "uuid"}}],
            "get": {"operationId": "getOrder", "responses": {"200": {"description": "the order"}}},
        },
        "/health": {"get": {"operationId": "health", "responses": {"200": {"description": "up"}}}},
    },
}


def _body() -> bytes:
    order = {"items": [{"sku": f"sku-{1000 + i}", "qty": 1 + i % 9} for i in range(12)],
             "shipping": {"street": "1 Main Street", "city": "Springfield", "zip": "12345"}, "note": ""}
    order["note"] = "n" * (1024 - len(json.dumps(order)))
    return json.dumps(order).encode()


#: A 1 KiB JSON body of the typical operation.
BODY = _body()
assert len(BODY) == 1024, len(BODY)


def policy(with_openapi: bool = True) -> str:
    section = "  openapi: {spec: shop.openapi.json, security: ignore}\n" if with_openapi else ""
    name = "bench-openapi" if with_openapi else "bench-openapi-off"
    return (f"apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            f"  match: {{hosts: [\"{HOST}\"]}}\n{section}  rules: [{{name: documented, decision: allow}}]\n")


def write_policies(folder: Path, with_openapi: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shop.openapi.json").write_text(json.dumps(SPEC))
    (folder / "bench.yaml").write_text(policy(with_openapi))
    return folder


@contextlib.contextmanager
def openapi_setup(workdir: Path, with_openapi: bool = True) -> Iterator[dict]:
    policies = write_policies(workdir / "policies", with_openapi)
    yield {
        "extra_args": ["--policies", str(policies)],  # the last --policies wins
        "method": "POST", "host": HOST, "path": PATH, "body": BODY,
        "headers": {"content-type": "application/json"},
    }


# --- a generated spec the size of a large real one -------------------------------------------------
def generated_spec(resources: int = 66) -> dict[str, Any]:
    """About 1.9 MB and 198 operations: per resource a list, a create (JSON body) and a fetch, with
    patterned path parameters, paging parameters and descriptions as long as real specs have."""
    prose = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt. " * 20
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for n in range(resources):
        name = f"Resource{n}"
        schemas[name] = {"type": "object", "description": prose, "required": ["name"], "properties": {
            "sid": {"type": "string", "pattern": f"^R{n:02d}[0-9a-f]{{32}}$", "readOnly": True, "description": prose},
            "name": {"type": "string", "maxLength": 64, "description": prose},
            "count": {"type": "integer", "format": "int32", "minimum": 0},
            "status": {"type": "string", "enum": ["active", "suspended", "closed"]},
            "created": {"type": "string", "format": "date-time", "readOnly": True},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 10},
            "parent": {"$ref": f"#/components/schemas/Resource{(n + 1) % resources}Ref"},
        }}
        schemas[f"{name}Ref"] = {"type": ["object", "null"], "properties": {"sid": {"type": "string"}}}
        account = {"name": "AccountSid", "in": "path", "required": True, "description": prose,
                   "schema": {"type": "string", "pattern": "^AC[0-9a-fA-F]{32}$", "minLength": 34, "maxLength": 34}}
        paths[f"/Accounts/{{AccountSid}}/Resource{n}.json"] = {
            "description": prose,
            "get": {"operationId": f"list{name}", "description": prose, "parameters": [account,
                    {"name": "PageSize", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "Page", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
                    "responses": {"200": {"description": prose, "content": {"application/json": {"schema": {
                        "type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}}}}}},
            "post": {"operationId": f"create{name}", "description": prose, "parameters": [account],
                     "requestBody": {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
                                                 "application/x-www-form-urlencoded": {"schema": {
                                                     "$ref": f"#/components/schemas/{name}"}}}},
                     "responses": {"201": {"description": prose}}},
        }
        paths[f"/Accounts/{{AccountSid}}/Resource{n}/{{Sid}}.json"] = {
            "get": {"operationId": f"fetch{name}", "description": prose, "parameters": [account, {
                "name": "Sid", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^R[0-9a-f]+$"}}],
                "responses": {"200": {"description": prose}}},
        }
    return {"openapi": "3.1.0", "info": {"title": "Generated", "version": "1"},
            "servers": [{"url": "https://api.example.com/2010-04-01"}], "components": {"schemas": schemas},
            "paths": paths}


def _compile(args: argparse.Namespace) -> int:
    from extauthz.openapi import Settings, compile_spec

    with tempfile.TemporaryDirectory(prefix="openapi-compile-") as tmp:
        if args.spec:
            path = Path(args.spec)
        else:
            path = Path(tmp) / "generated.json"
            path.write_text(json.dumps(generated_spec()))
        # Twilio's spec secures everything with http basic, which no identity kind satisfies by itself.
        settings = Settings(security="ignore")
        times, spec = [], None
        for _ in range(args.rounds):
            started = time.perf_counter()
            spec = compile_spec(path, settings)
            times.append(time.perf_counter() - started)
        assert spec is not None
        size = path.stat().st_size
        print(f"{path.name}: {size / 1e6:.2f} MB, {len(spec.operations)} operations, {len(spec.schemas.defs)} "
              f"schemas compiled; load + check + compile: median {statistics.median(times):.3f} s, "
              f"min {min(times):.3f} s, max {max(times):.3f} s over {args.rounds} rounds")  # fmt: skip
    return 0


def _decide(args: argparse.Namespace) -> int:
    from extauthz.decision import Authorizer
    from extauthz.policy import load_folder
    from extauthz.samples import check_request_from_sample

    with tempfile.TemporaryDirectory(prefix="openapi-decide-") as tmp:
        on = Authorizer(load_folder(write_policies(Path(tmp) / "on", True)))
        off = Authorizer(load_folder(write_policies(Path(tmp) / "off", False)))
        sample = {"method": "POST", "host": HOST, "path": PATH, "body": BODY.decode(),
                  "headers": {"content-type": "application/json", "x-request-id": "3f1c6a2e-7d4b-4e0f-9a51-2b8c5d6e7f80"}}
        message = check_request_from_sample(sample)
        for authorizer in (on, off):
            first = asyncio.run(authorizer.check(message))
            assert first.allowed, first

        async def timed(authorizer: Authorizer, count: int) -> list[float]:
            out = []
            check = authorizer.check
            clock = time.perf_counter
            for _ in range(count):
                started = clock()
                await check(message)
                out.append(clock() - started)
            return out

        cpu: dict[str, list[float]] = {"on": [], "off": []}

        async def main() -> dict[str, list[float]]:
            samples: dict[str, list[float]] = {"on": [], "off": []}
            await timed(on, 2000)
            await timed(off, 2000)
            for _ in range(args.rounds):  # interleaved: both see the same machine
                for name, authorizer in (("on", on), ("off", off)):
                    began = time.process_time()
                    samples[name] += await timed(authorizer, args.checks)
                    cpu[name].append((time.process_time() - began) / args.checks * 1e6)
            return samples

        from extauthz.server import GC_THRESHOLDS

        gc.collect()
        gc.set_threshold(*GC_THRESHOLDS)  # as `extauthz serve` sets it
        samples = asyncio.run(main())
    p50 = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    p90 = {k: sorted(v)[int(len(v) * 0.9)] * 1e6 for k, v in samples.items()}
    print(f"decide POST {PATH} with a {len(BODY)} B JSON body, {args.rounds} x {args.checks} Checks each, in process:")
    print(f"  with openapi:    p50 {p50['on']:.1f} us, p90 {p90['on']:.1f} us")
    print(f"  without openapi: p50 {p50['off']:.1f} us, p90 {p90['off']:.1f} us")
    print(f"  the openapi section adds {p50['on'] - p50['off']:.1f} us at p50")
    cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    print(f"  CPU per Check (median of rounds, timing loop included): {cpu_on:.1f} us against {cpu_off:.1f} us, "
          f"+{cpu_on - cpu_off:.1f} us")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    compile_parser = sub.add_parser("compile", help="load + check + compile a spec")
    compile_parser.add_argument("--spec", help="a spec file (default: a generated one of about 1.9 MB)")
    compile_parser.add_argument("--rounds", type=int, default=5)
    decide = sub.add_parser("decide", help="what the openapi section adds to one decision, in process")
    decide.add_argument("--checks", type=int, default=5000)
    decide.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= 50) or (args.command == "decide" and not 100 <= args.checks <= 200_000):
        parser.error("bounds: 1 <= --rounds <= 50, 100 <= --checks <= 200000")
    return _compile(args) if args.command == "compile" else _decide(args)


if __name__ == "__main__":
    sys.exit(main())
