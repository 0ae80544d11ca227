"""Envoy's gRPC Access Log Service on the sidecar's gRPC port: what the upstream answered, joined to
our decisions.

Envoy's ``envoy.access_loggers.http_grpc`` logger opens one long-lived stream per worker thread
(``/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs``) and sends batches of HTTP
entries on it; the sidecar never answers until the stream ends. Each entry is one request's final
line: its ``x-request-id`` (the id of our decision, see extauthz.decision), the status sent to the
client and Envoy's response flags. An entry that nobody waits for (see extauthz.outcomes) costs one
dictionary lookup; only the waited-for ones are read further and delivered.

Why it is safe to expose on the Check port: the service only ever *removes* waiting callbacks and
calls them with a status; it changes no decision by itself. Bounded: a stream is handled one message
at a time as it arrives (gRPC's flow control holds Envoy back meanwhile), each message is at most
``--max-message-bytes``, the event loop is yielded every ``YIELD_EVERY`` entries so a huge batch
cannot stall Checks, and at most ``MAX_STREAMS`` streams are open at once. A message that does not
parse is counted and skipped: the stream, and the decisions, go on.

Messages are decoded with a wire-compatible subset of Envoy's protos (proto/.../accesslog/v3): the
fields left out are skipped by the parser, a quarter cheaper than Envoy's full messages
(bench/README.md, "Access logs").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from extauthz.api.envoy.data.accesslog.v3 import accesslog_pb2
from extauthz.api.envoy.service.accesslog.v3 import als_pb2
from extauthz.outcomes._join import Outcome, OutcomeJoin

__all__ = ["MAX_STREAMS", "SERVICE_NAME", "AccessLogService", "response_flags"]

log = logging.getLogger("extauthz.outcomes")

SERVICE_NAME = "envoy.service.accesslog.v3.AccessLogService"
#: Envoy opens one stream per worker thread and log name; more than this is not an Envoy.
MAX_STREAMS = 64
#: Entries handled between two yields to the event loop (a few hundred microseconds of work).
YIELD_EVERY = 512
#: Entries of these kinds are a request's final line; the others (start, periodic) are not outcomes.
FINAL = frozenset({accesslog_pb2.NotSet, accesslog_pb2.DownstreamEnd})

#: Envoy's short names of its response flags, by field number of ResponseFlags (13, UAEX, is a message).
_SHORT_FLAGS = {
    1: "LH", 2: "UH", 3: "UT", 4: "LR", 5: "UR", 6: "UF", 7: "UC", 8: "UO", 9: "NR", 10: "DI", 11: "FI",
    12: "RL", 13: "UAEX", 14: "RLSE", 15: "DC", 16: "URX", 17: "SI", 18: "IH", 19: "DPE", 20: "UMSDR",
    21: "RFCF", 22: "NFCF", 23: "DT", 24: "UPE", 25: "NC", 26: "OM", 27: "DF", 28: "DR",
}  # fmt: skip
_EMPTY_RESPONSE = als_pb2.StreamAccessLogsResponse().SerializeToString()


def response_flags(flags: accesslog_pb2.ResponseFlags) -> str:
    """Envoy's short form of ``flags`` (``UF,URX``), as its text access logs print them."""
    return ",".join(_SHORT_FLAGS[field.number] for field, _ in flags.ListFields() if field.number in _SHORT_FLAGS)


