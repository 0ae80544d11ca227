"""``extauthz blocks list|show|lift``: the abuse detectors' blocks, for operators.

Against Redis directly (``--redis-url``, the sidecars' store: every replica's blocks), or against one
sidecar's admin endpoint (``--url http://host:8282 --admin-token-file FILE``), which is the only way
to reach the blocks of a sidecar that keeps its state in process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from extauthz.detection.model import parse_block_id

__all__ = ["add_arguments", "run"]


def add_arguments(sub: Any) -> None:
    blocks = sub.add_parser("blocks", help="list, show or lift the blocks of abuse detectors (Redis, or a "
                                           "sidecar's admin endpoint)")  # fmt: skip
    blocks.add_argument("action", choices=["list", "show", "lift"])
    blocks.add_argument("id", nargs="?", help="block id <policy>/<detector>/<digest> (show, lift)")
    blocks.add_argument("--redis-url", default=os.environ.get("EXTAUTHZ_REDIS_URL"),
                        help="the sidecars' Redis (env EXTAUTHZ_REDIS_URL)")
    blocks.add_argument("--redis-password-file", default=os.environ.get("EXTAUTHZ_REDIS_PASSWORD_FILE"))
    blocks.add_argument("--url", help="a sidecar's probes port, e.g. http://127.0.0.1:8282 (its admin endpoint)")
    blocks.add_argument("--admin-token-file", default=os.environ.get("EXTAUTHZ_ADMIN_TOKEN_FILE"),
                        help="the admin endpoint's bearer token (with --url)")
    blocks.add_argument("--key", help="list: only blocks whose key contains this text")
    blocks.add_argument("--json", action="store_true", help="print JSON")


def run(ns: argparse.Namespace) -> int:
    if ns.action in ("show", "lift"):
        if not ns.id:
            print(f"extauthz blocks {ns.action}: a block id is required (see 'extauthz blocks list')", file=sys.stderr)
            return 2
        try:
            parse_block_id(ns.id)
        except ValueError as exc:
            print(f"extauthz blocks: {exc}", file=sys.stderr)
            return 2
    if bool(ns.redis_url) == bool(ns.url):
        print("extauthz blocks: give --redis-url (or EXTAUTHZ_REDIS_URL) or --url", file=sys.stderr)
        return 2
    try:
        result = _over_http(ns) if ns.url else asyncio.run(_over_redis(ns))
    except _Failure as exc:
        print(f"extauthz blocks: {exc}", file=sys.stderr)
        return 1
    return _print(ns, result)


class _Failure(Exception):
    pass


async def _over_redis(ns: argparse.Namespace) -> Any:
    from extauthz.detection.admin import lift_block, list_blocks, show_block
    from extauthz.detection.redis import RedisDetections
    from extauthz.stores import StoreConfigError, StoreError
    from extauthz.stores.redis import RedisStore

    try:
        store = RedisStore(ns.redis_url, password_file=ns.redis_password_file)
    except StoreConfigError as exc:
        raise _Failure(str(exc)) from None
    await store.start()
    backend = RedisDetections(store)
    now_ms = int(time.time() * 1000)
    try:
        if ns.action == "list":
            return {"blocks": [r.as_dict(now_ms) for r in await list_blocks(backend)]}
        if ns.action == "show":
            record = await show_block(backend, ns.id)
            if record is None:
                raise _Failure(f"no live block {ns.id}")
            return record.as_dict(now_ms)
        return {"id": ns.id, "lifted": await lift_block(backend, ns.id)}
    except StoreError as exc:
        raise _Failure(str(exc)) from None
    finally:
        await store.aclose()


def _over_http(ns: argparse.Namespace) -> Any:
    if not ns.admin_token_file:
        raise _Failure("--url needs --admin-token-file")
    try:
        with open(ns.admin_token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise _Failure(f"cannot read {ns.admin_token_file}: {exc.strerror or exc}") from None
    url = ns.url.rstrip("/") + "/admin/blocks" + ("" if ns.action == "list" else "/" + ns.id)
    method = {"list": "GET", "show": "GET", "lift": "DELETE"}[ns.action]
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace").strip()
        if exc.code == 404 and ns.action == "lift":
            return json.loads(body)
        raise _Failure(f"{url}: HTTP {exc.code} {body}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Failure(f"{url}: {exc}") from None


def _print(ns: argparse.Namespace, result: Any) -> int:
    if ns.action == "list" and ns.key:
        result = {"blocks": [b for b in result["blocks"] if ns.key in b["key"]]}
    if ns.json:
        print(json.dumps(result, indent=2))
    elif ns.action == "list":
        blocks = result["blocks"]
        for b in blocks:
            print(f"{b['id']}  {b['action']:<8} {b['status']}  {b['remaining_s']:>8.0f}s left  offences {b['offences']}"
                  f"  key {b['key']}")
        print(f"{len(blocks)} live block(s)")
    elif ns.action == "show":
        for name, value in result.items():
            print(f"{name}: {value}")
    else:
        print(f"{result['id']}: {'lifted' if result['lifted'] else 'no live block'}")
    return 0 if ns.action != "lift" or result.get("lifted") else 1
