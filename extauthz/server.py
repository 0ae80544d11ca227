"""The sidecar process: gRPC Check service, gRPC health, HTTP probes and metrics, policy watching."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST

from extauthz import client_ip
from extauthz.api.envoy.service.auth.v3 import external_auth_pb2
from extauthz.decision import Authorizer, Decision
from extauthz.detection import admin
from extauthz.detection.admin import AdminToken
from extauthz.openapi.inventory import Inventory, merge_snapshots
from extauthz.outcomes import outcomes_for
from extauthz.outcomes.access_log_service import AccessLogService
from extauthz.policy import PolicyLoader, PolicySet, PolicySetError, PolicyWatcher, Services
from extauthz.responses import DYNAMIC_METADATA_MODES, check_response_bytes
from extauthz.telemetry import metrics as process_metrics
from extauthz.telemetry.decision_log import DecisionLog, DecisionLogConfig
from extauthz.telemetry.metrics import Metrics, multiprocess_dir
from extauthz.telemetry.tracing import SubjectHasher, subject_hash_key
from extauthz.wire.http_authz import HttpAuthzLimits, HttpAuthzServer

__all__ = ["Settings", "Sidecar", "StartupError", "check_listeners", "serve"]

log = logging.getLogger("extauthz.server")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"


@dataclass(slots=True)
class Settings:
    policies: Path
    #: gRPC listen address; "" serves no gRPC (then ``http_authz_listen`` is required).
    listen: str = "127.0.0.1:9191"
    #: Extra gRPC listen address, e.g. "unix:/run/extauthz.sock".
    unix_socket: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8282
    max_message_bytes: int = 16 * 1024 * 1024
    check_timeout: float = 0.4
    reload_interval: float = 1.0
    #: Seconds in-flight checks get to finish after SIGTERM.
    grace: float = 10.0
    redis_url: str | None = None
    #: File holding the Redis password (a mounted Secret); re-read when it changes.
    redis_password_file: str | None = None
    #: Proxies in front of Envoy whose x-forwarded-for entries are trusted (``source.client_ip``).
    xff_trusted_hops: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: Decision log; None (the default for embedded use) logs nothing. ``extauthz serve`` logs to stdout.
    decision_log: DecisionLogConfig | None = None
    #: A telemetry.tracing.Tracing (from OTEL_* variables), or None for no tracing at all.
    tracing: Any = None
    #: Share the gRPC and HTTP ports with sibling worker processes (SO_REUSEPORT; ``--workers``).
    reuse_port: bool = False
    #: Which decisions carry dynamic metadata to Envoy: "deny" (denials and dry-run), "all" or "off"
    #: (see extauthz.responses).
    dynamic_metadata: str = "deny"
    #: Serve Envoy's gRPC Access Log Service on the gRPC port, so checks learn what the upstream
    #: answered (extauthz.outcomes); False tells them no outcomes will come.
    access_logs: bool = True
    #: File with the bearer token of the admin endpoint on the probes port (/admin/blocks); none: no endpoint.
    admin_token_file: str | None = None
    #: Envoy's HTTP ext_authz protocol on "HOST:PORT" (extauthz.wire.http_authz); None: off.
    http_authz_listen: str | None = None
    #: The http_service's path_prefix, stripped from every request path ("" for none).
    http_authz_path_prefix: str = ""
    #: Connection limits of the HTTP ext_authz port (an extauthz.wire.http_authz.HttpAuthzLimits), or None.
    http_authz_limits: Any = None

    def __post_init__(self) -> None:
        if self.dynamic_metadata not in DYNAMIC_METADATA_MODES:
            raise ValueError(f"dynamic_metadata must be one of {', '.join(DYNAMIC_METADATA_MODES)}, "
                             f"not {self.dynamic_metadata!r}")
        if not self.listen and not self.unix_socket and not self.http_authz_listen:
            raise ValueError("nothing to serve: no gRPC listener and no HTTP ext_authz listener")
        prefix = self.http_authz_path_prefix
        if prefix and (not prefix.startswith("/") or prefix.endswith("/") or "?" in prefix or "#" in prefix):
            raise ValueError(f"http_authz_path_prefix must start with '/' and not end with one: {prefix!r}")

    @property
    def http_only(self) -> bool:
        """Only Envoy's HTTP protocol is served: policies may not read what only gRPC sends."""
        return not self.listen and not self.unix_socket


class StartupError(Exception):
    """The sidecar cannot start as configured (a port in use, a folder missing): one line, exit 2."""


