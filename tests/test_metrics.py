"""The daemon-fed metrics: backend exits and verified-eviction effectiveness."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmuxd.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("model", ""))] = s.value
    return out


def test_backend_exits_are_counted_per_model():
    metrics = Metrics()
    metrics.on_backend_exit("a", "exited with status 1")
    metrics.on_backend_exit("a", "killed by signal 9")
    metrics.on_backend_exit("b", "exited with status 0")
    got = samples(metrics)
    assert got[("llmux_backend_exits_total", "a")] == 2
    assert got[("llmux_backend_exits_total", "b")] == 1


def test_sleep_effectiveness_follows_its_source_and_skips_unmeasured_models():
    metrics = Metrics()
    measured = {"a": 0.875, "b": None}
    metrics.effectiveness_source = lambda: measured
    status = SimpleNamespace(active_models=[], models={})
    metrics.refresh(status, ["a", "b"])
    got = samples(metrics)
    assert got[("llmux_sleep_effectiveness_ratio", "a")] == 0.875
    assert ("llmux_sleep_effectiveness_ratio", "b") not in got
    measured["a"] = 0.1
    metrics.refresh(status, ["a", "b"])
    assert samples(metrics)[("llmux_sleep_effectiveness_ratio", "a")] == 0.1


def series(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_llmux_07_metric_names_are_exported_beside_ours():
    """Dashboards built on llmux 0.7 (A.7 of the reference) find every name, with 0.7's labels."""
    from llmuxd.events import SwitchFinished

    metrics = Metrics()
    metrics.on_switch_event(SwitchFinished("default", None, "a", True, 3.0, {"wake": 3.0}))
    metrics.on_switch_event(SwitchFinished("default", "a", "b", True, 2.0, {"cooldown": 0.5, "drain": 0.0,
                                                                              "sleep": 0.5, "wake": 1.0}))
    metrics.on_switch_event(SwitchFinished("default", "b", "a", False, 1.0, {}, error="wake failed"))
    metrics.on_switch_event(SwitchFinished("default", "b", "a", False, 0.1, {}, skipped=True))
    metrics.on_switch_event(SwitchFinished("default", "b", None, True, 0.5, {"sleep": 0.5}))  # a plain sleep
    metrics.observe_request("a", 200, 0.2, waited=True)
    metrics.observe_request("a", 200, 0.1)
    metrics.observe_request("a", 504, 300.0, waited=True)
    metrics.refresh(SimpleNamespace(active_models=["b"], models={"b": SimpleNamespace(in_flight=3, queue_depth=1)}),
                    ["a", "b"])
    got = series(metrics)

    def value(name, **labels):
        return got[(name, tuple(sorted(labels.items())))]

    assert value("llmux_switches_total", **{"from": "", "to": "a"}) == 1  # 0.7: from "" on a cold start
    assert value("llmux_switches_total", **{"from": "a", "to": "b"}) == 1
    assert ("llmux_switches_total", (("from", "b"), ("to", ""))) not in got  # a sleep is no switch
    assert value("llmux_switch_total_seconds_count", **{"from": "a", "to": "b"}) == 1
    assert value("llmux_switch_total_seconds_sum", **{"from": "a", "to": "b"}) == 2.0
    assert value("llmux_switch_failures_total", to="a") == 1  # the skipped switch is no failure
    assert value("llmux_switch_phase_seconds_count", phase="cooldown", **{"from": "a", "to": "b"}) == 1
    assert value("llmux_in_flight", model="b") == 3 and value("llmux_in_flight", model="a") == 0
    assert value("llmux_active_model_info", model="b") == 1
    # one counter, both label sets: 0.7's {model, waited} and ours {model, status} each sum right
    requests = {labels: v for (name, labels), v in got.items() if name == "llmux_requests_total"}
    assert sum(v for labels, v in requests.items() if ("waited", "true") in labels) == 2
    assert sum(v for labels, v in requests.items() if ("waited", "false") in labels) == 1
    assert sum(v for labels, v in requests.items() if ("status", "200") in labels) == 2
    # ours, alongside
    assert value("llmux_switch_total", result="skipped", **{"from": "b", "to": "a"}) == 1
    assert value("llmux_switch_total", result="failed", **{"from": "b", "to": "a"}) == 1
    assert value("llmux_model_in_flight", model="b") == 3


def test_07_http_metrics_buckets_are_cumulative_and_inclusive():
    """llmux 0.7's HTTP metrics (metrics.HttpStats): le is inclusive, buckets cumulative."""
    m = Metrics()
    for seconds, size in ((0.005, 100), (0.006, 101), (1000.0, 5)):
        m.http_started("POST", "/v1/completions")
        m.http_finished("POST", "/v1/completions", 200, seconds, size)
    m.http_started("GET", "/v1/models")  # still being answered
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render()[0].decode()) for s in f.samples}

    def value(name, **labels):
        labels = {"method": "POST", "endpoint": "/v1/completions", **labels}
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("llmux_http_requests_total", status="200") == 3
    duration = "llmux_http_requests_duration_seconds"
    assert value(duration + "_bucket", status="200", le="0.005") == 1
    assert value(duration + "_bucket", status="200", le="0.01") == 2
    assert value(duration + "_bucket", status="200", le="600.0") == 2
    assert value(duration + "_bucket", status="200", le="+Inf") == 3
    assert value(duration + "_count", status="200") == 3
    assert value("llmux_http_response_body_size_bucket", le="100.0") == 2
    assert value("llmux_http_response_body_size_sum") == 206
    assert value("llmux_http_requests_pending") == 0
    assert value("llmux_http_requests_pending", method="GET", endpoint="/v1/models") == 1
