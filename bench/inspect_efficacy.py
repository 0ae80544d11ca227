"""Payload inspection efficacy: detection and false-positive rates on our corpus and public ones.

    python bench/inspect_efficacy.py                       # our corpus only
    python bench/inspect_efficacy.py --gotestwaf DIR --crs DIR [--sensitivity 2]

Our corpus: tests/unit/inspection/corpus/ (attacks sent as a query parameter and as a JSON field;
benign queries and JSON bodies).

Public corpora are read for measurement only, from local checkouts (never committed here):
  --gotestwaf  a checkout of wallarm/gotestwaf: every payload of testcases/owasp and
               testcases/community (true positives) and testcases/false-pos (benign texts), each
               sent as a query parameter value and as a JSON string field.
  --crs        a checkout of coreruleset/coreruleset: the regression tests of the request rule
               files for the attack classes we cover (930 LFI, 931 RFI, 932 RCE, 934 generic/SSRF,
               941 XSS, 942 SQLi, 944 Java) replayed as the request they describe; a test that
               expects its rule to log is an attack, one that expects it not to is benign. Classes
               we do not cover (PHP, session fixation, protocol, scanners) are left out and said so.

Either may also be a git directory (a bare mirror): files are then read with ``git show``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from inspect_bench import build  # noqa: E402

from extauthz.request import Request  # noqa: E402

CRS_FILES = ("930", "931", "932", "934", "941", "942", "944")


class Source:
    """Files of a checkout or of a bare git mirror."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.git = (self.path / "HEAD").exists() and not (self.path / ".git").exists()

    def files(self, under: str, suffix: str) -> list[str]:
        if self.git:
            out = subprocess.run(["git", "-C", str(self.path), "ls-tree", "-r", "--name-only", "HEAD", under],
                                 capture_output=True, text=True, check=True).stdout
            return [line for line in out.splitlines() if line.endswith(suffix)]
        return [str(p.relative_to(self.path)) for p in sorted((self.path / under).rglob(f"*{suffix}"))]

    def read(self, name: str) -> str:
        if self.git:
            return subprocess.run(["git", "-C", str(self.path), "show", f"HEAD:{name}"], capture_output=True,
                                  text=True, check=True).stdout
        return (self.path / name).read_text(errors="replace")


def make(method: str, uri: str, headers: dict[str, str], body: bytes) -> Request:
    path, _, query = uri.partition("?")
    lowered = {k.lower(): str(v) for k, v in headers.items()}
    lowered[":path"] = uri
    return Request(method, "localhost", path or "/", uri, query, lowered, body, False, derived={})


def as_query(value: str) -> Request:
    return make("GET", "/api/items?v=" + quote(value, safe=""), {}, b"")


def as_json(value: str) -> Request:
    return make("POST", "/api/items", {"content-type": "application/json"}, json.dumps({"data": {"v": value}}).encode())


def blocked(inspector: object, request: Request, threshold: int = 5) -> bool:
    verdict = inspector.inspect(request)  # type: ignore[attr-defined]
    return verdict.problem is not None or verdict.score >= threshold


def rate(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.1f}%)" if total else "0/0"


def own_corpus(inspector: object) -> None:
    corpus = ROOT / "tests" / "unit" / "inspection" / "corpus"
    attacks = yaml.safe_load((corpus / "attacks.yaml").read_text())
    benign = yaml.safe_load((corpus / "benign.yaml").read_text())
    print("our corpus (tests/unit/inspection/corpus):")
    for detector, values in attacks.items():
        hits = sum(blocked(inspector, make_req(v)) for v in values for make_req in (as_query, as_json))
        print(f"  detection {detector:10} {rate(hits, 2 * len(values))}")
    queries = [make("GET", "/api/items?" + q, {}, b"") for q in benign["queries"]]
    bodies = [make("POST", "/api/items", {"content-type": "application/json"}, json.dumps(b).encode())
              for b in benign["bodies"]]
    fp = sum(blocked(inspector, r) for r in queries + bodies)
    print(f"  false positives (benign queries and JSON bodies) {rate(fp, len(queries) + len(bodies))}")


def gotestwaf(inspector: object, source: Source) -> None:
    print(f"gotestwaf ({source.path}): each payload as a query parameter and as a JSON field")
    by_set: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    fp = [0, 0]
    unreadable = 0
    for name in source.files("testcases", ".yml"):
        try:
            data = yaml.safe_load(source.read(name)) or {}
        except yaml.YAMLError:  # a few files use escapes YAML does not define
            unreadable += 1
            continue
        payloads = [str(p) for p in data.get("payload") or []]
        benign = "/false-pos/" in name
        set_name = name.split("/")[-2] + "/" + Path(name).stem
        for payload in payloads:
            for make_req in (as_query, as_json):
                result = blocked(inspector, make_req(payload))
                if benign:
                    fp[0] += result
                    fp[1] += 1
                else:
                    by_set[set_name][0] += result
                    by_set[set_name][1] += 1
    total = [sum(v[0] for v in by_set.values()), sum(v[1] for v in by_set.values())]
    for set_name, (hits, count) in sorted(by_set.items()):
        print(f"  detection {set_name:34} {rate(hits, count)}")
    print(f"  detection, all attack sets {rate(*total)}")
    print(f"  false positives (false-pos/texts) {rate(*fp)}; files YAML cannot read: {unreadable}")