def _why(exc: OSError) -> str:
    """An OSError as the end of a one-line startup message: "address already in use"."""
    return (exc.strerror or str(exc)).lower()


def _listen_problem(address: str, reuse_port: bool) -> str | None:
    """Why gRPC would fail to listen on ``address`` ("host:port", "[v6]:port", "unix:PATH"), or None.

    Asked before gRPC binds, because gRPC's own failure is a bare "Failed to bind" after a log line
    of its C core on stderr. Binding a socket the way gRPC does (SO_REUSEADDR) and closing it at once
    finds a port in use, an address this machine does not have, or a name that does not resolve.
    """
    if address.startswith("unix-abstract:"):
        return None
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:").removeprefix("//"))
        if not path.parent.is_dir():
            return f"folder {path.parent} does not exist"
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(str(path))
                except OSError as exc:
                    return _why(exc)
            path.unlink(missing_ok=True)
            return None
        except OSError as exc:
            return _why(exc)
        return None if stat.S_ISSOCK(mode) else f"{path} exists and is not a socket"
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:
        return f"cannot resolve {host!r} ({getattr(exc, 'strerror', None) or exc})"
    problem = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                problem = problem or _why(exc)
                continue
        return None  # gRPC listens when one resolved address can be bound
    return problem


def check_listeners(listen: str, unix_socket: str | None, http_host: str, http_port: int, *,
                    reuse_port: bool, http_authz: str | None = None) -> None:
    """Raise StartupError when a listener cannot be opened (a port in use, a name that does not
    resolve, a socket folder missing). Called before the policies load, so that its line is the
    only one on stderr; a failure at the real bind a moment later is still caught."""
    host = f"[{http_host}]" if ":" in http_host else http_host
    listeners = [("--listen", listen, listen), ("--unix-socket", unix_socket, unix_socket),
                 ("--http-host/--http-port", f"{http_host} {http_port}", f"{host}:{http_port}"),
                 ("--http-authz-listen", http_authz, http_authz)]
    for option, shown, address in listeners:
        problem = _listen_problem(address, reuse_port) if address else None
        if problem is not None:
            raise StartupError(f"{option} {shown}: cannot listen: {problem}")


#: The garbage collector's thresholds in a serving process. Objects that outlive a few allocations
#: (in-flight gRPC calls, span records waiting for the shipper) make every young-generation
#: collection scan thousands of them, and at the default threshold of 700 one ran every few Checks.
#: Ten thousand makes them rarer at no memory cost worth counting (in process with tracing on:
#: 143 -> 41 ms of collections per 51,400 Checks).
GC_THRESHOLDS = (10_000, 20, 20)


def _malformed(decision_id: str) -> Decision:
    return Decision(False, 400, "malformed_request", "CheckRequest could not be parsed", decision_id)


def response_bytes(decision: Decision, metadata: str = "deny") -> bytes:
    """The CheckResponse for ``decision``; one that cannot be encoded is a 503 denial, never an allow."""
    try:
        return check_response_bytes(decision, metadata)
    except (ValueError, UnicodeError) as exc:
        # Text that cannot be encoded (a header value built from request data, or a rule name). The
        # decision log has the decision's policy and rule under its id; the denial carries only fixed
        # text and the id, so it always encodes.
        log.error("decision %s could not be sent (%s); denying with 503", decision.decision_id,
                  type(exc).__name__)  # never the value itself
        return check_response_bytes(Decision(False, 503, "internal_error", "authorization failed",
                                             decision.decision_id), metadata)


