"""The decision log: one JSON line per decision, so "why was this request denied?" is one grep away.

Every deny (and every dry-run would-deny) is logged, and so is every allow whose attributes hold a
true ``reported`` (a check in report mode found something); other allows are sampled
(``allow_sample``, 0..1).
The request path pays for a random number and a queue put, nothing more: a sampled-out allow costs
no JSON, and formatting and writing happen on a writer thread. When the writer falls behind, lines
are dropped (counted in ``extauthz_decision_log_dropped_total``), never the request delayed.

A line holds what decided and why, and who asked for what, but never a secret: header values only
for names on the allow-list and even then redacted for credential headers, query values only when
asked for and redacted for credential-like parameter names and for values that look like
credentials (a JWT, a long random-looking string).

With ``OTEL_LOGS_EXPORTER=otlp`` (see log_export) the same records also go to an OpenTelemetry
collector as log records, whether or not lines are written too (``--decision-log off`` ships only).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import os
import queue
import random
import re
import select
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from extauthz.decision import Decision
from extauthz.telemetry import metrics
from extauthz.telemetry.tracing import (
    PERSONAL_ATTRIBUTES,
    SubjectHasher,
    is_secret_name,
    parse_trace_ids,
    subject_hash_key,
)

if TYPE_CHECKING:
    from extauthz.policy.compiler import PolicySet
    from extauthz.telemetry.shipper import RecordShipper

__all__ = ["DEFAULT_ALLOW_SAMPLE", "DecisionLog", "DecisionLogConfig", "decision_record"]

log = logging.getLogger("extauthz.decision_log")

#: Fraction of allows logged unless configured otherwise (denies are always logged).
DEFAULT_ALLOW_SAMPLE = 0.01
REDACTED = "[REDACTED]"

#: Headers whose values are credentials: redacted even when on the allow-list.
SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "signature",
    "signature-input", "x-hub-signature", "x-hub-signature-256", "x-amz-security-token", "x-csrf-token",
    "x-xsrf-token", "x-forwarded-client-cert", "x-client-cert", "ssl-client-cert",
})  # fmt: skip
#: Words that make a query parameter's value a credential, matched case-insensitively against the
#: whole name and each of its parts (split at "-", "_", ".", "[" and the like, and where lower case
#: turns upper: ``user_password``, ``access-token``, ``apiKey``, ``X-Amz-Signature``, ``SAMLResponse``).
#: Whole parts, so that ``pin`` is not found in ``shipping``; the longer words of is_secret_name
#: (token, secret, password, signature, credential, session, ...) also count inside a part.
#: Documented in docs/observability.md: keep the two lists the same.
SECRET_PARAMS = frozenset({
    "2fa", "apikey", "assertion", "auth", "authorization", "code", "cookie", "cred", "creds",
    "credential", "credentials", "csrf", "cvc", "cvv", "hmac", "hotp", "jwt", "key", "mac", "mfa", "otp",
    "pass", "passcode", "passphrase", "passwd", "password", "pin", "private", "psk", "pw", "pwd", "saml",
    "secret", "session", "sid", "sig", "signature", "ssn", "ticket", "token", "totp", "xsrf",
})  # fmt: skip
_NAME_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
#: A JSON Web Token (signed or encrypted) anywhere in a value: a base64url JSON header, then dots.
_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9+/=_.~-]+")
_ALNUM_RUNS = re.compile(r"[A-Za-z0-9]{2,}")
#: A value at least this long that looks random (see _looks_random) is redacted whatever its name.
RANDOM_VALUE_MIN_CHARS = 20
_QUERY_MODES = ("none", "names", "full")
_SUBJECT_MODES = ("plain", "hash", "none")


def _secret_header(name: str) -> bool:
    return name in SECRET_HEADERS or is_secret_name(name)


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    if lowered in SECRET_PARAMS or is_secret_name(lowered):
        return True
    return any(part.lower() in SECRET_PARAMS for part in _NAME_PARTS.findall(name))


def _kind(char: str) -> int:
    return 0 if char.isdigit() else (1 if char.islower() else 2)


def _looks_random(value: str) -> bool:
    """Whether a value has the texture of a key, hash or token rather than of words, ids and numbers:

    - at least RANDOM_VALUE_MIN_CHARS characters, only letters, digits and ``+/=_-.~`` (hex, base64,
      base64url, base32), with letters and digits both;
    - at most one character in ten a separator (``+/_-.~``; base64 has one in 32, slugs such as
      ``red-shoes-size-10`` and UUIDs more);
    - the kind of character changing (letter to digit, digit to letter, lower to upper case; not
      upper to lower, which starts every capitalized word) between at least a quarter of the
      neighbouring letters and digits.

    Random hex, base64, base64url and base36 values are caught about 90 times in 100 at 20
    characters and 95 at 32 (upper-case base32, whose kind changes less, about 75); words, slugs,
    UUIDs and numbers are not; CamelCase with digits (``iPhone15ProMax256GB``) may be."""
    body = value.rstrip("=")
    if len(value) < RANDOM_VALUE_MIN_CHARS or _TOKEN_CHARS.fullmatch(value) is None:
        return False
    if not any(c.isdigit() for c in body) or not any(c.isalpha() for c in body):
        return False
    runs = _ALNUM_RUNS.findall(body)
    if (len(body) - sum(map(len, runs))) * 10 > len(body):
        return False
    pairs = changes = 0
    for run in runs:
        for before, after in itertools.pairwise(run):
            pairs += 1
            kinds = _kind(before), _kind(after)
            changes += kinds[0] != kinds[1] and kinds != (2, 1)
    return changes * 4 >= pairs


def _secret_value(value: str) -> bool:
    """A credential by its looks, whatever the parameter is called: a JWT, or a random-looking value."""
    return _JWT_SHAPE.search(value) is not None or _looks_random(value)


@dataclass(frozen=True, slots=True)
class DecisionLogConfig:
    #: "-" for stdout, a file path, or "" / "off" for no decision log.
    destination: str = "-"
    allow_sample: float = DEFAULT_ALLOW_SAMPLE
    #: Lower-case request header names whose values are logged (credential headers stay redacted).
    headers: tuple[str, ...] = ()
    #: "plain", "hash" (keyed HMAC, see EXTAUTHZ_SUBJECT_HASH_KEY) or "none".
    subject: str = "plain"
    #: "names" (parameter names only), "full" (values too, credentials redacted) or "none".
    query: str = "names"
    #: Lines held while the writer catches up; beyond that they are dropped and counted.
    max_pending: int = 10000
    #: Also ship every logged decision as an OpenTelemetry log record over OTLP (the standard
    #: OTEL_LOGS_EXPORTER / OTEL_EXPORTER_OTLP_LOGS_ENDPOINT variables; see log_export).
    otlp: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.allow_sample <= 1.0:
            raise ValueError("decision log allow sample must be between 0 and 1")
        if self.subject not in _SUBJECT_MODES:
            raise ValueError(f"decision log subject must be one of {', '.join(_SUBJECT_MODES)}")
        if self.query not in _QUERY_MODES:
            raise ValueError(f"decision log query must be one of {', '.join(_QUERY_MODES)}")

    @property
    def enabled(self) -> bool:
        """Lines are written to stdout or a file."""
        return self.destination not in ("", "off", "none")

    @property
    def active(self) -> bool:
        """Decisions are logged somewhere: stdout, a file, or an OTLP collector."""
        return self.enabled or self.otlp

    @staticmethod
    def header_list(text: str | Iterable[str]) -> tuple[str, ...]:
        items = text.split(",") if isinstance(text, str) else text
        return tuple(dict.fromkeys(h.strip().lower() for h in items if h.strip()))


def _utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _plain(value: Any) -> Any:
    """An attribute as JSON shows it: numbers and booleans as they are, lists (the layers that ran)
    as lists of strings, anything else as text."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    return str(value)


