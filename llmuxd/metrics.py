"""Every Prometheus metric llmux exports, on one registry per daemon.

Why one module: names and label sets are a public interface (dashboards and
alerts are written against them), so they are defined once, here, with the
llmux 0.7 names where one existed. The switcher never sees a prometheus type:
`Metrics.on_switch_event` is a plain listener for `Switcher.subscribe`, and the
per-model gauges (in flight, queue depth, active model) are read from
`Switcher.status()` when /metrics is scraped, so they can never drift from the
switcher's own bookkeeping.

llmux 0.7's names all exist (README "Metrics" has the table): where ours
mean the same under another name, 0.7's is exported beside it
(`llmux_switches_total`, `llmux_switch_total_seconds`, `llmux_in_flight`,
`llmux_switch_failures_total`); `llmux_requests_total` carries both label
sets, {model,status} (ours) and {model,waited} (0.7's), as one counter with
three labels, since one name cannot have two label sets — queries that sum
by either pair work unchanged.

Works on prometheus-client 0.16 (Debian 12) and current releases.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

#: request latencies: from tens of milliseconds to long generations
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: queue waits and switches: sub-second wakes to cold starts of large models
SWITCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

#: label value for requests that never resolved to a configured model (400, 404):
#: user input must not become a label value (unbounded cardinality)
NO_MODEL = ""

#: a request "waited" when its lease took longer than this (llmux 0.7's definition)
WAITED_THRESHOLD_S = 0.001

SLEEP_EFFECTIVENESS = "llmux_sleep_effectiveness_ratio"


class Metrics:
    """The metric objects and the few ways llmux updates them."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "llmux_requests_total",
            "Inference requests answered, by model, HTTP status, whether they waited for their model "
            "and API key id (empty without keys)",
            ["model", "status", "waited", "key"],
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
            "Model switches, by result: ok, failed, or skipped (nobody waited for it any more)",
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
        # llmux 0.7's names for what the metrics above also count (dashboards built on 0.7)
        self.switches_07 = Counter(
            "llmux_switches_total",
            "Successful switches to a model (llmux 0.7's name; ours is llmux_switch_total, result ok)",
            ["from", "to"],
            registry=r,
        )
        self.switch_seconds_07 = Histogram(
            "llmux_switch_total_seconds",
            "Whole time of successful switches to a model (llmux 0.7's name for llmux_switch_duration_seconds)",
            ["from", "to"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.switch_failures_07 = Counter(
            "llmux_switch_failures_total",
            "Failed switches, by target (llmux 0.7's name; ours is llmux_switch_total, result failed)",
            ["to"],
            registry=r,
        )
        self.in_flight_07 = Gauge(
            "llmux_in_flight",
            "Requests being served by the model (llmux 0.7's name for llmux_model_in_flight)",
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

    def observe_request(self, model: str, status: int, duration: float, waited: bool = False, key: str = "") -> None:
        """`key`: the API key's id (configured ids only, so the label stays bounded)."""
        self._child(self._requests_total, self.requests_total, model, str(status), "true" if waited else "false",
                    key).inc()
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
            skipped = bool(getattr(event, "skipped", False))
            result = "ok" if event.ok else ("skipped" if skipped else "failed")
            self.switch_total.labels(src, dst, result).inc()
            if event.ok:
                self.switch_duration.labels(src, dst).observe(event.duration)
                for phase, seconds in (event.phases or {}).items():
                    self.switch_phase.labels(phase, src, dst).observe(seconds)
                if dst:  # 0.7 counted switches to a model; a plain sleep is none
                    self.switches_07.labels(src, dst).inc()
                    self.switch_seconds_07.labels(src, dst).observe(event.duration)
            elif not skipped:
                self.switch_failures_07.labels(dst).inc()
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
            in_flight = getattr(ms, "in_flight", 0) or 0
            self.in_flight.labels(name).set(in_flight)
            self.in_flight_07.labels(name).set(in_flight)
            self.queue_depth.labels(name).set(getattr(ms, "queue_depth", 0) or 0)
        if self.effectiveness_source is not None:
            for name, ratio in self.effectiveness_source().items():
                if ratio is not None:
                    self.sleep_effectiveness.labels(name).set(ratio)

    # -- exposition ---------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- the fleet signal (llmuxd/http/fleet.py) -----------------------------------

FLEET_MODEL_STATE = "llmux_model_state"
FLEET_WAIT_ESTIMATE = "llmux_model_wait_estimate_seconds"
FLEET_GROUP_BUDGET = "llmux_gpu_group_budget_gib"
FLEET_GROUP_USED = "llmux_gpu_group_used_gib"
FLEET_GROUP_USED_RATIO = "llmux_gpu_group_used_ratio"


class FleetCollector:
    """The fleet signal as gauges, read from `source()` (a `HostSignal` or None) at scrape.

    A collector rather than Gauge objects: every scrape shows the same snapshot that
    `GET /llmux/v1/state` would answer, and a model removed by a reload disappears
    instead of keeping its last value."""

    STATES = ("awake", "starting", "asleep", "failed")

    def __init__(self, source: Callable[[], Any]):
        self.source = source

    def _families(self) -> list:
        return [
            GaugeMetricFamily(FLEET_MODEL_STATE, "1 for the model's fleet state (awake, starting, asleep, failed), else 0",
                              labels=["model", "state"]),
            GaugeMetricFamily(FLEET_WAIT_ESTIMATE, "Seconds until the model would serve a new request (what Retry-After says)",
                              labels=["model"]),
            GaugeMetricFamily(FLEET_GROUP_BUDGET, "The GPU group's memory budget in GiB (absent: one model awake at a time)",
                              labels=["group"]),
            GaugeMetricFamily(FLEET_GROUP_USED, "GiB of the GPU group's budget held by awake models", labels=["group"]),
            GaugeMetricFamily(FLEET_GROUP_USED_RATIO, "Share of the GPU group in use: used/budget, or awake models without a budget",
                              labels=["group"]),
        ]

    def describe(self) -> Iterable[Any]:
        return self._families()

    def collect(self) -> Iterable[Any]:
        state, wait, budget, used, ratio = families = self._families()
        try:
            signal = self.source()
        except Exception:  # noqa: BLE001 - a scrape must not fail on it
            log.exception("metrics: could not read the fleet signal")
            signal = None
        if signal is not None:
            for name, m in sorted(signal.models.items()):
                for s in self.STATES:
                    state.add_metric([name, s], 1.0 if m.state == s else 0.0)
                wait.add_metric([name], m.wait_estimate_s)
            for name, g in sorted(signal.groups.items()):
                if g.budget_gib is not None:
                    budget.add_metric([name], g.budget_gib)
                    used.add_metric([name], g.used_gib or 0.0)
                ratio.add_metric([name], g.used_ratio)
        return families
