"""Envoy's HTTP ext_authz protocol: one HTTP/1.1 request per authorization, the answer's status is
the decision (docs/http-mode.md).

Why a transport of its own: through one Envoy, an allow-all server on Envoy's HTTP service answered
2.6 times the requests of the same server on the gRPC service; the gRPC stack, not the pipeline, is
most of a Check's cost. So this path is lean: an ``asyncio.Protocol`` fed by httptools (no
StreamReader, no per-request buffering beyond the body), the request view built straight from the
parsed request (extauthz.request.request_from_http, no protobuf), and answers joined from kept
encodings.

The connection is HTTP/1.1 with keep-alive. Pipelined requests are answered in order; each is
decided as it completes, so a slow one delays only the answers behind it on the same connection.
Limits: the request line and headers together, the body, the time a request may take to arrive
(slowloris) and an idle keep-alive connection's life; what breaks one is answered 400/413/431 and
the connection closed. Everything that goes wrong denies: a malformed request is a 400, an answer
that cannot be encoded a 503, a dropped connection an error Envoy turns into a denial
(``status_on_error``) unless its configuration says ``failure_mode_allow``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

import httptools

from extauthz.decision import Authorizer, Decision
from extauthz.request import CLIENT_HEADER, ENVOY_HEADER, HOP_HEADER, HttpParts, header_kind
from extauthz.responses import denial_body, sends_metadata

__all__ = ["HEADERS_TO_REMOVE", "METADATA_HEADERS", "HttpAuthzLimits", "HttpAuthzServer", "http_response_bytes"]

log = logging.getLogger("extauthz.http_authz")

#: The answer header Envoy reads the names of the headers to strip from (comma-separated).
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
#: Dynamic metadata travel as answer headers; Envoy turns those its ``dynamic_metadata_from_headers``
#: matches into metadata of the ext_authz filter, keyed by the header name.
METADATA_HEADERS = {
    "decision_id": "x-extauthz-decision-id",
    "policy": "x-extauthz-policy",
    "rule": "x-extauthz-rule",
    "reason": "x-extauthz-reason",
    "dry_run": "x-extauthz-dry-run",
    "would_deny": "x-extauthz-would-deny",
}


@dataclass(frozen=True, slots=True)
class HttpAuthzLimits:
    """What one connection may send and how long it may take. Envoy stays far inside all of them."""

    #: Request line and headers together, in bytes (Envoy's own default limit is 60 KiB).
    max_header_bytes: int = 64 * 1024
    #: Body bytes (Envoy sends at most its with_request_body.max_request_bytes).
    max_body_bytes: int = 16 * 1024 * 1024
    #: Seconds a request may take to arrive, from its first byte to its last.
    request_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept. Longer than Envoy's cluster idle_timeout
    #: should be (docs/http-mode.md): a connection closed as Envoy reuses it fails that Check.
    idle_timeout: float = 75.0
    #: Pipelined requests of one connection being decided at once; beyond it reading pauses.
    max_pipelined: int = 64


# --- answers ----------------------------------------------------------------------------------------

_FORBIDDEN_IN_VALUE = ("\r", "\n", "\x00")
#: Encoded header lines by (name, value); bounded, long values are not kept.
_kept: dict[tuple[str, str], bytes] = {}
_KEEP_LIMIT, _KEEP_BYTES = 4096, 512


def _line(name: str, value: str, *, keep: bool = True) -> bytes:
    """``name: value\\r\\n``; ValueError for a value that would break the message (CR, LF, NUL).
    Kept for the next answer unless ``keep`` is False (a value new every time: the decision id)."""
    key = (name, value)
    line = _kept.get(key)
    if line is not None:
        return line
    for bad in _FORBIDDEN_IN_VALUE:
        if bad in value or bad in name:
            raise ValueError("header text holds CR, LF or NUL")
    if not name or " " in name or ":" in name:
        raise ValueError("header name is not a token")
    line = f"{name}: {value}\r\n".encode()
    if keep and len(line) <= _KEEP_BYTES:
        if len(_kept) >= _KEEP_LIMIT:
            _kept.clear()
        _kept[key] = line
    return line


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {status: _status_line(status) for status in (200, 400, 401, 403, 404, 413, 429, 431, 500, 503)}
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
_CLOSE = b"connection: close\r\n"
_JSON = b"content-type: application/json\r\n"


def _metadata_lines(decision: Decision) -> list[bytes]:
    lines = [
        _line(METADATA_HEADERS["decision_id"], decision.decision_id, keep=False),
        _line(METADATA_HEADERS["policy"], decision.policy),
        _line(METADATA_HEADERS["rule"], decision.rule),
        _line(METADATA_HEADERS["reason"], decision.reason),
    ]
    if decision.dry_run:
        lines.append(_line(METADATA_HEADERS["dry_run"], "true"))
        lines.append(_line(METADATA_HEADERS["would_deny"], "true" if decision.would_deny else "false"))
    return lines


def _joined(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Client headers with a name given more than once on one line, values joined by ", " (as
    HTTP allows for WWW-Authenticate and the like): Envoy keeps one value per name of an answer."""
    if len(headers) < 2:
        return list(headers)
    merged: dict[str, str] = {}
    for name, value in headers:
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return list(merged.items())


