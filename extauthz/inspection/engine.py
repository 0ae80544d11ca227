"""The inspector: compiled once per policy, run once per request.

One request is inspected in a few passes whatever its size or number of values: the values of each
group (path, query, cookies, body and headers; file names) are joined into one text, the text is
decoded once, and every enabled rule runs in one matcher pass over it (matcher.py: Hyperscan), plus
one over each extra form the text needs (SQL comments removed, shell quoting removed, lookups
resolved) through the rules that read that form. Only when a rule matched are the values decoded
one by one to find where (the location a finding names); a match that spans two values is found to
be in none and dropped there. Scores of the rules that matched add up; at the threshold the request
is refused.

A long text (EARLY_STOP_BYTES) is matched only until the first decisive rule: one that denies alone
wherever it matches. A text written to keep every rule busy at every byte is an attack, and the
denial does not need the rest of it; when the decisive match locates nowhere, everything is matched
again to the end, so the shortcut never turns a denial into an allow.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from extauthz.inspection.decode import (
    Decoded,
    cmd_form_bytes,
    decode,
    lookup_form_bytes,
    lookups_over_budget,
    sql_form_bytes,
)
from extauthz.inspection.matcher import SMALL_TEXT_BYTES, RuleMatcher
from extauthz.inspection.rules import EVASION_RULE, FORMS, SSRF_RULES, Rule
from extauthz.inspection.ssrf import (
    BARE_CANDIDATE_PATTERN,
    CANDIDATE_PATTERN,
    FLOOD,
    METADATA_CANDIDATE_PATTERN,
    AddressAllowList,
    ssrf_findings,
)
from extauthz.inspection.targets import RequestValues, safe_pointer
from extauthz.payload import BodyKind, BodyProblem, JsonLimits, body_view
from extauthz.request import Request

__all__ = ["Exclusion", "Finding", "InspectConfig", "Inspector", "RequestLimits", "Verdict"]

#: Locations recorded per rule, and findings per request: what a denial, a log line and a span can hold.
MAX_LOCATIONS_PER_RULE = 4
MAX_FINDINGS = 16
#: JSON strings and keys a rule is tried on, one by one, to locate what matched the body's text.
MAX_VALUES_LOCATED = 128
_FORM_FUNCTIONS: dict[str, Callable[[bytes], bytes]] = {
    "sql": lambda data: sql_form_bytes(data)[0],
    "cmd": cmd_form_bytes,
    "lookup": lambda data: lookup_form_bytes(data)[0],
}
_CMD_CHARS = (b"'", b'"', b"\\", b"^", b"$")  # "in" on bytes: a C loop (set.isdisjoint(bytes) is not)
_CMD_STARTS = (b";", b"|", b"&", b"`", b"$(", b"${", b"\r")
_SSRF_CANDIDATE = "ssrf-candidate"


def _needs_cmd_form(data: bytes) -> bool:
    """Shell quoting only hides a command that something starts: a separator, a substitution."""
    return any(c in data for c in _CMD_CHARS) and any(c in data for c in _CMD_STARTS)


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    detector: str
    #: Where: "query:q", "body:/items/0/note", "header:user-agent", "path", ... (names made safe).
    location: str
    #: The target kind (path, query, name, header, cookie, body, filename): a bounded metric label.
    kind: str
    score: int
    #: Report-only: recorded, never counted towards a denial.
    reported: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    findings: tuple[Finding, ...] = ()
    #: Sum of the scores of the enforced rules that matched (each rule counted once).
    score: int = 0
    #: A parser or size limit the request broke (denied with its status, whatever the score).
    problem: BodyProblem | None = None
    #: The problem was found by a rule or limit in report mode only.
    problem_reported: bool = False


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_parameters: int = 256
    max_cookies: int = 64
    #: Bytes of one header value.
    max_header_bytes: int = 8192
    json: JsonLimits = field(default_factory=JsonLimits)
    #: "deny": a body Envoy cut is refused (413); "inspect": what arrived is inspected as text.
    partial_body: str = "deny"


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Findings of ``rules`` (ids or detector names; empty: all) on request paths ``paths`` (empty:
    all) at ``locations`` (empty: all) are dropped."""

    rules: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()

    def names(self, rule_id: str, detector: str) -> bool:
        """Whether the exclusion applies to the rule (by id or detector, or to every rule)."""
        return not self.rules or rule_id in self.rules or detector in self.rules

    def drops(self, rule: Rule | str, detector: str, request_path: str, location: str) -> bool:
        rule_id = rule if isinstance(rule, str) else rule.id
        if not self.names(rule_id, detector):
            return False
        if self.paths and not any(_path_matches(p, request_path) for p in self.paths):
            return False
        return not self.locations or any(_location_matches(p, location) for p in self.locations)


