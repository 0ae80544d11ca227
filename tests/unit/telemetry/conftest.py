"""Fixtures for the telemetry tests: an in-memory span exporter behind a real TracerProvider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extauthz.telemetry import metrics
from extauthz.telemetry.tracing import SubjectHasher, Tracing, _default_propagator


@pytest.fixture
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(span_exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    """Tracing as configured in production, exporting synchronously to memory."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    yield Tracing(provider, _default_propagator(), SubjectHasher("hash", b"test-key"))
    provider.shutdown()


@pytest.fixture(autouse=True)
def _no_process_metrics() -> Iterator[None]:
    """Each test starts without installed process metrics and leaves none behind."""
    metrics.install(None)
    yield
    metrics.install(None)