#: Whole answers to allowed requests without metadata, by (upstream, removed, client headers): the
#: same few arrive again and again. Bounded (header values may come from the request).
_allowed: dict[tuple[Any, ...], bytes] = {}
_ALLOWED_LIMIT, _ALLOWED_BYTES = 1024, 2048


def _allowed_answer(decision: Decision) -> bytes:
    """200, the headers to set upstream, the names to strip, the client's headers; the blank line."""
    parts = [_OK]
    for name, value in decision.upstream_headers:
        parts.append(_line(name, value))
    if decision.remove_headers:
        parts.append(_line(HEADERS_TO_REMOVE, ",".join(decision.remove_headers)))
    for name, value in _joined(decision.client_headers):
        parts.append(_line(name, value))
    parts.append(b"\r\n")
    return b"".join(parts)


def http_response_bytes(decision: Decision, metadata: str = "deny", *, head: bool = False,
                        close: bool = False) -> bytes:
    """The answer to Envoy for ``decision``: 200 with the upstream headers to set (and the names to
    strip in x-envoy-auth-headers-to-remove) on allow; the denial's status, headers and JSON body
    otherwise, as the gRPC mode's DeniedHttpResponse. ``head``: the request was HEAD (no body
    follows the headers). ValueError when a header cannot be written (CR/LF/NUL in it)."""
    if decision.allowed:
        if not close and not sends_metadata(decision, metadata):
            key = (decision.upstream_headers, decision.remove_headers, decision.client_headers)
            try:
                kept = _allowed.get(key)
            except TypeError:  # a Decision built with lists: answered, not kept
                return _allowed_answer(decision)
            if kept is None:
                kept = _allowed_answer(decision)
                if len(kept) <= _ALLOWED_BYTES:
                    if len(_allowed) >= _ALLOWED_LIMIT:
                        _allowed.clear()
                    _allowed[key] = kept
            return kept
        parts = [_allowed_answer(decision)[:-2]]  # without the blank line: more headers follow
    else:
        body = denial_body(decision).encode()
        status = decision.status
        parts = [_STATUS_LINES.get(status) or _status_line(status), _JSON,
                 b"content-length: %d\r\n" % len(body)]
        for name, value in _joined(decision.client_headers):
            parts.append(_line(name, value))
    if sends_metadata(decision, metadata):
        parts += _metadata_lines(decision)
    if close:
        parts.append(_CLOSE)
    parts.append(b"\r\n")
    if not decision.allowed and not head:
        parts.append(body)
    return b"".join(parts)


def _failure(status: int, reason: str, message: str) -> bytes:
    """A fixed answer for a request the pipeline never saw (the connection closes after it)."""
    return http_response_bytes(Decision(False, status, reason, message, ""), "off", close=True)


_INTERNAL_ERROR = _failure(503, "internal_error", "authorization failed")


#: Header names as sent -> (lower-case name, header_kind): the same few names arrive with every
#: request. Bounded: cleared when full.
_NAMES: dict[bytes, tuple[str, int]] = {}
_NAMES_LIMIT = 1024