def _path_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("/*"):
        return path.startswith(pattern[:-1])
    return path == pattern


def _location_matches(pattern: str, location: str) -> bool:
    if pattern == location:
        return True
    kind, _, name = pattern.partition(":")
    loc_kind, _, loc_name = location.partition(":")
    if kind != loc_kind:
        return False
    if kind == "body" and name.startswith("/"):
        if name.endswith("/**"):
            return loc_name == name[:-3] or loc_name.startswith(name[:-2])
        tokens, loc_tokens = name.split("/"), loc_name.split("/")
        return len(tokens) == len(loc_tokens) and all(t == "*" or t == u for t, u in zip(tokens, loc_tokens,
                                                                                         strict=True))
    return fnmatch.fnmatchcase(loc_name, name)


@dataclass(frozen=True, slots=True)
class InspectConfig:
    rules: tuple[Rule, ...]
    threshold: int = 5
    report_only: bool = False
    #: Rule ids and detector names whose findings are reported, never enforced.
    report: frozenset[str] = frozenset()
    exclusions: tuple[Exclusion, ...] = ()
    ssrf: bool = True
    ssrf_allow: tuple[str, ...] = ()
    #: Bare internal addresses (no scheme) are reported as weak signals from this level on.
    sensitivity: int = 1
    limits: RequestLimits = field(default_factory=RequestLimits)
    inspect_body: bool = True
    inspect_headers: bool = True


class _OutOfBudget(Exception):
    pass


class _RuleSet:
    """Rules compiled into matchers (Hyperscan, RE2 for what it refuses), one per text form: the
    decoded text is matched against every rule, an extra form (SQL comments removed, ...) only
    against the rules that read it. A rule can then only match in a form it reads, and a text that
    is costly for one form's rules costs nothing more for the others."""

    def __init__(self, rules: list[Rule], decisive: frozenset[str]) -> None:
        self.rules = rules
        #: Per form: its rules, their matcher, and the indexes of the decisive ones (see Inspector).
        self.by_form: dict[str, tuple[list[Rule], RuleMatcher, frozenset[int]]] = {}
        for form in ("", *FORMS):
            members = [r for r in rules if not form or form in r.forms]
            if members:
                stops = frozenset(i for i, r in enumerate(members) if r.id in decisive)
                self.by_form[form] = (members, RuleMatcher([r.pattern for r in members]), stops)

    def matched_ids(self, data: bytes, form: str = "", *, early_stop: bool = False) -> tuple[Mapping[str, None], bool]:
        """Ids of the rules reading ``form`` that match ``data`` (UTF-8: see :func:`decode.utf8`), and
        whether the pass stopped at a decisive rule (``early_stop``: then only what matched before
        it is known)."""
        entry = self.by_form.get(form)
        if entry is None or not data:
            return _NONE, False
        members, matcher, stops = entry
        hits, stopped = matcher.matched(data, stops if early_stop else _NO_STOPS)
        # Ordered like the rules (a dict: the order of a denial's rule list must not depend on hashing).
        return (dict.fromkeys(members[i].id for i in sorted(hits)) if hits else _NONE), stopped


