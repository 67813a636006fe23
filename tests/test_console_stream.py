"""The console's event stream (`/llmux/v1/events`), its hub and its log sources.

Unit tests of the hub (resume without duplicates, gaps said, slow readers dropped and
resynchronised, never blocking), of the two log sources' parsing, and end to end against a
real `llmuxd run` on simulators read with `curl -N`, as the docs tell scripts to.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from daemon_process import DaemonProcess, http_json, sim_model, wait_until, write_config
from llmuxd.daemon.logsources import CapturedOutput, line_from_journal
from llmuxd.events import LogLine, ModelStateChanged, SwitchFinished, SwitchStarted
from llmuxd.http.console.hub import EventHub


def frames(raw: bytes) -> list[dict]:
    """SSE frames as {"id", "event", "data"} (comments dropped)."""
    out = []
    for block in raw.decode().split("\n\n"):
        frame: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            frame[field] = json.loads(value) if field == "data" else value
        if frame:
            out.append(frame)
    return out


def hub(**kw) -> EventHub:
    return EventHub(lambda: {"models": {}}, epoch="e1", **kw)


def log_line(i: int) -> LogLine:
    return LogLine(float(i), "backend", "a", f"line {i}")


# ---------------------------------------------------------------------------- the hub


async def test_a_reader_that_resumes_gets_exactly_what_it_missed():
    h = hub()
    first = h.connect(None)
    got = frames(b"".join(first.take()))
    assert [f["event"] for f in got] == ["snapshot"]
    h.on_event(SwitchStarted("g", None, "a", "fifo: 1 request(s) waiting"))
    seen = frames(b"".join(first.take()))
    h.disconnect(first)
    for i in range(5):  # while it was away
        h.on_event(log_line(i))
    again = h.connect(seen[-1]["id"])
    replay = frames(b"".join(again.take()))
    assert [f["data"]["text"] for f in replay] == [f"line {i}" for i in range(5)]
    ids = [int(f["id"].split(":")[1]) for f in seen + replay]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # no duplicate, no hole
    h.close()


@pytest.mark.parametrize("last_id, reason", [
    ("other:3", "llmuxd restarted"),
    ("e1:999", "not from this stream"),
    ("garbage", "unknown Last-Event-ID"),
])
async def test_a_reader_that_cannot_resume_is_told_and_redrawn(last_id, reason):
    h = hub()
    h.on_event(log_line(1))
    got = frames(b"".join(h.connect(last_id).take()))
    assert [f["event"] for f in got] == ["gap", "snapshot"]
    assert reason in got[0]["data"]["reason"]
    h.close()


async def test_events_older_than_the_ring_are_counted_as_missed():
    h = hub(ring=10)
    for i in range(30):
        h.on_event(log_line(i))
    got = frames(b"".join(h.connect("e1:5").take()))
    assert got[0]["event"] == "gap" and got[0]["data"]["missed"] == 30 - 10 - 5
    assert got[1]["event"] == "snapshot"
    h.close()


async def test_a_reader_that_falls_behind_is_dropped_and_resynchronised_not_waited_for():
    h = hub(queue_limit=50)
    slow = h.connect(None)
    slow.take()
    for i in range(1000):  # the slow reader never takes: publish must neither block nor grow
        h.on_event(log_line(i))
        assert len(slow.frames) <= 50
    assert slow.dropped == 1000  # the 50 it had queued went too: the snapshot replaces them
    got = frames(b"".join(h.resync(slow)))
    assert [f["event"] for f in got] == ["gap", "snapshot"]
    assert got[0]["data"]["missed"] == 1000 and "fell behind" in got[0]["data"]["reason"]
    h.on_event(log_line(1000))  # and it follows again
    assert [f["data"]["text"] for f in frames(b"".join(slow.take()))] == ["line 1000"]
    h.close()


async def test_switches_are_kept_for_a_new_reader_with_their_phases_and_reason():
    h = hub()
    h.on_event(SwitchStarted("g", "a", "b", "fifo: 2 request(s) waiting"))
    h.on_event(ModelStateChanged("b", "waking"))
    h.on_event(SwitchFinished("g", "a", "b", ok=True, duration=1.5, phases={"drain": 0.5, "sleep": 0.5, "wake": 0.5},
                              reason="fifo: 2 request(s) waiting"))
    snap = frames(b"".join(h.connect(None).take()))[0]["data"]
    (switch,) = snap["switches"]
    assert switch["phases"] == {"drain": 0.5, "sleep": 0.5, "wake": 0.5}
    assert switch["reason"] == "fifo: 2 request(s) waiting" and snap["running"] == []
    h.close()


# ----------------------------------------------------------------------- log sources


@pytest.mark.parametrize("entry, expected", [
    ({"MESSAGE": "hello", "_SYSTEMD_UNIT": "llmux-model-qwen2.5\\x2d7b.service", "PRIORITY": "6",
      "__REALTIME_TIMESTAMP": "1700000000000000"},
     LogLine(1700000000.0, "backend", "qwen2.5-7b", "hello", "info")),
    ({"MESSAGE": "switch a -> b ok", "_SYSTEMD_UNIT": "llmuxd.service", "LLMUX_MODEL": "b", "PRIORITY": "3",
      "__REALTIME_TIMESTAMP": "1700000000000000"},
     LogLine(1700000000.0, "llmuxd", "b", "switch a -> b ok", "error")),
    ({"MESSAGE": [104, 105, 255], "_SYSTEMD_UNIT": "llmux-model-a.service", "__REALTIME_TIMESTAMP": "1"},
     LogLine(1e-6, "backend", "a", "hi\ufffd", "info")),
    ({"MESSAGE": "not ours", "_SYSTEMD_UNIT": "sshd.service"}, None),
    ({"_SYSTEMD_UNIT": "llmux-model-a.service"}, None),
])
def test_journal_entries_become_log_lines(entry, expected):
    assert line_from_journal(entry, "llmuxd.service") == expected


async def test_captured_output_keeps_a_bounded_buffer_per_model_and_the_daemons_lines():
    source = CapturedOutput(per_model=3)
    seen = []
    source.follow(seen.append)
    await source.start()
    try:
        backend = logging.getLogger("llmuxd.backend")
        for i in range(5):
            backend.info("[a] out %d", i, extra={"llmux_model": "a"})
        backend.info("[b] only", extra={"llmux_model": "b"})
        logging.getLogger("llmuxd.switcher").warning("something to see")
        logging.getLogger("llmuxd.switcher").debug("not for the console")
    finally:
        await source.stop()
    assert [line.text for line in source.recent("a")] == ["out 2", "out 3", "out 4"]
    assert [line.text for line in source.recent("b")] == ["only"]
    daemon = [line for line in seen if line.source == "llmuxd"]
    assert [(line.text, line.level) for line in daemon] == [("something to see", "warning")]
    assert len(seen) == 7


# ----------------------------------------------------------------- against llmuxd run


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("events")
    ledger = tmp / "ledger"
    config = write_config(tmp, {"a": sim_model("sim/a", ledger, 1000), "b": sim_model("sim/b", ledger, 1000)})
    proc = DaemonProcess(config, tmp / "llmuxd.log").wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


def curl_events(base: str, seconds: float, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(["curl", "-sN", "--max-time", str(seconds), *extra, base + "/llmux/v1/events"],
                            stdout=subprocess.PIPE)


def chat(base: str, model: str) -> int:
    status, _, _ = http_json(base + "/v1/chat/completions", json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode(),
        {"Content-Type": "application/json"}, timeout=120)
    return status


def test_curl_follows_a_switch_and_a_request_and_resumes_without_duplicates(daemon):
    reader = curl_events(daemon.base, 20)
    time.sleep(1)  # curl connected (the snapshot is first either way)
    assert chat(daemon.base, "a") == 200
    raw = reader.communicate()[0]
    got = frames(raw)
    kinds = [f["event"] for f in got]
    assert kinds[0] == "snapshot"
    assert {"switch_started", "switch_finished", "requests", "log", "status"} <= set(kinds), kinds
    finished = next(f["data"] for f in got if f["event"] == "switch_finished")
    assert finished["to_model"] == "a" and finished["ok"] and "wake" in finished["phases"]
    assert finished["reason"].startswith("fifo:")
    (request,) = next(f["data"] for f in got if f["event"] == "requests")
    assert (request["model"], request["status"], request["path"]) == ("a", 200, "/v1/chat/completions")
    assert 0 <= request["first_byte"] <= request["duration"] and request["waited"] > 0

    middle = got[len(got) // 2]["id"]
    resumed = frames(curl_events(daemon.base, 3, "-H", f"Last-Event-ID: {middle}").communicate()[0])
    before = [f["id"] for f in got if "id" in f]
    after = [f["id"] for f in resumed if "id" in f]
    assert after[: len(before) - before.index(middle) - 1] == before[before.index(middle) + 1:]
    assert len(set(after)) == len(after) and middle not in after


def test_the_page_and_assets_carry_a_csp_without_inline_script_or_other_origins(daemon):
    for path in ("/llmux/console", "/llmux/console/static/console.js", "/llmux/console/static/console.css"):
        with urllib.request.urlopen(daemon.base + path, timeout=30) as resp:
            csp = resp.headers["Content-Security-Policy"]
            body = resp.read().decode()
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert "http://" not in body and "https://" not in body  # no CDN, nothing from elsewhere
    html = urllib.request.urlopen(daemon.base + "/llmux/console", timeout=30).read().decode()
    assert "<script>" not in html and "style=" not in html and "onclick" not in html


@pytest.mark.parametrize("path", ["/llmux/console/static/..%2f..%2fapp.py", "/llmux/console/static/nothing.js",
                                  "/llmux/console/static/__init__.py"])
def test_only_shipped_assets_are_served(daemon, path):
    try:
        urllib.request.urlopen(daemon.base + path, timeout=30)
        raise AssertionError(f"{path} was served")
    except urllib.error.HTTPError as err:
        assert err.code == 404


@pytest.mark.parametrize("body, status, says", [
    ({"action": "switch", "model": "b"}, 403, "llmuxctl keys add NAME --control"),
    ({"action": "sleep", "model": "a"}, 403, "no API keys are configured"),
])
def test_without_keys_controls_are_refused_with_how_to_enable_them(daemon, body, status, says):
    code, _, answer = http_json(daemon.base + "/llmux/v1/control", json.dumps(body).encode(),
                                {"Content-Type": "application/json"})
    assert code == status and says in answer["error"]["message"], answer
    assert answer["error"]["type"] == "permission_error"


def test_a_stalled_reader_never_holds_up_requests(daemon):
    """A client that opens the stream and never reads: requests and the stream's other
    readers go on (its queue is bounded and dropped, never waited for)."""
    host, port = daemon.listen.split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /llmux/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        reader = curl_events(daemon.base, 30)
        for model in ("b", "a", "b"):  # switches, log lines, requests, while one reader stalls
            assert chat(daemon.base, model) == 200
        time.sleep(1.5)  # the stream writes every 0.25 s: let the last batch go out
        reader.terminate()
        kinds = [f["event"] for f in frames(reader.communicate()[0])]
        assert kinds.count("switch_finished") >= 3
    finally:
        stalled.close()


def test_a_stopping_daemon_ends_the_stream_with_bye(tmp_path):
    config = write_config(tmp_path, {"a": sim_model("sim/a", tmp_path / "ledger", 1000)})
    proc = DaemonProcess(config, tmp_path / "llmuxd.log").wait_ready()
    try:
        reader = curl_events(proc.base, 60)
        wait_until("the reader is connected", lambda: proc.models())
        time.sleep(1)
    finally:
        assert proc.stop() == 0
    got = frames(reader.communicate()[0])
    assert got[-1]["event"] == "bye" and "stopping" in got[-1]["data"]["reason"]


async def test_a_reader_connecting_while_llmuxd_stops_is_not_kept():
    h = hub()
    h.close()
    late = h.connect(None)
    assert late.closed and h.readers == 0
    assert [f["event"] for f in frames(b"".join(late.take()))] == ["snapshot"]


async def test_request_summaries_come_gathered_and_a_snapshot_never_repeats_them():
    from llmuxd.events import RequestServed

    h = hub()
    early = h.connect(None)
    early.take()
    for i in range(3):
        h.on_event(RequestServed(float(i), "a", "/v1/completions", 200, 0.0, 0.01, 0.02))
    assert early.frames == type(early.frames)()  # nothing encoded on the request path yet
    late = frames(b"".join(h.connect(None).take()))  # a new reader: the snapshot has them
    assert [r["at"] for r in late[0]["data"]["requests"]] == [0.0, 1.0, 2.0]
    got = frames(b"".join(early.take()))  # the earlier reader: one frame with all three
    assert [f["event"] for f in got] == ["requests"]
    assert [r["at"] for r in got[0]["data"]] == [0.0, 1.0, 2.0]
    assert int(late[0]["id"].split(":")[1]) == int(got[0]["id"].split(":")[1])  # resuming from it skips them
    h.close()


@pytest.mark.systemd
def test_under_systemd_the_stream_carries_switches_and_the_backends_journal():
    """System mode: the same stream, its log lines read from the journal by unit."""
    from test_service import boot_from_tree

    svc = boot_from_tree()
    try:
        svc.write_model("alpha")
        svc.enable_now()
        base = f"http://127.0.0.1:{svc.port}"
        reader = curl_events(base, 60)
        wait_until("the stream's reader", lambda: svc.models_listed())
        time.sleep(1)
        status, body = svc.request("alpha")
        assert status == 200, body
        time.sleep(2)  # the stream writes every 0.25 s; the journal follows within a moment
        reader.terminate()
        got = frames(reader.communicate()[0])
        finished = [f["data"] for f in got if f["event"] == "switch_finished"]
        assert finished and finished[0]["to_model"] == "alpha" and "wake" in finished[0]["phases"]
        backend = [f["data"] for f in got if f["event"] == "log" and f["data"]["source"] == "backend"]
        assert any(line["model"] == "alpha" and "llmux-sim" in line["text"] for line in backend), got[-5:]
    finally:
        svc.shut_down()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """`llmuxd run` with a viewer key and a control key."""
    from test_console_browser import add_key

    tmp = tmp_path_factory.mktemp("keyed")
    keys_dir = tmp / "keys.d"
    keys_dir.mkdir()
    config = write_config(tmp, {"a": sim_model("sim/a", tmp / "ledger", 1000)}, keys_dir=str(keys_dir))
    secrets = {"viewer": add_key(keys_dir, "viewer"), "admin": add_key(keys_dir, "admin", "--control")}
    proc = DaemonProcess(config, tmp / "llmuxd.log").wait_ready()
    proc.secrets = secrets
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("key, body, status, says", [
    ("sk-wrong", b'{"action": "sleep", "model": "a"}', 401, "Incorrect API key"),
    (None, b'{"action": "sleep", "model": "a"}', 401, "API key"),
    ("viewer", b'{"action": "sleep", "model": "a"}', 403, "no control rights"),
    ("admin", b'{not json', 400, "must be JSON"),
    ("admin", b'["sleep"]', 400, "action must be one of"),
    ("admin", b'{"action": "reboot", "model": "a"}', 400, "action must be one of"),
    ("admin", b'{"action": "switch", "model": "nope"}', 404, "does not exist"),
    ("admin", b'{"action": "switch"}', 404, "does not exist"),
    ("admin", b'{"action": "eviction", "model": "a", "eviction": "melt+freeze"}', 400, "melt"),
])
def test_bad_control_calls_get_an_openai_shaped_error_that_says_why(keyed, key, body, status, says):
    secret = keyed.secrets.get(key, key)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {secret}"} if secret else {})}
    code, _, answer = http_json(keyed.base + "/llmux/v1/control", body, headers)
    assert code == status and says in answer["error"]["message"], answer


def test_a_control_key_sets_an_eviction_and_the_stream_needs_a_key(keyed):
    admin = {"Authorization": f"Bearer {keyed.secrets['admin']}", "Content-Type": "application/json"}
    code, _, answer = http_json(keyed.base + "/llmux/v1/control", json.dumps(
        {"action": "eviction", "model": "a", "eviction": "discard+keep_running"}).encode(), admin)
    assert code == 200, answer
    models = http_json(keyed.base + "/v1/models", headers=admin)[2]["data"]
    assert models[0]["llmux"]["eviction"] == "discard+keep_running"
    anonymous = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                                keyed.base + "/llmux/v1/events"], capture_output=True, text=True).stdout
    assert anonymous == "401"
    assert http_json(keyed.base + "/llmux/v1/console")[2]["keys_configured"] is True