class AccessLogService:
    """The StreamAccessLogs handler (raw bytes in, parsed here) and its metrics."""

    def __init__(self, join: OutcomeJoin, registry: CollectorRegistry | None = None) -> None:
        self.join = join
        self._open = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False
        #: Streams opened since start: when outcomes expire and none ever opened, Envoy is not sending.
        self.streams_opened = 0
        self._published_drops = 0
        self._warned = False
        registry = registry if registry is not None else CollectorRegistry()
        entries = Counter("extauthz_access_log_entries", "Access-log entries received from Envoy, by what "
                          "became of them (joined to a decision, awaited by nobody, not a final entry, "
                          "awaited too long)", ["result"], registry=registry)
        self._joined = entries.labels("joined")
        self._unjoined = entries.labels("unjoined")
        self._intermediate = entries.labels("intermediate")
        self._late = entries.labels("late")
        self._malformed = Counter("extauthz_access_log_malformed_messages",
                                  "Access-log stream messages that could not be parsed (skipped)", registry=registry)
        self._refused = Counter("extauthz_access_log_refused_streams",
                                f"Access-log streams refused because {MAX_STREAMS} were open", registry=registry)
        self._streams = Gauge("extauthz_access_log_streams", "Open access-log streams from Envoy", registry=registry,
                              multiprocess_mode="livesum")
        self._waiting = Gauge("extauthz_outcomes_waiting", "Decisions waiting for their outcome",
                              registry=registry, multiprocess_mode="livesum")
        self._expired = Counter("extauthz_outcomes_expired", "Decisions whose outcome never came (or came after "
                                "the wait, or was pushed out by newer ones)", registry=registry)

    # --- gRPC -----------------------------------------------------------------------------
    def register(self, server: grpc.aio.Server) -> None:
        handlers = {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(self.stream)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])

    async def stream(self, messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """One Envoy stream, until Envoy ends it (or the sidecar stops)."""
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is stopping")
        if self._open >= MAX_STREAMS:
            self._refused.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_STREAMS} access-log streams")
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._open += 1
        self.streams_opened += 1
        self._streams.inc()
        named = malformed = False
        try:
            async for raw in messages:
                try:
                    message = als_pb2.StreamAccessLogsMessage.FromString(raw)
                except DecodeError:
                    self._malformed.inc()
                    if not malformed:  # once per stream: a stream of garbage must not flood the log
                        log.warning("malformed access-log message (%d bytes) skipped; the metric "
                                    "extauthz_access_log_malformed_messages_total counts the others", len(raw))
                    malformed = True
                    continue
                if not named and message.HasField("identifier"):
                    named = True
                    log.info("access-log stream %r opened", message.identifier.log_name[:200])
                await self.handle(message)
        except asyncio.CancelledError:
            # Envoy never ends its stream; close() does, at shutdown, by cancelling the wait for the
            # next message: answering then completes the call at once (a cancelled handler alone
            # would leave it open until the grace period ran out). Any other cancellation is gRPC's.
            if task is None or not self._closing:
                raise
            task.uncancel()
        finally:
            if task is not None:
                self._tasks.discard(task)
            self._open -= 1
            self._streams.dec()
        return _EMPTY_RESPONSE

    async def handle(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        """Deliver the outcomes of one batch; yields to the loop every YIELD_EVERY entries."""
        join = self.join
        joined = unjoined = intermediate = late = 0
        for index, entry in enumerate(message.http_logs.log_entry):
            if index and not index % YIELD_EVERY:
                await asyncio.sleep(0)
            request_id = entry.request.request_id
            if request_id not in join:
                unjoined += 1
                continue
            common = entry.common_properties
            if common.access_log_type not in FINAL:
                intermediate += 1
                continue
            outcome = Outcome(request_id, entry.response.response_code.value, response_flags(common.response_flags))
            if join.deliver(outcome):
                joined += 1
            else:
                late += 1
        for counter, count in ((self._joined, joined), (self._unjoined, unjoined),
                               (self._intermediate, intermediate), (self._late, late)):
            if count:
                counter.inc(count)

    # --- life cycle -----------------------------------------------------------------------
    def publish(self) -> None:
        """Every second: expire old expectations, publish the join's size and losses, and say once
        when outcomes are awaited but Envoy never opened a stream (its access log is not configured)."""
        join = self.join
        join.expire()
        self._waiting.set(len(join))
        dropped = join.dropped
        if dropped > self._published_drops:
            self._expired.inc(dropped - self._published_drops)
            self._published_drops = dropped
            if not self.streams_opened and not self._warned:
                self._warned = True
                log.warning("outcomes of %d decisions never came: no access-log stream has connected. Configure "
                            "Envoy's http_grpc access log to this sidecar (deploy/envoy/envoy.yaml), or start with "
                            "--access-logs off", dropped)

    def close(self) -> None:
        """End every stream now, answering OK (at shutdown): they never end by themselves and would
        hold the server's grace period. Envoy reconnects to whichever sidecar serves next."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