def decision_record(decision: Decision, when: float, config: DecisionLogConfig,
                    subjects: SubjectHasher | None = None, *, secret_headers: frozenset[str] = frozenset(),
                    secret_params: frozenset[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    """The JSON object logged for one decision. ``secret_headers`` and ``secret_params`` (lower-case)
    are the credential locations the policies configure: redacted like the well-known ones."""
    if decision.allowed:
        outcome = "dry_run_deny" if decision.would_deny else "allow"
    else:
        outcome = "deny"
    request = decision.request
    trace_id, span_id = decision.trace_id, decision.span_id
    if not trace_id and request is not None:
        trace_id, span_id = parse_trace_ids(request.headers)
    record: dict[str, Any] = {
        "time": _utc(when),
        "decision_id": decision.decision_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "decision": outcome,
        "status": decision.status,
        "reason": decision.reason,
        "policy": decision.policy,
        "rule": decision.rule,
        "dry_run": decision.dry_run,
    }
    if not decision.allowed or decision.would_deny:
        record["message"] = decision.message
    identity = decision.identity
    if identity is not None:
        who: dict[str, Any] = {"kind": str(identity.get("kind", "")), "source": str(identity.get("source") or "")}
        subject = str(identity.get("subject") or "")
        if subject and config.subject == "plain":
            who["subject"] = subject
        elif subject and config.subject == "hash" and subjects is not None:
            who.update({k.rsplit(".", 1)[-1]: v for k, v in subjects.attributes(subject).items()})
        record["identity"] = who
    if request is not None:
        record["method"] = request.method
        record["host"] = request.host
        record["path"] = request.path
        if request.raw_query and config.query != "none":
            pairs = parse_qsl(request.raw_query, keep_blank_values=True)
            if config.query == "names":
                record["query_params"] = list(dict.fromkeys(name for name, _ in pairs))
            else:
                record["query"] = {
                    name: REDACTED if name.lower() in secret_params or _secret_param(name) or _secret_value(value)
                    else value
                    for name, value in pairs
                }
        source = request.source  # built once here: the principal is read too
        record["source_address"] = source.address
        if source.principal:
            record["source_principal"] = source.principal
        if config.headers:
            headers = {}
            for name in config.headers:
                value = request.headers.get(name)
                if value is not None:
                    headers[name] = REDACTED if name in secret_headers or _secret_header(name) else value
            record["headers"] = headers
    record["latency_ms"] = round(decision.duration * 1000, 3)
    attributes = decision.attributes
    if attributes:
        record["attributes"] = {name: REDACTED if is_secret_name(name) else _plain(value)
                                for name, value in attributes.items() if name not in PERSONAL_ATTRIBUTES}
        for name in PERSONAL_ATTRIBUTES & attributes.keys():  # like the subject: hash, plain or none
            person = str(attributes[name])
            if config.subject == "plain":
                record["attributes"][name] = person
            elif config.subject == "hash" and subjects is not None:
                for key, digest in subjects.attributes(person).items():
                    record["attributes"][f"{name}_{key.rsplit('.', 1)[-1].removeprefix('subject_')}"] = digest
    return record


_STOP = object()


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _batches(lines: list[bytes], limit: int) -> list[list[bytes]]:
    """``lines`` in runs of at most ``limit`` bytes (a longer line alone: it cannot be kept whole)."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for line in lines:
        if batch and size + len(line) > limit:
            batches.append(batch)
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        batches.append(batch)
    return batches


class DecisionLog:
    """Decision observer writing JSON lines from a background thread, and shipping the same records
    to an OTLP collector when ``config.otlp`` (or ``shipper``) says so."""

    def __init__(self, config: DecisionLogConfig, stream: IO[bytes] | None = None,
                 subjects: SubjectHasher | None = None,
                 policies: Callable[[], PolicySet | None] | None = None,
                 shipper: RecordShipper | None = None) -> None:  # fmt: skip
        self.config = config
        #: Always in hash mode: what the log shows of a subject is config.subject's choice alone.
        self.subjects = subjects if subjects is not None else SubjectHasher("hash", subject_hash_key(os.environ))
        #: The live policy set, for the credential locations it configures (see _secret_names).
        self._policies = policies
        self._seen: PolicySet | None = None
        self._secret_headers: frozenset[str] = frozenset()
        self._secret_params: frozenset[str] = frozenset()
        self._sample = config.allow_sample
        self._random = random.random
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.max_pending)
        # stdout and files are written with os.write on the descriptor, not through Python's buffered
        # stream: a writer blocked on a full pipe then holds no lock that interpreter shutdown needs.
        self._stream = stream
        self._fd: int | None = None
        self._own_fd = False
        #: Where records go over OTLP (log_export.LogShipper), or None.
        self._shipper = shipper
        if shipper is None and config.otlp:
            from extauthz.telemetry.log_export import LogShipper

            self._shipper = LogShipper()
        #: Lines are written (stdout, a file or the stream given), besides any OTLP shipping.
        self._writes = stream is not None or config.enabled
        if stream is None and config.enabled:
            if config.destination == "-":
                self._fd = sys.stdout.fileno()
            else:
                self._fd = os.open(config.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._own_fd = True
        #: Writes to a pipe (stdout under Kubernetes) must hold whole lines of at most PIPE_BUF bytes:
        #: with --workers every worker writes to the same pipe, and only such writes never interleave.
        self._whole_lines_per_write = select.PIPE_BUF if self._fd is not None and _is_pipe(self._fd) else 0
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._write_loop, name="decision-log", daemon=True)
        self._thread.start()

    # --- the request path ------------------------------------------------------------------------
    def observe(self, decision: Decision) -> None:
        if decision.allowed and not decision.would_deny and self._sample < 1.0 and self._random() >= self._sample:
            attributes = decision.attributes
            if not (attributes and attributes.get("reported")):  # a check in report mode found something
                return
        try:
            self._queue.put_nowait((time.time(), decision))
        except queue.Full:
            self._drop(1)

    def _drop(self, lines: int) -> None:
        """Lines lost: the writer fell behind, or the destination refused them (a full disk)."""
        self.dropped += lines
        m = metrics.current()
        if m is not None:
            m.decision_log_dropped.inc(lines)

    # --- the writer thread -----------------------------------------------------------------------
    def _write_loop(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            lines: list[bytes] = []
            stop = False
            taken = 0
            while True:
                if item is _STOP:
                    stop = True
                    break
                taken += 1
                record = self._record(*item)
                if record is not None:
                    if self._shipper is not None:
                        self._shipper.add((int(item[0] * 1e9), record))
                    if self._writes:
                        lines.append(self._line(record, item[1]))
                if taken >= 256:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                batches = _batches(lines, self._whole_lines_per_write) if self._whole_lines_per_write else [lines]
                for batch in batches:
                    try:
                        self._emit(b"".join(batch))
                        self.written += len(batch)
                    except (OSError, ValueError) as exc:
                        if not self.dropped:  # the first loss is worth a line; the counter tells the rest
                            log.error("decision log cannot be written (%s); lines are dropped and counted", exc)
                        self._drop(len(batch))
            if stop:
                return

    def _emit(self, data: bytes) -> None:
        if self._fd is None:
            assert self._stream is not None
            self._stream.write(data)
            self._stream.flush()
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _secret_names(self) -> None:
        """Add the credential locations of a newly loaded policy set. Names are only ever added: a
        line written after a reload may be of a decision made under the set before."""
        policy_set = self._policies() if self._policies is not None else None
        if policy_set is None or policy_set is self._seen:
            return
        self._seen = policy_set
        self._secret_headers |= {name.lower() for name in policy_set.credential_names("header")}
        self._secret_params |= {name.lower() for name in policy_set.credential_names("query")}

    def _record(self, when: float, decision: Decision) -> dict[str, Any] | None:
        try:
            self._secret_names()
            return decision_record(decision, when, self.config, self.subjects,
                                   secret_headers=self._secret_headers, secret_params=self._secret_params)
        except Exception:  # a record that cannot be built must not stop the log
            log.exception("cannot format decision %s", decision.decision_id)
            return None

    def _line(self, record: dict[str, Any], decision: Decision) -> bytes:
        try:
            return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str).encode() + b"\n"
        except Exception:  # a line that cannot be formatted must not stop the log
            log.exception("cannot format decision %s", decision.decision_id)
            return b""

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds in all) and stop the writer."""
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout)
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._own_fd and self._fd is not None and not self._thread.is_alive():
            os.close(self._fd)
            self._fd = None
        if self._shipper is not None:  # after the writer: it ships what was still queued
            self._shipper.shutdown(max(1.0, deadline - time.monotonic()))
