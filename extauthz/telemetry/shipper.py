"""Shipping telemetry records to an exporter process, so the sidecar never encodes protobuf.

The sidecar side: a :class:`RecordShipper` takes records (plain values) on the request path and a
thread marshals batches of them down a pipe to a child process; if the child falls behind or dies,
records are dropped and counted, never the request slowed, and a child that exited (or read nothing
for WRITE_TIMEOUT seconds, then it is killed) is started again (after 1 s, then 2, 4, ... up to 60 s
while it keeps exiting). The child side: :func:`read_batches` reads them, a :class:`Batcher` groups
encoded items into export requests as the standard batch-processor variables say, and an
:class:`EncodedSender` sends the encoded bytes through the SDK's own OTLP exporter (its endpoint,
headers, TLS, retries). The child reports what it could not export on its stdout
(:func:`report_not_exported`), and the sidecar counts it.

Spans (span_export) and decision logs (log_export) are shipped this way, each by its own process.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import marshal
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Batcher", "EncodedSender", "RecordShipper", "read_batches", "report_not_exported"]

log = logging.getLogger("extauthz.telemetry")

_FRAME = struct.Struct("!I")
#: Records held while the child catches up; beyond that new ones are dropped.
MAX_PENDING = 10_000
#: Seconds between batches when records trickle in.
FLUSH_INTERVAL = 0.05
#: Seconds before an exporter process that exited is started again; doubled while it keeps exiting.
RESTART_DELAY, MAX_RESTART_DELAY = 1.0, 60.0
#: Seconds a batch may wait for room in the pipe: an exporter process that reads nothing for this
#: long is stuck, and is killed (then started again like one that exited).
WRITE_TIMEOUT = 10.0


class RecordShipper:
    """Collects records on the request path; a thread ships them to an exporter process.

    The exporter process is started again when it exits (killed, out of memory, a bug): what is
    shipped meanwhile is dropped and counted, and export resumes without restarting the sidecar.
    ``count`` says how many exported items (spans, log records) a list of records stands for, and
    ``on_lost`` is told how many were not exported (dropped here, or reported by the process).
    """

    def __init__(self, argv: list[str], *, what: str, count: Callable[[list[Any]], int] = len,
                 on_lost: Callable[[int], None] = lambda lost: None) -> None:  # fmt: skip
        self._argv = argv
        #: What is shipped, for log lines ("span", "decision log").
        self.what = what
        self._count = count
        self._on_lost = on_lost
        #: Seconds a batch may wait for room in the pipe before the process is deemed stuck.
        self.write_timeout = WRITE_TIMEOUT
        self._proc = self._spawn()
        self._fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        self._restart_delay = RESTART_DELAY
        self._restart_at = 0.0
        self.restarts = 0
        #: Appended on the request path, emptied by the shipping thread: each side's deque operation
        #: is atomic, so neither takes a lock.
        self._pending: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        #: Items dropped here (the exporter process down or behind), shipped to it, and reported
        #: by it as not exported (the collector refused them or did not answer).
        self.dropped = 0
        self.shipped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f"{what.replace(' ', '-')}-shipper", daemon=True)
        self._thread.start()

    # --- the request path ------------------------------------------------------------------------
    def add(self, record: Any) -> None:
        """Queue one record (marshal-able: plain values, tuples, lists and dicts of them)."""
        if len(self._pending) >= MAX_PENDING or self._stopped:
            with self._lock:
                self._drop(self._count([record]))
            return
        self._pending.append(record)

    # --- the shipping thread ---------------------------------------------------------------------
    def _spawn(self) -> subprocess.Popen[bytes]:
        self._started_at = time.monotonic()
        # stdin: the records; stdout: the child's reports of spans it could not export (see main).
        proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        os.set_blocking(proc.stdin.fileno(), False)  # type: ignore[union-attr]  # see _ship
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]  # see _collect_reports
        self._reports = b""
        return proc

    def _collect_reports(self) -> None:
        """Count what the exporter process says it could not export (one number per line)."""
        stdout = self._proc.stdout
        if stdout is None:
            return
        try:
            data = os.read(stdout.fileno(), 65536)
        except (BlockingIOError, OSError, ValueError):  # nothing yet, or closed
            return
        if not data:
            return
        lines = (self._reports + data).split(b"\n")
        self._reports = lines.pop()
        failed = sum(int(line) for line in lines if line.strip().isdigit())
        if failed:
            self.failed += failed
            self._on_lost(failed)

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            stopped = self._stopped
            pending = self._pending
            batch = [pending.popleft() for _ in range(len(pending))]
            self._collect_reports()
            if not stopped and self._proc.poll() is not None and not self._restart():
                if batch:
                    with self._lock:
                        self._drop(self._count(batch))
                continue
            if batch:
                self._ship(batch)
            if stopped:
                return

    def _restart(self) -> bool:
        """Start the exporter process again if it is time; whether one is running now."""
        now = time.monotonic()
        if now < self._restart_at:
            return False
        if now - self._started_at > MAX_RESTART_DELAY:  # it had run well: not "keeps exiting"
            self._restart_delay = RESTART_DELAY
        code = self._proc.returncode
        self._collect_reports()  # what it said before it went
        # Through the file objects, never os.close: they would close the descriptors again when
        # collected, and by then the numbers may be the new pipes'.
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.stdout.close()  # type: ignore[union-attr]
        try:
            self._proc = self._spawn()
        except OSError as exc:
            log.error("%s exporter process could not be started again (%s)", self.what, exc.strerror)
            self._restart_at = now + self._restart_delay
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
            return False
        self._fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        self.restarts += 1
        log.warning("%s exporter process exited (code %s); started again", self.what, code)
        # The next exit, if it comes soon, waits longer: a process that cannot start is not spun.
        self._restart_at = now + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
        return True

    def _ship(self, batch: list[Any]) -> None:
        try:
            payload = marshal.dumps(batch)
        except ValueError:  # cannot happen: records are made of plain values only
            log.error("%s records could not be marshalled; dropping %d", self.what, self._count(batch))
            with self._lock:
                self._drop(self._count(batch))
            return
        data = memoryview(_FRAME.pack(len(payload)) + payload)
        deadline = time.monotonic() + self.write_timeout
        try:
            while data:
                try:
                    written = os.write(self._fd, data)
                except BlockingIOError:  # the pipe is full: wait for room, without the GIL
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.warning("%s exporter process read nothing for %gs; killing it", self.what,
                                    self.write_timeout)
                        self._proc.kill()
                        raise
                    self._collect_reports()  # so the child never waits on its report pipe meanwhile
                    select.select([], [self._fd], [], min(remaining, 1.0))
                    continue
                data = data[written:]
            self.shipped += self._count(batch)
        except OSError as exc:
            log.warning("%s exporter process unavailable (%s); dropping what it was sent", self.what,
                        exc.strerror or type(exc).__name__)
            with self._lock:
                self._drop(self._count(batch))

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._on_lost(count)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ship what is pending, close the pipe, and let the child flush and exit."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        # A record that came while the thread took its last batch: counted, not lost silently.
        left = [self._pending.popleft() for _ in range(len(self._pending))]
        if left:
            with self._lock:
                self._drop(self._count(left))
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]  # closes self._fd: EOF for the child
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._collect_reports()  # what the child said as it flushed
        with contextlib.suppress(OSError):
            self._proc.stdout.close()  # type: ignore[union-attr]


class _RawStub:
    """An OTLP service's Export method on a channel, taking and returning wire bytes: the request is
    already encoded, so parsing it into a message only to serialize it again would be waste."""

    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(self.method)


#: The Export method of each OTLP service, by signal.
_METHODS = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}



class EncodedSender:
    """Sends pre-encoded OTLP export requests through the SDK's own OTLP exporter, so its
    configuration (OTEL_EXPORTER_OTLP_* endpoint, headers, TLS, compression, timeout) and its retry
    rules apply unchanged; only the per-span encoding is ours.

    The gRPC exporter calls ``self._client.Export`` with what ``_translate_data`` makes of its input
    (and counts spans with ``_count_data``), and builds ``_client`` from ``_stub`` and ``_channel``
    (again after a reconnection): for this instance the stub sends bytes as they are, and both hooks
    read our (request bytes, count) pair. The HTTP exporter sends bytes with its client's
    ``export``. :meth:`supports` checks those hooks exist, so an SDK that changed them gets the SDK
    path instead of a broken one.
    """

    _GRPC_HOOKS = ("_export", "_translate_data", "_count_data", "_stub", "_channel", "_client")

    def __init__(self, exporter: Any, signal: str = "traces") -> None:
        self.exporter = exporter
        self.grpc = ".proto.grpc." in type(exporter).__module__
        if self.grpc:
            stub = type("RawStub", (_RawStub,), {"method": _METHODS[signal]})
            exporter._translate_data = lambda pair: pair[0]
            exporter._count_data = lambda pair: pair[1]
            exporter._stub = stub
            exporter._client = stub(exporter._channel)

    @classmethod
    def supports(cls, exporter: Any) -> bool:
        module = type(exporter).__module__
        if ".proto.grpc." in module:
            return all(hasattr(exporter, name) for name in cls._GRPC_HOOKS) and exporter._channel is not None
        if ".proto.http." in module:
            return hasattr(getattr(exporter, "_client", None), "export")
        return False

    def send(self, request: bytes, count: int) -> bool:
        if self.grpc:
            result = self.exporter._export((request, count))
            return getattr(result, "name", "") == "SUCCESS"
        return bool(getattr(self.exporter._client.export(request), "success", False))


_REPORT_LOCK = threading.Lock()


def report_not_exported(items: int) -> None:
    """In an exporter process: tell the sidecar that ``items`` were not exported (it counts them, in
    extauthz_trace_export_errors_total or extauthz_decision_log_export_errors_total), one number
    per line on stdout."""
    if items <= 0:
        return
    with _REPORT_LOCK, contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(b"%d\n" % items)
        sys.stdout.buffer.flush()


class Batcher:
    """The batch processor's job for encoded items (spans, log records): up to ``batch_size`` per
    request, sent when a batch is full or ``delay`` seconds after the first item; at most
    ``queue_size`` waiting (beyond, dropped and reported). Configured by the standard variables of
    the batch span processor (``OTEL_BSP_*``) or the batch log record processor (``OTEL_BLRP_*``)."""

    def __init__(self, encoder: Any, senders: list[EncodedSender], environ: Any, *, prefix: str = "OTEL_BSP_",
                 delay_ms: float = 5000, what: str = "span") -> None:  # fmt: skip
        def number(name: str, default: float) -> float:
            try:
                return float(environ.get(prefix + name, default))
            except ValueError:
                return default

        self.what = what
        self.delay = max(0.001, number("SCHEDULE_DELAY", delay_ms) / 1000)
        self.batch_size = max(1, int(number("MAX_EXPORT_BATCH_SIZE", 512)))
        self.queue_size = max(self.batch_size, int(number("MAX_QUEUE_SIZE", 2048)))
        self.encoder = encoder
        self.senders = senders
        self._spans: list[bytes] = []
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"{what.replace(' ', '-')}-export", daemon=True)
        self._thread.start()

    def add(self, spans: list[bytes]) -> None:
        with self._cond:
            room = self.queue_size - len(self._spans)
            if room < len(spans):
                self.dropped += len(spans) - max(room, 0)
                report_not_exported(len(spans) - max(room, 0))
                spans = spans[: max(room, 0)]
            self._spans += spans
            if len(self._spans) >= self.batch_size:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._spans) < self.batch_size:
                    self._cond.wait(self.delay)
                batch, self._spans = self._spans[: self.batch_size], self._spans[self.batch_size :]
                closed = self._closed and not self._spans
            if batch:
                self._send(batch)
            if closed:
                return

    def _send(self, batch: list[bytes]) -> None:
        request = self.encoder.request(batch)
        for sender in self.senders:
            try:
                sent = sender.send(request, len(batch))
            except Exception:
                log.warning("%s export failed", self.what, exc_info=True)
                sent = False
            if not sent:
                log.warning("%s export of %d items failed", self.what, len(batch))
                report_not_exported(len(batch))

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.dropped:
            log.warning("%d %s items dropped: the exporter could not keep up", self.dropped, self.what)


def read_batches(stream: Any) -> Any:
    """In an exporter process: the lists of records the sidecar writes, until EOF."""
    while True:
        head = stream.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        yield marshal.loads(stream.read(_FRAME.unpack(head)[0]))
