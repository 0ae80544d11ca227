"""The matcher (Hyperscan, RE2 for what it refuses) says what RE2 says, and the inspector's shortcuts
for long texts (an early stop at a decisive rule, budgets) never turn a denial into an allow."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from urllib.parse import unquote_plus

import pytest
import re2
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.inspection.decode import decode, sql_form_bytes
from extauthz.inspection.engine import EARLY_STOP_BYTES, Inspector
from extauthz.inspection.matcher import RuleMatcher
from extauthz.inspection.rules import BUILTIN_RULES
from extauthz.inspection.ssrf import BARE_CANDIDATE_PATTERN, CANDIDATE_PATTERN, METADATA_CANDIDATE_PATTERN

from .conftest import build_inspector, make_request

CORPUS = Path(__file__).parent / "corpus"
PATTERNS = [r.pattern for r in BUILTIN_RULES] + [
    "(?mi)" + "|".join([CANDIDATE_PATTERN, METADATA_CANDIDATE_PATTERN, BARE_CANDIDATE_PATTERN])]
MATCHER = RuleMatcher(PATTERNS)
ALONE = [re2.compile(p) for p in PATTERNS]
#: Pieces of attacks and of ordinary text, for texts that come close to many rules. No vertical tab:
#: Hyperscan's \s matches it, RE2's does not (the one known difference: Hyperscan matches more).
FRAGMENTS = ["'", '"', "`", ")", "(", " or ", " and ", "1=1", "--", "#", "/*", "*/", "union", " select ", "null",
             "from", ";", "|", "&&", "$(", "${", "}", "{{", "<", ">", "script", "onload=", "javascript:", "../", "..\\",
             "etc/passwd", "id", "cat ", "sleep(5)", "http://", "127.0.0.1", "169.254.169.254", "[::1]", "localhost",
             "jndi:", "ldap://", "\n", "\r\n", " ", "a", "é", "\ue000", "\u017f", "select", "where", "=", "*", "%", "&#",
             "\\x", "set-cookie:", "<!doctype", "[", "$where", "$ne"]


def _rules_alone(data: bytes) -> set[int]:
    return {i for i, pattern in enumerate(ALONE) if pattern.search(data) is not None}


def _corpus_values() -> list[str]:
    """Every attack and every benign query and JSON string of the corpus."""
    attacks = yaml.safe_load((CORPUS / "attacks.yaml").read_text())
    benign = yaml.safe_load((CORPUS / "benign.yaml").read_text())
    values = [value for detector in attacks.values() for value in detector]
    values += [unquote_plus(query) for query in benign["queries"]]
    values += [value for body in benign["bodies"] for value in _strings(body)]
    return values


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value.keys(), *(s for v in value.values() for s in _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_hyperscan_compiles_every_built_in_rule() -> None:
    assert MATCHER.fallback_count == 0


@pytest.mark.parametrize("value", _corpus_values())
def test_every_rule_matches_the_corpus_as_re2_does(value: str) -> None:
    data = decode(value).data
    # Hyperscan (long texts), the RE2 set (short ones) and each rule alone agree.
    assert set(MATCHER.scan(data)[0]) == _rules_alone(data) == set(MATCHER.matched(data)[0])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3).filter(lambda s: "\x0b" not in s), max_size=40))
def test_every_rule_matches_any_text_as_re2_does(pieces: list[str]) -> None:
    data = "".join(pieces).encode("utf-8", "replace")
    assert set(MATCHER.scan(data)[0]) == _rules_alone(data)


@pytest.mark.parametrize("pattern", [r"\C", r"(?U)a+b", r"a*", r"(a|b)\b{2}"])
def test_a_pattern_hyperscan_refuses_is_matched_by_re2(pattern: str) -> None:
    matcher = RuleMatcher(["(?mi)select", "(?mi)" + pattern, "(?mi)union"])
    assert matcher.fallback_count == 1
    for text in ["union select", "aab", "xyz", "ab b", ""]:
        data = text.encode()
        expected = {i for i, p in enumerate(["select", pattern, "union"]) if re2.search("(?mi)" + p, data)}
        assert set(matcher.scan(data)[0]) == expected
        assert set(matcher.matched(data)[0]) == expected


def test_a_custom_rule_hyperscan_refuses_still_denies() -> None:
    inspector = build_inspector({"rules": [{"id": "lazy", "pattern": r"(?U)tick\d+et"}]})
    assert inspector.inspect(make_request(query="q=ticket%20tick42et")).score == 5
    assert inspector.inspect(make_request(query="q=ticket")).score == 0


def test_each_thread_scans_with_its_own_scratch() -> None:
    data = b"x' or '1'='1 " * 2000
    expected = set(MATCHER.scan(data)[0])
    results: list[set[int]] = []

    def scan() -> None:
        for _ in range(20):
            results.append(set(MATCHER.scan(data)[0]))

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 80 and all(r == expected for r in results)


# --- long texts: the early stop and the budgets ----------------------------------------------------

def _long_text(attack: str, filler: str = "an ordinary sentence about orders and parcels. ") -> bytes:
    return (attack + "\n" + filler * (2 * EARLY_STOP_BYTES // len(filler))).encode()


def test_a_long_text_with_an_attack_is_denied_after_an_early_stop() -> None:
    inspector = build_inspector()
    verdict = inspector.inspect(make_request(body=_long_text("name=x' or '1'='1"), content_type="text/plain"))
    assert verdict.score >= 5 and {f.location for f in verdict.findings} == {"body"}


def test_an_early_stop_that_locates_nothing_matches_again_to_the_end() -> None:
    # A long JSON document: "union" ends one string and "select null, ..." starts the next, which
    # the joined text matches but no single value holds. The rule decides alone, so the first pass
    # stops there; nowhere to put it, every rule runs again to the end, and finds the real attack.
    inspector = build_inspector()
    filler = ["an ordinary sentence about orders and parcels"] * (EARLY_STOP_BYTES // 40)
    split = inspector.inspect(make_request(body=["please union", "select null, null from users", *filler]))
    assert split.findings == ()
    later = inspector.inspect(make_request(body=["please union", "select null, null from users", *filler,
                                                 "${jndi:ldap://x/a}"]))
    assert later.score >= 5 and {f.rule for f in later.findings} == {"log4shell-jndi"}


def test_report_mode_stops_where_enforce_mode_would_deny_and_reports_it() -> None:
    inspector = build_inspector({"mode": "report"})
    assert inspector.decisive == build_inspector().decisive
    text = _long_text("x' or '1'='1 ${jndi:ldap://a/b} <script>alert(1)</script>")
    verdict = inspector.inspect(make_request(body=text, content_type="text/plain"))
    assert verdict.findings and all(f.reported for f in verdict.findings) and verdict.score == 0


def test_a_rule_reported_on_its_own_never_stops_early() -> None:
    inspector = build_inspector({"report": ["sqli"]})
    assert not any(inspector.by_id[r].detector == "sqli" for r in inspector.decisive if r in inspector.by_id)
    text = _long_text("x' or '1'='1") + b"\n<script>alert(1)</script>"
    verdict = inspector.inspect(make_request(body=text, content_type="text/plain"))
    assert "xss-script-tag" in {f.rule for f in verdict.findings if not f.reported} and verdict.score >= 5


def test_an_excluded_rule_never_stops_early() -> None:
    inspector = build_inspector({"exclude": [{"rules": ["sqli"], "paths": ["/api/items"]}]})
    assert not any(inspector.by_id[r].detector == "sqli" for r in inspector.decisive if r in inspector.by_id)
    text = _long_text("x' or '1'='1") + b"\n<script>alert(1)</script>"
    verdict = inspector.inspect(make_request(body=text, content_type="text/plain"))
    assert {f.rule for f in verdict.findings} >= {"xss-script-tag"}
    assert not any(f.detector == "sqli" for f in verdict.findings)


def test_more_sql_comments_than_the_budget_is_an_evasion() -> None:
    _, over = sql_form_bytes(b"union/**/select " * 300)
    assert over and not sql_form_bytes(b"union/**/select " * 10)[1]
    inspector: Inspector = build_inspector()
    for body in ("a/**/b " * 300, "a/**/b " * 3000):  # short (every form matched) and long (stopped before)
        verdict = inspector.inspect(make_request(body=body, content_type="text/plain"))
        assert "evasion-encoding-flood" in {f.rule for f in verdict.findings} and verdict.score >= 5
    assert inspector.inspect(make_request(body="a/**/b " * 10, content_type="text/plain")).findings == ()


def test_a_long_json_body_full_of_escapes_is_inspected() -> None:
    inspector = build_inspector()
    body = json.dumps(["\\$(id)'"] * 8000 + ["ok"]).encode()
    verdict = inspector.inspect(make_request(body=body, content_type="application/json"))
    assert verdict.score >= 5 and any(f.location.startswith("body:/") for f in verdict.findings)


def test_only_rules_read_in_bodies_stop_early() -> None:
    inspector = build_inspector()
    assert "crlf-header-injection" not in inspector.decisive  # not a body target: it would locate nowhere
    assert {"sqli-tautology", "log4shell-jndi", "xss-script-tag"} <= inspector.decisive


def test_findings_come_in_the_order_of_the_rules_whatever_the_hash_seed() -> None:
    # A denial lists its rules in this order (a PolicyTest compares it): never the order of a set.
    order = [r.id for r in BUILTIN_RULES]
    for text in ("x' OR '1'='1", "x' or 1=1 union select null, null from users --"):
        for query in (text, text * (6000 // len(text))):  # short (RE2) and long (Hyperscan, no early stop)
            verdict = build_inspector().inspect(make_request(query="q=" + query.replace(" ", "%20")))
            rules = list(dict.fromkeys(f.rule for f in verdict.findings))
            assert rules == sorted(rules, key=order.index) and len(rules) >= 2


# --- a long raw text body: read as UTF-8 once, from its bytes ------------------------------------

_RAW_PIECES = [b"%", b"%25", b"%41", b"%u0041", b"%c0%ae", b"\xc0\xae", b"\xff", b"\xc3", b"\xa9", b"\xef\xbc\xb3",
               b"\xe2\x80\x8b", b"\x00", b"\xc2\xad", b"&lt;", b"&#60;", b"&amp;", b"\\x41", b"\\u0024", b"/*", b"*/",
               b"/*!50000", b"${", b"}", b"${lower:j}", b"\xee\x80\x81", b"a", b" ", b"\n", b"\xe3\x80\x82"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_RAW_PIECES), max_size=60), st.binary(max_size=40))
def test_decoding_raw_bytes_alone_is_decoding_them_with_their_text(pieces: list[bytes], noise: bytes) -> None:
    raw = b"".join(pieces) + noise
    alone, with_text = decode(None, raw), decode(raw.decode("utf-8", "replace"), raw)
    assert (alone.data, alone.over_budget) == (with_text.data, with_text.over_budget)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"/*", b"*/", b"/*!", b"/*!50000", b"!", b"a", b" ", b"\xef\xbf\xbd"]), max_size=80))
def test_the_sql_form_of_few_or_many_comments(pieces: list[bytes]) -> None:
    # Against the form made the plain way: versioned comments out, then every comment counted.
    data = b"".join(pieces)
    expected_over = data.count(b"/*") > 256
    data_subbed = re.sub(rb"/\*!\d{0,6}", b" ", data)
    form, over = sql_form_bytes(data)
    assert over == expected_over
    if b"/*" not in data:
        assert form is data
    else:
        pieces_ = data_subbed.split(b"/*", 257)[:257]
        out = [pieces_[0]] + [b" " + (p[p.find(b"*/") + 2 :] if b"*/" in p else p) for p in pieces_[1:]]
        assert form == b"".join(out).replace(b"*/", b" ")


def test_a_long_invalid_utf8_text_body_is_located_and_read_once() -> None:
    inspector = build_inspector()
    noise = bytes(range(128, 256)) * (2 * EARLY_STOP_BYTES // 128)
    for body in (noise + b"\nname=x' or '1'='1\n" + noise, noise + b"\n%2527 or %27%31%27=%271\n" + noise):
        verdict = inspector.inspect(make_request(body=body, content_type="text/plain"))
        assert verdict.score >= 5 and {f.location for f in verdict.findings} == {"body"}, verdict
    assert inspector.inspect(make_request(body=noise, content_type="text/plain")).findings == ()