def crs_paranoia_levels(source: Source) -> dict[int, int]:
    """rule id -> paranoia level, from the rule files' ``paranoia-level/N`` tags."""
    import re

    levels: dict[int, int] = {}
    for name in source.files("rules", ".conf"):
        text = source.read(name)
        for block in re.split(r"\n(?=SecRule|SecAction)", text):
            rule_id = re.search(r"\bid:(\d+)", block)
            level = re.search(r"paranoia-level/(\d)", block)
            if rule_id and level:
                levels[int(rule_id.group(1))] = int(level.group(1))
    return levels


def crs(inspector: object, source: Source) -> None:
    print(f"CRS regression tests ({source.path}): rule files {', '.join(CRS_FILES)}, requests replayed as described")
    levels = crs_paranoia_levels(source)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for name in source.files("tests/regression/tests", ".yaml"):
        family = Path(name).parent.name.split("-")[1] if "-" in Path(name).parent.name else ""
        if family not in CRS_FILES:
            continue
        try:
            data = yaml.safe_load(source.read(name)) or {}
        except yaml.YAMLError:
            counts[family]["unreadable"] += 1
            continue
        rule_id = data.get("rule_id")
        for test in data.get("tests") or []:
            for stage in test.get("stages") or []:
                given, expected = stage.get("input") or {}, (stage.get("output") or {}).get("log") or {}
                if "encoded_request" in given or not isinstance(given.get("uri", "/"), str):
                    counts[family]["skipped"] += 1
                    continue
                attack = rule_id in (expected.get("expect_ids") or [])
                benign = rule_id in (expected.get("no_expect_ids") or [])
                if not attack and not benign:
                    continue
                data_field = given.get("data") or ""
                body = data_field.encode("utf-8", "replace") if isinstance(data_field, str) else \
                    "".join(map(str, data_field)).encode()
                headers = {str(k): str(v) for k, v in (given.get("headers") or {}).items()}
                if body and not any(k.lower() == "content-type" for k in headers):
                    headers["content-type"] = "application/x-www-form-urlencoded"
                try:
                    request = make(str(given.get("method", "GET")), given.get("uri", "/") or "/", headers, body)
                    result = blocked(inspector, request)
                except Exception as exc:  # a request our view refuses to build is counted apart
                    counts[family][f"error {type(exc).__name__}"] += 1
                    continue
                key = "attack" if attack else "benign"
                counts[family][key] += 1
                counts[family][key + "_blocked"] += result
                if attack:
                    level = f"pl{levels.get(int(rule_id), 0)}"
                    counts[level]["attack"] += 1
                    counts[level]["attack_blocked"] += result
    for family in CRS_FILES:
        c = counts[family]
        print(f"  {family}: detection {rate(c['attack_blocked'], c['attack'])}, "
              f"false positives {rate(c['benign_blocked'], c['benign'])}"
              + (f", skipped {c['skipped']}" if c["skipped"] else ""))
    attack = sum(counts[f]["attack"] for f in CRS_FILES)
    hit = sum(counts[f]["attack_blocked"] for f in CRS_FILES)
    benign = sum(counts[f]["benign"] for f in CRS_FILES)
    fp = sum(counts[f]["benign_blocked"] for f in CRS_FILES)
    print(f"  all: detection {rate(hit, attack)}, 'false positives' {rate(fp, benign)}")
    for level in (1, 2, 3, 4):
        c = counts[f"pl{level}"]
        print(f"  tests of paranoia-level {level} rules: detection {rate(c['attack_blocked'], c['attack'])}")
    print("  (a CRS test that expects its rule not to fire is often an attack meant for another rule:")
    print("   the 'false positives' above are not a false-positive rate; ours and gotestwaf's false-pos set are)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gotestwaf")
    parser.add_argument("--crs")
    parser.add_argument("--sensitivity", type=int, default=1)
    args = parser.parse_args()
    inspector = build({"sensitivity": args.sensitivity})
    print(f"sensitivity {args.sensitivity}, threshold 5 (blocked = refused: score >= 5 or a limit)")
    own_corpus(inspector)
    if args.gotestwaf:
        gotestwaf(inspector, Source(args.gotestwaf))
    if args.crs:
        crs(inspector, Source(args.crs))


if __name__ == "__main__":
    main()
