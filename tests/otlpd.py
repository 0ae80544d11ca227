"""An OTLP trace receiver for tests: the TraceService of opentelemetry-proto, served by grpc in a
thread of the test process, so what is checked is exactly what a collector would receive.

    receiver = OtlpReceiver().start()          # on a free port: receiver.endpoint
    receiver.stop(); receiver.start()          # a collector restart on the same port
    receiver.decision_ids()                    # what arrived
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["OtlpReceiver", "attribute_value"]


def attribute_value(value: Any) -> object:
    """The Python value of an OTLP AnyValue."""
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects exported spans as (resource attributes, span) pairs, and the raw requests."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, object], Any]] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        self.port = 0
        self._server: grpc.Server | None = None

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
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

    def of_trace(self, trace_id: str) -> list[tuple[dict[str, object], Any]]:
        with self.lock:
            return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]

    def decision_ids(self) -> set[str]:
        with self.lock:
            return {str(attribute_value(kv.value)) for _, span in self.spans for kv in span.attributes
                    if kv.key == "extauthz.decision_id"}  # fmt: skip