def _name(name: bytes) -> tuple[str, int]:
    key = name.decode("latin-1").lower()
    known = (key, header_kind(key))
    if len(_NAMES) >= _NAMES_LIMIT:
        _NAMES.clear()
    _NAMES[name] = known
    return known


if (CLIENT_HEADER, ENVOY_HEADER, HOP_HEADER) != (0, 1, 2):  # _Connection.into is indexed by them
    raise ImportError("extauthz.request's header kinds are no longer 0, 1, 2")

_METHODS = {name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_NOTHING: Any = MappingProxyType({})


# --- the server ---------------------------------------------------------------------------------------

class _Resume:
    """Awaits a coroutine that already ran up to its first suspension (see on_message_complete)."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # the Task's cancellation goes on to the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value


class _TooLarge(Exception):
    pass


class HttpAuthzServer:
    """The HTTP ext_authz listener. ``start`` binds; ``close`` stops accepting and, after in-flight
    answers are written (up to ``grace``), closes every connection."""

    def __init__(self, authorizer: Authorizer, *, path_prefix: str = "", metadata: str = "deny",
                 limits: HttpAuthzLimits | None = None, metrics: Any = None) -> None:
        self.authorizer = authorizer
        self.path_prefix = path_prefix
        self.metadata = metadata
        self.limits = limits or HttpAuthzLimits()
        #: extauthz.telemetry.metrics.Metrics (in_flight, malformed), or None.
        self.metrics = metrics
        self._refused = 0
        self.connections: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port,
                                               reuse_port=reuse_port or None)
        self.port = self.server.sockets[0].getsockname()[1]
        self._sweeper = loop.call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        """Close connections past their deadline (a request arriving too slowly, an idle keep-alive)."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for connection in [c for c in self.connections if c.deadline and c.deadline < now]:
            connection.expire()
        self._sweeper = loop.call_later(1.0, self._sweep)

    def eager(self) -> bool:
        """Whether to decide inline, in the callback that parsed the request: always. A decision
        that may wait on I/O leaves the callback for a Task before its first wait (the deadline
        watch needs one, see extauthz.deadlines), so it costs a Task only to the policies that may
        wait, never to the rest of the set. (A method so tests can send every decision to a Task.)"""
        return True

    async def answer(self, parts: HttpParts, head: bool, close: bool) -> bytes:
        """Decide in a Task of its own (some policy of the live set may wait on I/O)."""
        return await self._answer(self.authorizer.check_http(parts, self.path_prefix), head, close)

    def finish(self, coro: Coroutine[Any, Any, Decision], yielded: Any, head: bool,
               close: bool) -> Coroutine[Any, Any, bytes]:
        """Carry on a decision that suspended while being made inline (see _Connection.on_message_complete)."""
        return self._answer(_Resume(coro, yielded), head, close)

    async def _answer(self, deciding: Awaitable[Decision], head: bool, close: bool) -> bytes:
        """Await the decision, counted in flight meanwhile, and encode it."""
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight += 1
        try:
            decision = await deciding
        finally:
            if metrics is not None:
                metrics.in_flight -= 1
        return self.encode(decision, head, close)

    def first_step(self, parts: HttpParts) -> tuple[Coroutine[Any, Any, Decision], Any]:
        """Start deciding inline: StopIteration carries the decision when it needed no wait, else
        the coroutine and what it waits on are returned. Run in the request's own context."""
        coro = self.authorizer.check_http(parts, self.path_prefix)
        return coro, coro.send(None)

    def encode(self, decision: Decision, head: bool, close: bool) -> bytes:
        """The answer's bytes; a decision that cannot be written is a 503 denial, never an allow."""
        try:
            return http_response_bytes(decision, self.metadata, head=head, close=close)
        except (ValueError, UnicodeError) as exc:
            log.error("decision %s could not be sent (%s); denying with 503", decision.decision_id,
                      type(exc).__name__)  # never the value itself
            denial = Decision(False, 503, "internal_error", "authorization failed", decision.decision_id)
            return http_response_bytes(denial, self.metadata, head=head, close=close)

    def refused(self, status: int, reason: str, message: str) -> None:
        """A request refused before the pipeline (400/413/431): a denial like any other, counted and logged."""
        self._refused += 1
        if self.metrics is not None:
            self.metrics.malformed.inc()
        self.authorizer.notify(Decision(False, status, reason, message, f"malformed-http-{self._refused}"))

    async def close(self, grace: float) -> None:
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        for connection in list(self.connections):
            connection.stop_reading()
        while any(c.pending for c in self.connections) and loop.time() < until:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()


class _Connection(asyncio.Protocol):
    """One connection from Envoy: httptools calls the ``on_*`` methods as bytes arrive."""

    __slots__ = ("body", "body_size", "closing", "deadline", "envoy", "head_bytes", "headers", "into", "limits",
                 "lines", "loop", "max_head", "parser", "paused", "pending", "raw", "reading", "refusal", "server",
                 "transport", "url", "write_paused")

    def __init__(self, server: HttpAuthzServer) -> None:
        self.server = server
        self.limits = server.limits
        self.max_head = server.limits.max_header_bytes
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Task[bytes] | bytes] = deque()
        self.closing = False
        self.paused = False
        self.write_paused = False
        self.reading = False  # a request has begun and not yet completed
        self.deadline = 0.0
        self.refusal: tuple[int, str, str] | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.envoy: dict[str, str] = {}
        #: Where a header of each header_kind goes: indexed by CLIENT_HEADER, ENVOY_HEADER, HOP_HEADER.
        self.into: tuple[dict[str, str], dict[str, str], None] = (self.headers, self.envoy, None)
        self.lines: dict[str, list[str]] | None = None
        self.raw: dict[str, bytes] | None = None
        self.body: list[bytes] | None = None
        self.body_size = 0
        self.head_bytes = 0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.deadline = self.loop.time() + self.limits.idle_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        for item in self.pending:
            if not isinstance(item, bytes):
                item.cancel()
        self.pending.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = self.loop.time() + self.limits.request_timeout  # Envoy reads its answers
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._idle_deadline()
        self._resume()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except _TooLarge:
            self._refuse(*self.refusal)  # type: ignore[misc]
        except httptools.HttpParserUpgrade:
            # A request with "Connection: upgrade" (a WebSocket handshake Envoy asks about) is judged
            # like any other, then the connection closes (on_message_complete): llhttp stops reading
            # at it and skips a body it declared, so what follows could be that body read as the next
            # request, decided, and its answer taken by Envoy for another request.
            pass
        except (httptools.HttpParserError, UnicodeDecodeError):
            # httptools wraps what a callback raised (its cause is not kept): a limit kept its answer.
            refusal = self.refusal
            self._refuse(*(refusal or (400, "malformed_request", "malformed HTTP request")))

    def eof_received(self) -> bool | None:
        self.closing = True
        if not self.pending:
            return None  # close now
        return True  # half-open: the answers still pending go out, then we close

    def _too_large(self, status: int, reason: str, message: str) -> None:
        self.refusal = (status, reason, message)
        raise _TooLarge(message)

    # --- httptools ---
    def on_message_begin(self) -> None:
        self.reading = True
        self.deadline = self.loop.time() + self.limits.request_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.limits.max_header_bytes:
            self._too_large(431, "headers_too_large", "request line and headers are too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every header of every request: the common case (a name seen before, sent once,
        # UTF-8) in as few steps as it takes; the rest in _header_again and _header_not_text.
        size = self.head_bytes = self.head_bytes + len(name) + len(value)
        if size > self.max_head:
            self._too_large(431, "headers_too_large", "request line and headers are too large")
        key, kind = _NAMES.get(name) or _name(name)
        headers = self.into[kind]
        if headers is None:
            return  # content-length and the like (HOP_HEADER): the parser's business, not the view's
        if key in headers:
            self._header_again(headers, key, value)
            return
        try:
            headers[key] = value.decode()
        except UnicodeDecodeError:
            headers[key] = self._header_not_text(key, value)

    def _header_not_text(self, key: str, value: bytes) -> str:
        """A value that is not UTF-8: kept raw by name, seen as Latin-1 text."""
        if self.raw is None:
            self.raw = {}
        self.raw[key] = value
        return value.decode("latin-1")

    def _header_again(self, headers: dict[str, str], key: str, value: bytes) -> None:
        """A name sent more than once: every line kept, the view's value joined with ","."""
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = self._header_not_text(key, value)
        lines = self.lines
        if lines is None:
            lines = self.lines = {}
        lines.setdefault(key, [headers[key]]).append(text)
        headers[key] = headers[key] + "," + text

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.limits.max_body_bytes:
            self._too_large(413, "body_too_large", "request body is too large")
        if self.body is None:
            self.body = [body]
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return  # pipelined after a "Connection: close" request: never answered
        parser = self.parser
        method_bytes = parser.get_method()
        method = _METHODS.get(method_bytes) or method_bytes.decode("ascii")
        close = not parser.should_keep_alive() or parser.should_upgrade()
        body = self.body
        lines = self.lines
        parts = HttpParts(method, self.url.decode("latin-1"), self.headers,
                          (body[0] if len(body) == 1 else b"".join(body)) if body else b"",
                          self.raw or _NOTHING,  # type: ignore[arg-type]
                          {name: tuple(values) for name, values in lines.items()} if lines else _NOTHING, self.envoy)
        self._reset()
        self.reading = False
        self.deadline = 0.0  # until it is answered, the check timeout bounds the wait, not us
        if close:
            self.closing = True  # nothing after this request is read
        server = self.server
        head = method == "HEAD"
        if not server.eager():
            task = self.loop.create_task(server.answer(parts, head, close))
        else:
            # Most decisions are made without ever suspending: make it now rather than in a Task on
            # the next turn of the loop (in a context of its own, as a Task would). If it does
            # suspend (a policy that may wait moves itself to a Task, see eager), a Task carries it on.
            context = contextvars.copy_context()
            try:
                coro, yielded = context.run(server.first_step, parts)
            except StopIteration as done:
                answer = server.encode(done.value, head, close)
                if self.pending:
                    self.pending.append(answer)
                    self._answered(None)
                else:
                    self._write(answer)  # nothing before it: no queue to go through
                return
            except Exception:
                log.exception("answering an authorization request failed")
                self.pending.append(_INTERNAL_ERROR)
                self.closing = True
                self._answered(None)
                return
            task = self.loop.create_task(server.finish(coro, yielded, head, close), context=context)
        task.add_done_callback(self._answered)
        self.pending.append(task)
        if len(self.pending) >= self.limits.max_pipelined:
            self._pause()

    # --- answers, in request order ---
    def _answered(self, _task: asyncio.Task[bytes] | None) -> None:
        pending = self.pending
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        while pending:
            item = pending[0]
            if isinstance(item, bytes):
                answer = item
            elif not item.done():
                break
            elif item.cancelled() or item.exception() is not None:
                if not item.cancelled():
                    log.error("answering an authorization request failed: %r", item.exception())
                answer = _INTERNAL_ERROR  # fail closed; the connection ends with it
                self.closing = True
            else:
                answer = item.result()
            pending.popleft()
            transport.write(answer)
        if not pending:
            if self.closing:
                transport.close()
                return
            self._idle_deadline()
        if self.paused and len(pending) < self.limits.max_pipelined:
            self._resume()

    def _write(self, answer: bytes) -> None:
        """_answered for an answer with none pending before it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
        if self.closing:
            transport.close()
            return
        self._idle_deadline()
        if self.paused:
            self._resume()

    def _idle_deadline(self) -> None:
        if not self.reading and not self.pending and not self.write_paused:
            self.deadline = self.loop.time() + self.limits.idle_timeout
        elif not self.reading:
            self.deadline = 0.0  # answers being decided: the check timeout bounds them

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer a request that cannot be read (after the answers before it) and close."""
        log.warning("HTTP authorization request refused: %s", message)
        self.server.refused(status, reason, message)
        self.closing = True
        self.pending.append(_failure(status, reason, message))
        self._answered(None)

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and not self.write_paused and self.transport is not None and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    def stop_reading(self) -> None:
        """Shutting down: read no more requests; close once the pending answers are out."""
        self.closing = True
        if self.transport is not None:
            if not self.pending:
                self.transport.close()
            else:
                self._pause()

    def expire(self) -> None:
        """Past the deadline: a request arriving too slowly, or idle too long."""
        if self.reading:
            log.info("HTTP authorization request too slow to arrive; closing its connection")
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