class Sidecar:
    """Owns every long-lived part; ``start`` then ``wait_stopped``, or ``stop`` from outside."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = Services(settings={"redis_url": settings.redis_url,
                                           "redis_password_file": settings.redis_password_file,
                                           "access_logs": settings.access_logs, "http_only": settings.http_only,
                                           **settings.extra})
        client_ip.configure(settings.xff_trusted_hops)
        self.metrics = Metrics()
        process_metrics.install(self.metrics)
        self.authorizer = Authorizer(check_timeout=settings.check_timeout)
        self.authorizer.observers.append(self.metrics.observe)
        self.authorizer.stage_observer = self.metrics.stage
        self.tracing = settings.tracing
        if self.tracing is not None:
            self.authorizer.tracer = self.tracing
        self.decision_log: DecisionLog | None = None
        if settings.decision_log is not None and settings.decision_log.active:
            # The log's own subject mode (--decision-log-subject) with the spans' key, so a hash in a
            # log line is the one in the request's span; without tracing, the key from the environment.
            key = self.tracing.subjects.key if self.tracing is not None else subject_hash_key(os.environ)
            try:
                self.decision_log = DecisionLog(settings.decision_log, subjects=SubjectHasher("hash", key),
                                                policies=lambda: self.authorizer.policy_set)
            except OSError as exc:
                raise StartupError(f"--decision-log {settings.decision_log.destination}: cannot open "
                                   f"({exc.strerror or exc})") from None
            self.authorizer.observers.append(self.decision_log.observe)
        #: The API inventory of policies with an openapi section (GET /inventory).
        self.inventory = Inventory(self._openapi_checks)
        self.authorizer.observers.append(self.inventory.observe)
        self.metrics.attach_inventory(self.inventory)
        self._checks_of: tuple[PolicySet | None, dict[str, Any]] = (None, {})
        self._ticks = 0
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.http_server: asyncio.Server | None = None
        self.http_authz: HttpAuthzServer | None = None
        #: Reads the policy folder at start and at every reload, reusing what did not change.
        self.policy_loader = PolicyLoader(settings.policies, self.services)
        self.watcher: PolicyWatcher | None = None
        self.grpc_ports: list[int] = []
        self.serving = False
        self.last_reload: dict[str, Any] = {"ok": True, "errors": []}
        self._stopped = asyncio.Event()
        self._stopping = False
        self._malformed_count = 0
        self._metadata = settings.dynamic_metadata
        self._upstream_headers: tuple[str, ...] = ()
        self.access_logs = (AccessLogService(outcomes_for(self.services), self.metrics.registry)
                            if settings.access_logs else None)
        self.admin_token: AdminToken | None = None
        if settings.admin_token_file:
            try:
                self.admin_token = AdminToken(settings.admin_token_file)
            except (OSError, ValueError) as exc:
                raise StartupError(f"--admin-token-file {settings.admin_token_file}: {exc}") from None
        self.metrics.flush_hooks.append(self._publish_blocks)

    # --- policies -------------------------------------------------------------------------
    def load_initial(self) -> PolicySet:
        """Load the folder at start-up; an invalid set raises PolicySetError (clear error exit)."""
        policy_set = self.policy_loader.load()
        self._install(policy_set)
        return policy_set

    def _install(self, policy_set: PolicySet) -> None:
        self.authorizer.swap(policy_set)
        self.metrics.reloads.labels("success").inc()
        self.metrics.policies.set(len(policy_set.policies))
        self.metrics.generation.set(self.authorizer.generation)
        self.metrics.policy_errors.set(0)
        self.metrics.last_reload.set_to_current_time()
        self.last_reload = {"ok": True, "errors": []}
        if self.settings.http_authz_listen:
            self._note_upstream_headers(policy_set)
        stats = self.policy_loader.last_stats
        if stats is None:
            log.info("policy set generation %d live: %d policies from %d files",
                     self.authorizer.generation, len(policy_set.policies), len(policy_set.files))
        else:
            log.info("policy set generation %d live: %d policies from %d files (%d files read, %d parsed, %d "
                     "policies reused) in %.0f ms", self.authorizer.generation, len(policy_set.policies),
                     len(policy_set.files), stats.read, stats.parsed, stats.reused, stats.seconds * 1000)

    def _note_upstream_headers(self, policy_set: PolicySet) -> None:
        """In Envoy's HTTP mode a header a policy sets reaches the upstream only when the http_service's
        allowed_upstream_headers match it (docs/http-mode.md): say which, when they change."""
        names = tuple(sorted({name for policy in policy_set.policies for name in policy.owned_headers}))
        if names != self._upstream_headers:
            self._upstream_headers = names
            if names:
                log.info("HTTP ext_authz: Envoy's allowed_upstream_headers must match the headers policies set: %s",
                         ", ".join(names))

    async def _on_new_set(self, policy_set: PolicySet) -> None:
        await self._start_services()
        self._install(policy_set)

    def _on_bad_set(self, exc: PolicySetError) -> None:
        self.metrics.reloads.labels("error").inc()
        self.metrics.policy_errors.set(len(exc.errors))
        self.last_reload = {"ok": False, "errors": [str(e) for e in exc.errors]}
        for error in exc.errors:
            log.error("policy set rejected, keeping generation %d: %s", self.authorizer.generation, error)

    async def _start_services(self) -> None:
        for service in self.services.all():
            start = getattr(service, "start", None)
            if start is not None and not getattr(service, "started", False):
                await start()

    def _openapi_checks(self) -> dict[str, Any]:
        """The live set's openapi checks by policy (worked out once per set: runs for every decision)."""
        policy_set = self.authorizer.policy_set
        cached_set, checks = self._checks_of
        if policy_set is not cached_set:
            from extauthz.checks.openapi import openapi_checks

            checks = openapi_checks(policy_set)
            self._checks_of = (policy_set, checks)
        return checks

    async def inventory_report(self) -> dict[str, Any]:
        """This process' inventory, merged with the other workers' latest (``--workers``)."""
        own = self.inventory.snapshot()  # on the event loop: the request path changes it there
        folder = multiprocess_dir()
        if folder is None:
            return own
        others = await asyncio.to_thread(self._other_inventories, Path(folder))
        return merge_snapshots([own, *others]) if others else own

    @staticmethod
    def _other_inventories(folder: Path) -> list[dict[str, Any]]:
        others = []
        for file in folder.glob("inventory-*.json"):
            if file.name == f"inventory-{os.getpid()}.json":
                continue
            try:
                others.append(json.loads(file.read_bytes()))
            except (OSError, ValueError):
                continue  # a worker writing it right now: its next copy is seconds away
        return others

    @staticmethod
    def _write_inventory(snapshot: dict[str, Any]) -> None:
        """Workers share their inventory through files beside the metrics' (read by inventory_report)."""
        folder = multiprocess_dir()
        if folder is None:
            return
        target = Path(folder) / f"inventory-{os.getpid()}.json"
        temporary = target.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(snapshot))
            temporary.replace(target)
        except OSError as exc:
            log.warning("cannot write the inventory for other workers: %s", exc)

    # --- gRPC ------------------------------------------------------------------------------
    async def _check(self, request_bytes: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            message = external_auth_pb2.CheckRequest.FromString(request_bytes)
        except DecodeError:
            self._malformed_count += 1
            self.metrics.malformed.inc()
            log.warning("malformed CheckRequest (%d bytes)", len(request_bytes))
            decision = _malformed(f"malformed-{self._malformed_count}")
            self.authorizer.notify(decision)  # a deny like any other: counted and logged
            return check_response_bytes(decision, self._metadata)
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            decision = await self.authorizer.check(message)
        finally:
            metrics.in_flight -= 1
        return response_bytes(decision, self._metadata)

    async def _start_grpc(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if self.settings.reuse_port else 0),
        ]
        server = grpc.aio.server(options=options)
        handler = grpc.unary_unary_rpc_method_handler(self._check)  # raw bytes in and out
        handlers = {"Check": handler}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])
        # Registered methods are matched inside gRPC's core; generic ones cost a Python lookup per call
        # (about 12 us of the sidecar's CPU per Check, measured through Envoy).
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.access_logs is not None:
            self.access_logs.register(server)
        for option, address in (("--listen", self.settings.listen), ("--unix-socket", self.settings.unix_socket)):
            if address:
                try:
                    port = server.add_insecure_port(address)
                except RuntimeError:  # check_addresses found nothing wrong a moment ago
                    raise StartupError(f"{option} {address}: cannot listen (gRPC could not bind it)") from None
                if option == "--listen":
                    self.grpc_ports = [port]
        await server.start()
        self.grpc_server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s%s", self.settings.listen,
                 f" and {self.settings.unix_socket}" if self.settings.unix_socket else "")

    # --- Envoy's HTTP ext_authz protocol ------------------------------------------------------------
    async def _start_http_authz(self) -> None:
        address = self.settings.http_authz_listen
        if not address:
            return
        limits = self.settings.http_authz_limits or HttpAuthzLimits(max_body_bytes=self.settings.max_message_bytes)
        server = HttpAuthzServer(self.authorizer, path_prefix=self.settings.http_authz_path_prefix,
                                 metadata=self._metadata, limits=limits, metrics=self.metrics)
        host, _, port = address.rpartition(":")
        try:
            await server.start(host.strip("[]"), int(port), reuse_port=self.settings.reuse_port)
        except OSError as exc:
            raise StartupError(f"--http-authz-listen {address}: cannot listen: {_why(exc)}") from None
        self.http_authz = server
        log.info("HTTP ext_authz listening on %s", address)

    # --- HTTP probes and metrics -----------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        policy_set = self.authorizer.policy_set
        ready = self.serving and policy_set is not None
        detail = {
            "ready": ready,
            "serving": self.serving,
            "generation": self.authorizer.generation,
            "policies": len(policy_set.policies) if policy_set else 0,
            "last_reload": self.last_reload,
        }
        return ready, detail

    def _detections(self) -> Any:
        """The detection store, once a policy with detectors made one (None before)."""
        from extauthz.detection import MemoryDetections

        for service in self.services.all():
            if isinstance(service, MemoryDetections) or type(service).__name__ == "RedisDetections":
                return service
        return None

    def _publish_blocks(self) -> None:
        detections = self._detections()
        if detections is not None:
            self.metrics.blocks_active.set(detections.active_blocks())

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            authorization = None
            for _ in range(100):  # drain headers; only the admin endpoint reads one
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
                if header[:14].lower() == b"authorization:":
                    authorization = header[14:].decode("latin-1").strip()
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if len(parts) >= 2 and path.startswith("/admin/"):
                status, ctype, body = await admin.handle(parts[0], path, authorization, self.admin_token,
                                                         self._detections())
            elif len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == "/healthz":
                status, ctype, body = 200, "text/plain", b"ok\n"
            elif path.startswith("/readyz"):
                ready, detail = self.readiness()
                status, ctype = (200 if ready else 503), "application/json"
                body = json.dumps(detail).encode() + b"\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
            elif path == "/inventory":
                report = await self.inventory_report()
                status, ctype, body = 200, "application/json", json.dumps(report).encode() + b"\n"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # --- life cycle ----------------------------------------------------------------------------
    def check_addresses(self) -> None:
        """Raise StartupError when a listener cannot be opened; see check_listeners."""
        settings = self.settings
        check_listeners(settings.listen, settings.unix_socket, settings.http_host, settings.http_port,
                        reuse_port=settings.reuse_port, http_authz=settings.http_authz_listen)

    async def start(self) -> None:
        self.check_addresses()
        if self.authorizer.policy_set is None:
            self.load_initial()
        await self._start_services()
        host, port = self.settings.http_host, self.settings.http_port
        try:
            self.http_server = await asyncio.start_server(self._http, host, port,
                                                          reuse_port=self.settings.reuse_port or None)
        except OSError as exc:
            raise StartupError(f"--http-host/--http-port {host} {port}: cannot listen: {_why(exc)}") from None
        await self._start_http_authz()
        if self.settings.listen or self.settings.unix_socket:
            await self._start_grpc()
        self.serving = True
        self.watcher = PolicyWatcher(self.settings.policies, self.services, self._on_new_set, self._on_bad_set,
                                     interval=self.settings.reload_interval, loader=self.policy_loader)
        self.watcher.mark_loaded()
        self.watcher.start()
        self._publish_metrics()

    def _publish_metrics(self) -> None:
        """Every second, publish the per-Check counts the request path keeps in plain Python."""
        if self._stopping:
            return
        self.metrics.flush()
        if self.access_logs is not None:
            self.access_logs.publish()
        self._ticks += 1
        if self._ticks % 5 == 0 and multiprocess_dir() is not None:
            asyncio.get_running_loop().run_in_executor(None, self._write_inventory, self.inventory.snapshot())
        asyncio.get_running_loop().call_later(1.0, self._publish_metrics)

    async def stop(self) -> None:
        """Stop accepting, let in-flight checks finish (up to the grace period), then close."""
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping: finishing in-flight checks (grace %.1fs)", self.settings.grace)
        await self.health.enter_graceful_shutdown()
        self.serving = False
        await self._close(self.settings.grace)
        log.info("stopped")

    async def abandon_start(self) -> None:
        """Close what a failed ``start`` opened, quietly: it never served, nothing is in flight."""
        self._stopping = True
        await self._close(0)

    async def _close(self, grace: float) -> None:
        if self.access_logs is not None:
            self.access_logs.close()
        closing = []
        if self.http_authz is not None:
            closing.append(self.http_authz.close(grace))
        if self.grpc_server is not None:
            closing.append(self.grpc_server.stop(grace))
        await asyncio.gather(*closing)
        if self.watcher is not None:
            await self.watcher.stop()
        if self.http_server is not None:
            self.http_server.close()
        for service in self.services.all():
            close = getattr(service, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing %r failed", service)
        if multiprocess_dir() is not None:
            await asyncio.to_thread(self._write_inventory, self.inventory.snapshot())
        if self.decision_log is not None:
            await asyncio.to_thread(self.decision_log.close)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        self.metrics.flush()
        if process_metrics.current() is self.metrics:
            process_metrics.install(None)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    sidecar = Sidecar(settings)
    sidecar.check_addresses()
    sidecar.load_initial()
    try:
        await sidecar.start()
    except StartupError:
        await sidecar.abandon_start()
        raise
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(loop.create_task(sidecar.stop())))
    await sidecar.wait_stopped()
