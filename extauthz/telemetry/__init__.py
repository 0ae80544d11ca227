"""Telemetry: metrics, decision log and tracing, each a plain decision observer."""
