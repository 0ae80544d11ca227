"""OTLP receivers for tests: the TraceService and LogsService of opentelemetry-proto, served by grpc in a
thread of the test process (and /v1/logs over HTTP), so what is checked is exactly what a collector
would receive.

    receiver = OtlpReceiver().start()          # on a free port: receiver.endpoint (traces and logs)
    receiver.stop(); receiver.start()          # a collector restart on the same port
    receiver.decision_ids()                    # the spans that arrived, by decision id
    receiver.log_records                       # [(resource attributes, LogRecord)] that arrived
    http = OtlpHttpReceiver().start()          # OTLP/HTTP: http.endpoint, POST /v1/logs and /v1/traces
"""

from __future__ import annotations

import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["OtlpHttpReceiver", "OtlpReceiver", "attribute_value", "body_value"]


def attribute_value(value: Any) -> object:
    """The Python value of an OTLP AnyValue."""
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


def body_value(value: Any) -> object:
    """The Python value of an OTLP AnyValue, maps and lists included (a log record's body)."""
    which = value.WhichOneof("value")
    if which == "kvlist_value":
        return {kv.key: body_value(kv.value) for kv in value.kvlist_value.values}
    if which == "array_value":
        return [body_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.take_logs(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects exported spans as (resource attributes, span) pairs, log records as (resource
    attributes, LogRecord) pairs, and the raw requests."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, object], Any]] = []
        self.log_records: list[tuple[dict[str, object], Any]] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        self.port = 0
        self._server: grpc.Server | None = None

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.raw.append(request.SerializeToString())
            for resource_spans in request.resource_spans:
                resource = {kv.key: attribute_value(kv.value) for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def take_logs(self, request: Any) -> None:
        with self.lock:
            self.raw.append(request.SerializeToString())
            for resource_logs in request.resource_logs:
                resource = {kv.key: attribute_value(kv.value) for kv in resource_logs.resource.attributes}
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        self.log_records.append((resource, record))

    def of_trace(self, trace_id: str) -> list[tuple[dict[str, object], Any]]:
        with self.lock:
            return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]

    def decision_ids(self) -> set[str]:
        with self.lock:
            return {str(attribute_value(kv.value)) for _, span in self.spans for kv in span.attributes
                    if kv.key == "extauthz.decision_id"}  # fmt: skip

    def decisions(self) -> list[dict[str, object]]:
        """The bodies of the decision log records that arrived, oldest first."""
        with self.lock:
            return [body_value(record.body) for _, record in self.log_records]  # type: ignore[misc]


class OtlpHttpReceiver(OtlpReceiver):
    """The same, over OTLP/HTTP with protobuf bodies (POST /v1/logs and /v1/traces)."""

    def __init__(self) -> None:
        super().__init__()
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OtlpHttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/logs":
                    receiver.take_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body))
                    answer = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
                elif self.path == "/v1/traces":
                    receiver.Export(trace_service_pb2.ExportTraceServiceRequest.FromString(body), None)
                    answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
