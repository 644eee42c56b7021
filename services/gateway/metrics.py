"""Prometheus metrics of the gateway. Every name here is what dashboards, alerts and the
prometheus-adapter rules in deploy/ may use (a test checks them against a live scrape).

One `GatewayMetrics` per server (own CollectorRegistry): no global state, so several test
servers can run in one process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# seconds; from cheap cached edits (~10 ms) to long optimization jobs (minutes)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# "mapping" is Generate's seed -> w (the mapping network), the counterpart of "invert"
STAGES = ("decode", "align", "invert", "mapping", "edit", "synthesize", "fuse", "paste", "encode")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "faceedit_requests", "gRPC requests finished, by method and status code",
            ["method", "code"], registry=r)
        self.request_latency = Histogram(
            "faceedit_request_latency_seconds", "End-to-end gRPC request latency by method",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_latency = Histogram(
            "faceedit_stage_latency_seconds", "Latency of one pipeline stage of a request",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge(
            "faceedit_inflight_requests", "Requests being served right now by this replica", registry=r)
        self.concurrency_limit = Gauge(
            "faceedit_concurrency_limit", "Configured per-replica concurrency limit", registry=r)
        self.rejected = Counter(
            "faceedit_rejected", "Requests refused with RESOURCE_EXHAUSTED by the concurrency limit", registry=r)
        self.backend_latency = Histogram(
            "faceedit_backend_latency_seconds", "Latency of one backend model call",
            ["backend", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_errors = Counter(
            "faceedit_backend_errors", "Failed backend model calls", ["backend", "model"], registry=r)
        self.cache_hits = Counter(
            "faceedit_inversion_cache_hits", "Inversions served from the per-replica cache", registry=r)
        self.cache_misses = Counter(
            "faceedit_inversion_cache_misses", "Inversions computed by the encoder", registry=r)
        self.backend_ready = Gauge(
            "faceedit_backend_ready", "1 when the backend answers its readiness check", registry=r)


# The names as exposed on /metrics (counters get the `_total` suffix, histograms
# `_bucket/_sum/_count`). Kept as data so deploy/ tests can check dashboards against them.
EXPORTED_METRIC_NAMES = (
    "faceedit_requests_total",
    "faceedit_request_latency_seconds_bucket",
    "faceedit_request_latency_seconds_sum",
    "faceedit_request_latency_seconds_count",
    "faceedit_stage_latency_seconds_bucket",
    "faceedit_stage_latency_seconds_sum",
    "faceedit_stage_latency_seconds_count",
    "faceedit_inflight_requests",
    "faceedit_concurrency_limit",
    "faceedit_rejected_total",
    "faceedit_backend_latency_seconds_bucket",
    "faceedit_backend_latency_seconds_sum",
    "faceedit_backend_latency_seconds_count",
    "faceedit_backend_errors_total",
    "faceedit_inversion_cache_hits_total",
    "faceedit_inversion_cache_misses_total",
    "faceedit_backend_ready",
)
