"""The inspect check: policy surface, denials that name rules and locations (never the text),
report mode, exclusions, limits and custom rules, through the real pipeline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from extauthz.decision import Authorizer, Decision
from extauthz.policy import load_folder
from extauthz.policy.model import PolicySetError
from extauthz.samples import check_request_from_sample
from extauthz.telemetry.metrics import Metrics, install

ATTACK = "1' or '1'='1"


def decide(folder: Path, sample: dict[str, Any]) -> Decision:
    authorizer = Authorizer(load_folder(folder))
    return asyncio.run(authorizer.check(check_request_from_sample(sample)))


def policy(tmp_path: Path, inspect: dict[str, Any] | None) -> Path:
    spec: dict[str, Any] = {"rules": [{"name": "all", "decision": "allow"}]}
    if inspect is not None:
        spec["inspect"] = inspect
    document = {"apiVersion": "extauthz.dev/v1", "kind": "AuthPolicy", "metadata": {"name": "api"}, "spec": spec}
    folder = tmp_path / "policies"
    folder.mkdir(exist_ok=True)
    (folder / "api.yaml").write_text(yaml.safe_dump(document))
    return folder


def json_post(body: Any, path: str = "/api/items", **headers: str) -> dict[str, Any]:
    return {"method": "POST", "host": "api.example.com", "path": path,
            "headers": {"content-type": "application/json", **headers}, "body": json.dumps(body)}


def test_an_attack_is_denied_naming_rules_and_locations_never_the_text(tmp_path: Path) -> None:
    folder = policy(tmp_path, {})
    decision = decide(folder, json_post({"items": [{"note": ATTACK}]}))
    assert (decision.allowed, decision.status, decision.reason) == (False, 403, "attack_detected")
    assert "sqli-tautology" in decision.message and "body:/items/0/note" in decision.message
    assert ATTACK not in decision.message and "1'" not in json.dumps(decision.attributes)
    assert decision.attributes is not None
    assert decision.attributes["inspect_rules"].startswith("sqli-")
    assert decision.attributes["inspect_locations"] == "body:/items/0/note"
    assert decision.attributes["inspect_action"] == "deny"
    assert decision.rule.startswith("sqli-")


def test_a_payload_in_a_key_or_a_parameter_name_is_not_echoed_in_the_location(tmp_path: Path) -> None:
    folder = policy(tmp_path, {})
    decision = decide(folder, json_post({"${jndi:ldap://x/a}": 1}))
    assert not decision.allowed and "body:/*" in decision.message and "jndi" not in decision.message.split(" at ")[1]
    by_name = decide(folder, {"path": "/a?" + quote("<script>alert(1)</script>") + "=1", "host": "api.example.com"})
    assert not by_name.allowed and "query:*" in by_name.message


def test_benign_traffic_passes(tmp_path: Path) -> None:
    folder = policy(tmp_path, {})
    decision = decide(folder, json_post({"name": "O'Brien", "note": "select the union plan; drop me a line"}))
    assert decision.allowed and decision.attributes is None


def test_report_mode_allows_and_records(tmp_path: Path) -> None:
    folder = policy(tmp_path, {"mode": "report"})
    decision = decide(folder, json_post({"q": ATTACK}))
    assert decision.allowed and decision.attributes is not None
    assert decision.attributes["inspect_action"] == "report" and decision.attributes["reported"] is True


def test_report_per_rule_or_detector(tmp_path: Path) -> None:
    folder = policy(tmp_path, {"report": ["sqli"]})
    assert decide(folder, json_post({"q": ATTACK})).allowed
    assert not decide(folder, json_post({"q": "<script>alert(1)</script>"})).allowed


def test_exclusions_by_pointer_parameter_and_path(tmp_path: Path) -> None:
    folder = policy(tmp_path, {"exclude": [
        {"rules": ["xss"], "locations": ["body:/posts/*/html"]},
        {"locations": ["query:sql"], "paths": ["/admin/*"]},
    ]})
    html = {"posts": [{"html": "<p onclick=\"go()\">hi</p>"}]}
    assert decide(folder, json_post(html)).allowed
    assert not decide(folder, json_post({"posts": [{"title": "<p onclick=\"go()\">hi</p>"}]})).allowed
    query = {"host": "api.example.com", "path": "/admin/run?sql=" + quote("1 union select 1,2--")}
    assert decide(folder, query).allowed
    assert not decide(folder, {**query, "path": query["path"].replace("/admin", "/public")}).allowed


def test_threshold_and_weak_signals(tmp_path: Path) -> None:
    weak = json_post({"path": "../shared"})  # one ../ alone: score 3
    assert decide(policy(tmp_path, {}), weak).allowed
    assert not decide(policy(tmp_path, {"threshold": 3}), weak).allowed


def test_detectors_and_disable(tmp_path: Path) -> None:
    only_l4s = policy(tmp_path, {"detectors": ["log4shell"]})
    assert decide(only_l4s, json_post({"q": ATTACK})).allowed
    assert not decide(only_l4s, json_post({"q": "${jndi:ldap://x}"})).allowed
    disabled = policy(tmp_path, {"disable": ["sqli-tautology", "sqli-comment-after-quote"]})
    assert decide(disabled, json_post({"q": "x' or 'a'='a"})).allowed


def test_custom_rules_with_id_score_targets_and_mode(tmp_path: Path) -> None:
    folder = policy(tmp_path, {"rules": [
        {"id": "no-internal-ticket", "pattern": r"\bINT-\d{4}\b", "targets": ["body"], "score": 5},
        {"id": "watch-beta", "pattern": "beta-feature", "targets": ["header"], "mode": "report"},
    ]})
    denied = decide(folder, json_post({"ref": "see int-1234"}))
    assert not denied.allowed and "no-internal-ticket" in denied.message and "body:/ref" in denied.message
    reported = decide(folder, json_post({"ok": 1}, **{"x-flags": "beta-feature"}))
    assert reported.allowed and reported.attributes is not None and reported.attributes["inspect_rules"] == "watch-beta"


def test_limits_are_400_or_413_with_where(tmp_path: Path) -> None:
    folder = policy(tmp_path, {"limits": {"json": {"maxDepth": 4}, "maxParameters": 3}})
    deep = decide(folder, json_post({"a": {"b": {"c": {"d": {"e": 1}}}}}))
    assert (deep.status, deep.reason) == (413, "body_limit_exceeded") and "body:/a/b/c/d" in deep.message
    params = decide(folder, {"host": "api.example.com", "path": "/a?a=1&b=2&c=3&d=4"})
    assert (params.status, params.reason) == (400, "request_limit_exceeded")
    long_url = decide(folder, {"host": "api.example.com", "path": "/a?q=" + "x" * 9000})  # :path is Envoy's to limit
    assert long_url.allowed
    long_header = decide(folder, {"host": "api.example.com", "path": "/a", "headers": {"x-big": "x" * 9000}})
    assert (long_header.status, long_header.reason) == (400, "request_limit_exceeded")
    duplicate = decide(folder, {**json_post({}), "body": '{"a": 1, "a": 2}'})
    assert (duplicate.status, duplicate.reason) == (400, "body_duplicate_key")
    malformed = decide(folder, {**json_post({}), "body": '{"a": '})
    assert (malformed.status, malformed.reason) == (400, "body_malformed")
    truncated = decide(folder, {**json_post({"a": 1}), "partial_body": True})
    assert (truncated.status, truncated.reason) == (413, "body_truncated")
    allowed_cut = policy(tmp_path, {"limits": {"partialBody": "inspect"}})
    assert decide(allowed_cut, {**json_post({"a": "fine"}), "partial_body": True}).allowed


def test_metrics_count_findings_per_rule(tmp_path: Path) -> None:
    metrics = Metrics()
    install(metrics)
    try:
        decide(policy(tmp_path, {}), json_post({"q": ATTACK}))
        text = metrics.exposition().decode()
    finally:
        install(None)
    assert 'extauthz_inspect_findings_total{action="blocked",policy="api",rule="sqli-tautology",target="body"} 1.0' in text


@pytest.mark.parametrize(
    ("inspect", "message"),
    [
        ({"mode": "block"}, "must be one of"),
        ({"detectors": ["sqli", "nope"]}, "unknown detector"),
        ({"disable": ["nope"]}, "is not a built-in rule id"),
        ({"rules": [{"id": "x", "pattern": "(a"}]}, "is not a valid RE2 pattern"),
        ({"rules": [{"id": "sqli-tautology", "pattern": "a"}]}, "is already a rule id"),
        ({"rules": [{"id": "x", "pattern": "a", "targets": ["everywhere"]}]}, "unknown target"),
        ({"exclude": [{"locations": ["somewhere"]}]}, "must be 'path'"),
        ({"exclude": [{}]}, "needs rules, paths or locations"),
        ({"ssrf": {"allow": ["not a host!"]}}, "must be a host name"),
        ({"limits": {"json": {"maxNumberLength": 5}}}, "must be between"),
        ({"limits": {"partialBody": "ignore"}}, "must be one of"),
        ({"threshold": 0}, "must be between"),
        ({"unknown": 1}, "unknown field"),
    ],
)
def test_policy_errors(tmp_path: Path, inspect: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicySetError) as raised:
        load_folder(policy(tmp_path, inspect))
    assert message in str(raised.value)


def test_inspection_as_a_layer_denies_before_the_deciding_policy_and_never_allows(tmp_path: Path) -> None:
    folder = tmp_path / "layered"
    folder.mkdir()
    (folder / "all.yaml").write_text(
        "apiVersion: extauthz.dev/v1\nkind: LayerPolicy\nmetadata: {name: payload-inspection}\nspec:\n  inspect: {}\n"
        "---\napiVersion: extauthz.dev/v1\nkind: AuthPolicy\nmetadata: {name: api}\nspec:\n"
        "  rules: [{name: reads, when: \"request.method == 'GET'\", decision: allow}]\n"
    )
    attack = decide(folder, json_post({"q": ATTACK}))
    assert (attack.allowed, attack.reason, attack.policy) == (False, "attack_detected", "payload-inspection")
    benign_post = decide(folder, json_post({"q": "O'Brien"}))
    assert (benign_post.allowed, benign_post.reason) == (False, "no_rule_matched")  # the layer passed, the policy decided
    assert decide(folder, {"host": "api.example.com", "path": "/a?q=hello"}).allowed
