"""Every Prometheus metric llmux exports, on one registry per daemon.

Why one module: names and label sets are a public interface (dashboards and
alerts are written against them), so they are defined once, here, with the
llmux 0.7 names where one existed. The switcher never sees a prometheus type:
`Metrics.on_switch_event` is a plain listener for `Switcher.subscribe`, and the
per-model gauges (in flight, queue depth, active model) are read from
`Switcher.status()` when /metrics is scraped, so they can never drift from the
switcher's own bookkeeping.

Works on prometheus-client 0.16 (Debian 12) and current releases.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

#: request latencies: from tens of milliseconds to long generations
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: queue waits and switches: sub-second wakes to cold starts of large models
SWITCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

#: label value for requests that never resolved to a configured model (400, 404):
#: user input must not become a label value (unbounded cardinality)
NO_MODEL = ""

SLEEP_EFFECTIVENESS = "llmux_sleep_effectiveness_ratio"


class Metrics:
    """The metric objects and the few ways llmux updates them."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "llmux_requests_total",
            "Inference requests answered, by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "llmux_request_duration_seconds",
            "Time from request received to last response byte, queue wait included",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "llmux_request_queue_wait_seconds",
            "Time a request waited for its model to be awake (lease acquisition)",
            ["model"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "llmux_request_queue_depth",
            "Requests waiting for the model to be awake",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "llmux_model_in_flight",
            "Requests being served by the model (leases held)",
            ["model"],
            registry=r,
        )
        self.switch_total = Counter(
            "llmux_switch_total",
            "Model switches, by result (ok or failed)",
            ["from", "to", "result"],
            registry=r,
        )
        self.switch_duration = Histogram(
            "llmux_switch_duration_seconds",
            "Whole switch time: cooldown, drain, sleep, wake and readiness",
            ["from", "to"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.switch_phase = Histogram(
            "llmux_switch_phase_seconds",
            "Time spent in each switch phase",
            ["phase", "from", "to"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.active_model = Gauge(
            "llmux_active_model_info",
            "1 for each model that is awake and serving, else 0",
            ["model"],
            registry=r,
        )
        self.backend_exits = Counter(
            "llmux_backend_exits_total",
            "Backends that exited on their own (crash, OOM kill), not stopped by llmux",
            ["model"],
            registry=r,
        )
        self.sleep_effectiveness = Gauge(
            SLEEP_EFFECTIVENESS,
            "Fraction of its GPU memory the model's last sleep freed (verified eviction)",
            ["model"],
            registry=r,
        )
        #: set by the daemon: model -> last measured effectiveness (None: not measurable)
        self.effectiveness_source: Callable[[], Mapping[str, float | None]] | None = None
        #: labelled children of the per-request metrics, by label values (see _child)
        self._requests_total: dict[tuple[str, ...], Any] = {}
        self._request_duration: dict[tuple[str, ...], Any] = {}
        self._queue_wait: dict[tuple[str, ...], Any] = {}

    # -- requests -----------------------------------------------------------

    def observe_request(self, model: str, status: int, duration: float) -> None:
        self._child(self._requests_total, self.requests_total, model, str(status)).inc()
        if model != NO_MODEL:
            self._child(self._request_duration, self.request_duration, model).observe(duration)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self._child(self._queue_wait, self.queue_wait, model).observe(seconds)

    @staticmethod
    def _child(cache: dict[tuple[str, ...], Any], metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: `labels()`
        builds a key and takes a lock on every call, and these run on every
        request. Label values are bounded (configured models, HTTP statuses)."""
        child = cache.get(labels)
        if child is None:
            child = cache[labels] = metric.labels(*labels)
        return child

    # -- switcher -----------------------------------------------------------

    def on_switch_event(self, event: Any) -> None:
        """Listener for `Switcher.subscribe`: count and time finished switches.

        Duck-typed on SwitchFinished's fields so that this module does not
        import the switcher's event types (and never breaks the switcher:
        listener errors are logged, not raised)."""
        try:
            if not hasattr(event, "ok") or not hasattr(event, "duration"):
                return
            src = event.from_model or ""
            dst = event.to_model or ""
            self.switch_total.labels(src, dst, "ok" if event.ok else "failed").inc()
            if event.ok:
                self.switch_duration.labels(src, dst).observe(event.duration)
                for phase, seconds in (event.phases or {}).items():
                    self.switch_phase.labels(phase, src, dst).observe(seconds)
        except Exception:  # noqa: BLE001 - a metrics bug must not break a switch
            log.exception("metrics: could not record switch event %r", event)

    def on_backend_exit(self, model: str, reason: str) -> None:
        """Listener for `Backends.on_unexpected_exit`."""
        self.backend_exits.labels(model).inc()

    def refresh(self, status: Any, models: Iterable[str]) -> None:
        """Set the per-model gauges from a `SwitcherStatus` (called at scrape)."""
        active = set(getattr(status, "active_models", ()) or ())
        per_model = getattr(status, "models", {}) or {}
        for name in models:
            self.active_model.labels(name).set(1 if name in active else 0)
            ms = per_model.get(name)
            self.in_flight.labels(name).set(getattr(ms, "in_flight", 0) or 0)
            self.queue_depth.labels(name).set(getattr(ms, "queue_depth", 0) or 0)
        if self.effectiveness_source is not None:
            for name, ratio in self.effectiveness_source().items():
                if ratio is not None:
                    self.sleep_effectiveness.labels(name).set(ratio)

    # -- exposition ---------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
