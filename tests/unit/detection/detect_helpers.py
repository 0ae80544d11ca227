"""Policies with abuse detectors, decided in process (a real Authorizer, real identity sources)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from extauthz.decision import Authorizer, Decision
from extauthz.policy import Services, load_folder
from extauthz.samples import check_request_from_sample

HOST = "api.example.com"
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
ACME = "ak_example_acme_7Qm2xV9pL4sT8wZ1nB6cD3fH"
GLOBEX = "ak_example_globex_R5yK2mN8qW1eT4uI7oP0aS3d"


def policy(detect: str, *, quotas: str = "", name: str = "api") -> str:
    indent = "\n".join("  " + line for line in detect.strip("\n").splitlines())
    text = (f"apiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            f"  match: {{hosts: [{HOST}]}}\n"
            f"  identity:\n    - name: partners\n      apiKey:\n        keys: {EXAMPLES}/keys/identity/apikeys\n"
            f"        in: [{{header: x-api-key}}]\n"
            f"  rules:\n    - {{name: all, decision: allow}}\n  detect:\n{indent}\n")  # fmt: skip
    if quotas:
        text += "  quotas:\n" + "\n".join("  " + line for line in quotas.strip("\n").splitlines()) + "\n"
    return text


def build(folder: Path, detect: str, *, settings: dict[str, Any] | None = None, services: Services | None = None,
          **kwargs: Any) -> Authorizer:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api.yaml").write_text(policy(detect, **kwargs))
    return Authorizer(load_folder(folder, services or Services(settings=settings or {})), check_timeout=2.0)


def request(key: str | None = ACME, *, ip: str = "203.0.113.7", path: str = "/v1/things",
            method: str = "GET") -> dict[str, Any]:  # fmt: skip
    headers = {"x-api-key": key} if key is not None else {}
    return {"host": HOST, "path": path, "method": method, "headers": headers,
            "source": {"address": ip, "port": 40000}}  # fmt: skip


async def decide_async(authorizer: Authorizer, sample: dict[str, Any]) -> Decision:
    return await authorizer.check(check_request_from_sample(sample), explain=True)


def decide(authorizer: Authorizer, sample: dict[str, Any]) -> Decision:
    return asyncio.run(decide_async(authorizer, sample))


Decide = Callable[[Authorizer, dict[str, Any]], Decision]