_NONE: Mapping[str, None] = MappingProxyType({})
_NO_STOPS: frozenset[int] = frozenset()
#: The key of a large raw text body in the inspector's caches (see _inspect): an object of its own,
#: equal to no value of a request.
_TEXT_BODY: str = object()  # type: ignore[assignment]
#: Texts at least this long are matched with an early stop at the first decisive rule (see Inspector).
EARLY_STOP_BYTES = 16384


class Inspector:
    def __init__(self, config: InspectConfig) -> None:
        self.config = config
        self.by_id = {rule.id: rule for rule in config.rules}
        input_rules = [r for r in config.rules if r.targets & {"path", "query", "name", "cookie", "body", "header"}]
        if config.ssrf:
            # Not a finding: it says the text holds a URL or address worth classifying (see ssrf.py).
            candidates = [CANDIDATE_PATTERN, METADATA_CANDIDATE_PATTERN]
            if config.sensitivity >= 2:
                candidates.append(BARE_CANDIDATE_PATTERN)
            input_rules.append(Rule(_SSRF_CANDIDATE, "ssrf", 1, 0, "(?mi)" + "|".join(candidates),
                                    frozenset({"query", "cookie", "body"})))
        file_rules = [r for r in config.rules if "filename" in r.targets]
        # Rules that decide a denial alone wherever they match: enforced, scored at the threshold,
        # named by no exclusion, read in bodies (a long text is mostly a body: a rule that cannot
        # stand there would stop the pass for nothing). A long text is matched only until the first
        # of them (a text made to keep every rule busy is an attack; finding everything in it is
        # not worth milliseconds).
        # In report mode the same rules stop it (what would be denied is still reported, with the
        # rule that decides); a rule reported on its own never does (it cannot deny, others could).
        def decides(rule_id: str, detector: str, score: int) -> bool:
            return (score >= config.threshold and rule_id not in config.report and detector not in config.report
                    and not any(x.names(rule_id, detector) for x in config.exclusions))

        self.decisive = frozenset(r.id for r in config.rules
                                  if "body" in r.targets and decides(r.id, r.detector, r.score))
        evasion_id, _, evasion_score, _ = EVASION_RULE
        #: Whether a decoding budget running out decides a denial alone (then a long text over a
        #: budget is not matched at all).
        self.evasion_decides = decides(evasion_id, "evasion", evasion_score)
        if self.evasion_decides:
            self.decisive |= {evasion_id}
        self.groups = {
            "inputs": _RuleSet(input_rules, self.decisive),
            "files": _RuleSet(file_rules, self.decisive),
        }
        self.allow = AddressAllowList(config.ssrf_allow) if config.ssrf_allow else None

    # --- per request ---------------------------------------------------------------------------------
    def inspect(self, request: Request) -> Verdict:
        verdict, stopped = self._inspect(request, early_stop=True)
        if stopped and not any(f.rule in self.decisive for f in verdict.findings):
            # The decisive match was not in one value (it spanned two, or nowhere it counts): every
            # rule again, to the end of every text.
            verdict, _ = self._inspect(request, early_stop=False)
        return verdict

    def _inspect(self, request: Request, *, early_stop: bool) -> tuple[Verdict, bool]:
        config = self.config
        problem = self._request_limits(request)
        if problem is not None:
            return Verdict(problem=problem, problem_reported=config.report_only), False
        view = body_view(request) if config.inspect_body else None
        if view is not None:
            problem = view.problem
            if problem is not None and problem.reason == "body_truncated" and config.limits.partial_body == "inspect":
                problem = None
            if problem is None and view.document is not None:
                problem = view.document.problem(config.limits.json)
            if problem is not None:
                if view.document is not None and view.kind is BodyKind.JSON and problem.pointer:
                    problem = BodyProblem(problem.reason, problem.status, problem.message,
                                          safe_pointer(problem.pointer), problem.limit)
                return Verdict(problem=problem, problem_reported=config.report_only), False
        values = RequestValues(request, view, headers=config.inspect_headers)
        hits: dict[str, set[str]] = {}  # rule id -> groups to locate it in
        # Decoded and matched as one text (values joined by line breaks): one pass of each matcher.
        # Locating a match looks only at the kinds its rule targets.
        text = values.inputs_text(body=False)
        if config.inspect_headers:
            text = text + "\n" + values.headers_text()
        raw = values.body_raw
        # A large raw text body is one value: decoded (from its bytes) and matched on its own, so that
        # locating a match in it reuses both instead of doing them again. Its text is never made: the
        # caches hold it under _TEXT_BODY, and locating looks at it through that key. (Its length in
        # bytes, then: a body of up to 4096 characters in more bytes is now apart too.)
        apart = raw is not None and len(raw) > 4096
        body_text: str | None = _TEXT_BODY if apart else values.body_text
        decoded_values: dict[str, Decoded] = {}  # value -> decoded, for locating
        known: dict[tuple[str, str, str], Mapping[str, None]] = {}  # (value, form, group) -> rules matched
        stop = [early_stop, False]  # [stop at a decisive rule, stopped]
        if apart:
            assert raw is not None and body_text is not None
            body = decode(None, raw)
            decoded_values[body_text] = body
            decoded = decode(text)
            seen: dict[str, Mapping[str, None]] = {}
            evasion = self._scan("inputs", body, hits, stop, seen)
            for form, found in seen.items():  # the forms matched to the end (or up to the stop)
                known[(body_text, form, "inputs")] = found
            if not stop[1]:
                for form in FORMS:
                    known.setdefault((body_text, form, "inputs"), _NONE)
                evasion |= self._scan("inputs", decoded, hits, stop)
        else:
            decoded = decode(text + "\n" + body_text if body_text else text)
            evasion = self._scan("inputs", decoded, hits, stop)
        filenames = values.filenames() if view is not None and view.parts and not stop[1] else []
        if filenames:
            evasion |= self._scan("files", decode("\n".join(f.value for f in filenames)), hits, stop)
        ssrf_rules: set[str] = set()
        ssrf_known: dict[str, set[str]] = {}  # value -> SSRF rules, for locating
        if hits.pop(_SSRF_CANDIDATE, None) is not None and not stop[1]:
            ssrf_rules = self._ssrf(decoded.data)
            if apart:  # the large text body apart: its result serves to locate
                body_rules = self._ssrf(decoded_values[_TEXT_BODY].data)
                ssrf_known[_TEXT_BODY] = body_rules - {FLOOD}
                ssrf_rules |= body_rules
            if FLOOD in ssrf_rules:
                ssrf_rules.discard(FLOOD)
                evasion = True
        if not hits and not ssrf_rules and not evasion:
            return Verdict(), stop[1]
        return self._verdict(request, values, hits, ssrf_rules, evasion, decoded_values, known,
                             ssrf_known), stop[1]

    def _request_limits(self, request: Request) -> BodyProblem | None:
        limits = self.config.limits
        raw_query = request.raw_query
        if raw_query and raw_query.count("&") + raw_query.count(";") >= limits.max_parameters:
            count = len([p for p in re.split(r"[&;]", raw_query) if p])
            if count > limits.max_parameters:
                return BodyProblem("request_limit_exceeded", 400,
                                   f"the query has more than {limits.max_parameters} parameters", "query", "parameters")
        cookie = request.headers.get("cookie")
        if cookie and cookie.count(";") >= limits.max_cookies:
            return BodyProblem("request_limit_exceeded", 400, f"more than {limits.max_cookies} cookies", "cookie",
                               "cookies")
        longest = limits.max_header_bytes
        headers = request.headers
        if sum(map(len, headers.values())) <= longest:  # all of them together are within: the usual case
            return None
        for name, value in headers.items():
            if name.startswith(":"):  # the path and authority: Envoy's own limits apply to them
                continue
            if len(value) > longest and len(value.encode("utf-8", "surrogateescape")) > longest:
                return BodyProblem("request_limit_exceeded", 400,
                                   f"a header value is longer than {longest} bytes", f"header:{name}", "header_bytes")
        return None

    def _scan(self, group: str, decoded: Decoded, hits: dict[str, set[str]], stop: list[bool],
              seen: dict[str, Mapping[str, None]] | None = None) -> bool:  # fmt: skip
        """The decoded text and each extra form it needs, each through its matcher; ``seen`` gets
        the rules matched per form. ``stop``: [stop a long text at a decisive rule, it stopped];
        once stopped, no further form is made or matched. Returns whether a decoding budget ran out
        (an evasion)."""
        data = decoded.data
        evasion = decoded.over_budget
        if seen is None and len(data) < SMALL_TEXT_BYTES:
            return self._scan_short(group, data, evasion, hits)
        early = stop[0] and len(data) >= EARLY_STOP_BYTES
        lookups: int | None = None  # data.count(b"${") once counted
        if early and self.evasion_decides:
            over = evasion
            if not over:
                over, lookups = lookups_over_budget(data)
            if over:
                stop[1] = True  # denied as an evasion whatever the rules would find
                return True
        rule_set = self.groups[group]
        for form in ("", *FORMS):
            if form == "":
                form_data = data
            elif form == "sql":  # (without a comment, the text itself: matched no more below)
                form_data, over = sql_form_bytes(data)
                evasion |= over
            elif form == "cmd":
                if not _needs_cmd_form(data):
                    continue
                form_data = cmd_form_bytes(data)
            else:
                form_data, over = lookup_form_bytes(data, lookups)
                evasion |= over
            if form and form_data == data:  # the form changed nothing: the decoded text's matches
                found = seen.get("", _NONE) if seen is not None else _NONE
            else:
                found, stopped = rule_set.matched_ids(form_data, form, early_stop=early)
                stop[1] |= stopped
            if seen is not None:
                seen[form] = found
            for rule_id in found:
                hits.setdefault(rule_id, set()).add(group)
            if stop[1]:
                break
        return evasion

    def _scan_short(self, group: str, data: bytes, evasion: bool, hits: dict[str, set[str]]) -> bool:
        """:meth:`_scan` of a short text: the forms it needs joined to it, for one call of every rule
        (a call costs more than the few bytes it reads). A rule that matched only in a form it does
        not read is dropped when located (which reads each form through its own rules)."""
        forms = [data]
        if b"/*" in data:
            without_comments, over = sql_form_bytes(data)
            evasion |= over
            forms.append(without_comments)
        if _needs_cmd_form(data):
            forms.append(cmd_form_bytes(data))
        if b"${" in data:
            looked_up, over = lookup_form_bytes(data)
            evasion |= over
            forms.append(looked_up)
        found, _ = self.groups[group].matched_ids(b"\n".join(forms) if len(forms) > 1 else data)
        for rule_id in found:
            hits.setdefault(rule_id, set()).add(group)
        return evasion

    def _ssrf(self, data: bytes) -> set[str]:
        if self.config.sensitivity >= 2:
            bare = True
        else:  # at level 1 a bare address (no scheme) counts only when it is a metadata endpoint
            bare = b"169.254.1" in data or b"100.100.100.200" in data or b"fd00:ec2:" in data.lower()
        found = ssrf_findings(data, self.allow, bare=bare)
        if self.config.sensitivity < 2:
            found.discard("ssrf-bare-internal-address")
        return found

    # --- when something matched: where, exclusions, scores ------------------------------------------------
    def _verdict(self, request: Request, values: RequestValues, hits: dict[str, set[str]], ssrf_rules: set[str],
                 evasion: bool, decoded: dict[str, Decoded],
                 matched_in: dict[tuple[str, str, str], Mapping[str, None]],
                 ssrf_of: dict[str, set[str]]) -> Verdict:  # fmt: skip
        forms_of: dict[tuple[str, str], bytes] = {}

        def decoded_of(value: str) -> Decoded:
            done = decoded.get(value)
            if done is None:
                done = decoded[value] = decode(value)
            return done

        def form_of(value: str, form: str) -> bytes:
            key = (value, form)
            done = forms_of.get(key)
            if done is None:
                done = forms_of[key] = _FORM_FUNCTIONS[form](form_of(value, "")) if form else decoded_of(value).data
            return done

        # Which rules match one value in one form, each value scanned once whatever the number of
        # rules to locate (one matcher pass gives them all).
        def rules_in(value: str, form: str, group: str) -> Mapping[str, None]:
            key = (value, form, group)
            found = matched_in.get(key)
            if found is None:
                data = form_of(value, form)
                if form and data == form_of(value, ""):  # the form changed nothing
                    found = rules_in(value, "", group)
                else:
                    found, _ = self.groups[group].matched_ids(data, form)
                matched_in[key] = found
            return found

        # A large raw text body was decoded and matched under _TEXT_BODY (see _inspect).
        text_body = _TEXT_BODY in decoded
        findings: list[Finding] = []
        for rule_id, groups in hits.items():
            rule = self.by_id[rule_id]
            forms = ("", *sorted(rule.forms))

            def matches(value: str, kind: str, rule_id: str = rule_id, forms: tuple[str, ...] = forms) -> bool:
                group = "files" if kind == "filename" else "inputs"
                return any(rule_id in rules_in(value, form, group) for form in forms)

            kinds = rule.targets
            if "files" not in groups:
                kinds = kinds - {"filename"}
            if "inputs" not in groups:
                kinds = kinds & {"filename"}
            located = self._locate(values, kinds, matches, text_body)
            self._add(findings, request, rule.id, rule.detector, rule.score, located)

        def ssrf_rules_of(value: str) -> set[str]:
            found = ssrf_of.get(value)
            if found is None:
                found = ssrf_of[value] = self._ssrf(decoded_of(value).data) - {FLOOD}
            return found

        for rule_id in sorted(ssrf_rules):
            def has_rule(value: str, kind: str, rule_id: str = rule_id) -> bool:
                return rule_id in ssrf_rules_of(value)

            _, score, _ = SSRF_RULES[rule_id]
            located = self._locate(values, frozenset({"path", "query", "cookie", "body"}), has_rule, text_body)
            self._add(findings, request, rule_id, "ssrf", score, located)
        if evasion:
            rule_id, _, score, _ = EVASION_RULE
            self._add(findings, request, rule_id, "evasion", score, [("body", "request")])
        score = sum({f.rule: f.score for f in findings if not f.reported}.values())
        return Verdict(tuple(findings[:MAX_FINDINGS]), score)

    def _locate(self, values: RequestValues, kinds: frozenset[str], matches: Callable[[str, str], bool],
                text_body: bool = False) -> list[tuple[str, str]]:  # fmt: skip
        located: list[tuple[str, str]] = []
        for fld in values.fields(kinds, text_body=not text_body):
            if matches(fld.value, fld.kind):
                located.append((fld.kind, fld.location))
                if len(located) >= MAX_LOCATIONS_PER_RULE:
                    return located
        if text_body and "body" in kinds and matches(_TEXT_BODY, "body"):  # the last value fields() gives
            located.append(("body", "body"))
            return located
        view = values.view
        if "body" in kinds and view is not None and view.document is not None:
            budget = [MAX_VALUES_LOCATED]

            def bounded(value: str) -> bool:
                budget[0] -= 1
                if budget[0] < 0:
                    raise _OutOfBudget
                return matches(value, "body")

            try:
                for pointer in view.document.find(bounded, keys=True):
                    located.append(("body", "body:" + safe_pointer(pointer)))
                    if len(located) >= MAX_LOCATIONS_PER_RULE:
                        break
            except _OutOfBudget:
                # Too many values to try one by one: the rule matched the body's text, and where
                # exactly is not worth milliseconds. Fail closed: the finding stands, on the body.
                if not located:
                    located.append(("body", "body"))
        return located

    def _add(self, findings: list[Finding], request: Request, rule_id: str, detector: str, score: int,
             located: Iterable[tuple[str, str]]) -> None:  # fmt: skip
        config = self.config
        reported = config.report_only or rule_id in config.report or detector in config.report
        for kind, location in located:
            if any(x.drops(rule_id, detector, request.path, location) for x in config.exclusions):
                continue
            findings.append(Finding(rule_id, detector, location, kind, score, reported))
