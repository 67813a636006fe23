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
