"""The console in a real browser: Debian's chromium, driven by Playwright (no browser download).

Against a real `llmuxd run` on `llmux-vllm-sim` backends (and, for the restart, llmuxd.service
under the test systemd). What a user would see: the page loads clean, its models are those of
/v1/models, a playground message to a sleeping model streams and its switch shows in the
timeline with its phases, backend output shows in the log view, controls are refused without
rights and work with a control key, and the page rides out a daemon restart.

The 2-second bounds are the issue's ("within 2 s"), applied as a wait's limit after the event
they follow; they are not benchmarks. Screenshots at 1280 px and at a phone's width go to
$LLMUX_CONSOLE_SHOTS (default: the test's tmp directory).

Marker `browser` (strict as root or in CI, tests/skip_policy.py); scripts/test runs these in the
PyPI pass only (Debian 12's venv has no Playwright).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon_process import BIN, DaemonProcess, http_json, sim_model, wait_until, write_config

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("LLMUX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
#: the issue's bound, in ms, for a switch or a log line to show after it happened
SHOWS_WITHIN_MS = 2000
#: ms for anything else the page waits on (a shared, slow machine)
WAIT_MS = 60000
WIDE, PHONE = (1280, 900), (390, 844)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright (scripts/bootstrap pypi)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (scripts/install-test-deps)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def add_key(keys_dir: Path, name: str, *extra: str) -> str:
    """`llmuxctl keys add NAME ... --dir DIR`: the new key's secret."""
    result = subprocess.run([str(BIN / "llmuxctl"), "keys", "--dir", str(keys_dir), "add", name, *extra],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """`llmuxd run` with two simulated models, both asleep, and API keys: a viewer and an admin."""
    tmp = tmp_path_factory.mktemp("console")
    ledger = tmp / "ledger"
    keys_dir = tmp / "keys.d"
    keys_dir.mkdir()
    models = {"alpha": sim_model("sim/alpha", ledger, 1000), "beta": sim_model("sim/beta", ledger, 1000)}
    config = write_config(tmp, models, keys_dir=str(keys_dir))
    secrets = {"viewer": add_key(keys_dir, "viewer"), "admin": add_key(keys_dir, "admin", "--control")}
    proc = DaemonProcess(config, tmp / "llmuxd.log").wait_ready()
    proc.secrets = secrets
    proc.backend_ports = {name: m["port"] for name, m in models.items()}
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory):
    """`llmuxd run` without keys: the console is read-only."""
    tmp = tmp_path_factory.mktemp("console-open")
    config = write_config(tmp, {"gamma": sim_model("sim/gamma", tmp / "ledger", 1000)})
    proc = DaemonProcess(config, tmp / "llmuxd.log").wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


class Page:
    """A browser page on the console that records console errors and every request's origin."""

    def __init__(self, browser: Any, base: str, size: tuple[int, int] = WIDE):
        self.base = base
        self.origin = urllib.parse.urlsplit(base).netloc
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", self._request)
        self.page.goto(base + "/llmux/console")

    def _request(self, request: Any) -> None:
        parts = urllib.parse.urlsplit(request.url)
        if parts.scheme not in ("data", "blob") and parts.netloc != self.origin:
            self.foreign.append(request.url)

    def use_key(self, secret: str) -> None:
        self.page.fill("#key-input", secret)
        self.page.click("#key-form button[type=submit]")
        self.wait_live()

    def wait_live(self, timeout: float = WAIT_MS) -> None:
        self.page.wait_for_selector("#conn.pill-ok", timeout=timeout)
        self.page.wait_for_selector("tr[data-model]", timeout=timeout)

    def record_connection(self) -> None:
        """From now on, keep every text the connection indicator shows (it may pass quickly)."""
        self.page.evaluate("""() => {
            window.__conn = [];
            const c = document.getElementById('conn');
            new MutationObserver(() => window.__conn.push(c.textContent)).observe(c, {childList: true, subtree: true, characterData: true});
        }""")

    def connection_log(self) -> list[str]:
        return self.page.evaluate("() => window.__conn || []")

    def state_on_page(self, model: str) -> str:
        return self.page.inner_text(f"tr[data-model='{model}'] .state")

    def close(self) -> None:
        self.page.close()


def shots_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("LLMUX_CONSOLE_SHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def states(proc: DaemonProcess) -> dict[str, str]:
    """Model -> state, from /v1/models (with a key where the daemon has keys)."""
    secret = getattr(proc, "secrets", {}).get("viewer")
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    status, _, body = http_json(proc.base + "/v1/models", headers=headers)
    assert status == 200, body
    return {m["id"]: m["llmux"]["state"] for m in body["data"]}


def ask(base: str, model: str, secret: str) -> None:
    status, _, body = http_json(base + "/v1/chat/completions", json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}, timeout=120)
    assert status == 200, body


# ------------------------------------------------------------------------------ scenarios


def test_the_page_loads_clean_and_shows_the_models_of_v1_models(browser, daemon, tmp_path):
    page = Page(browser, daemon.base)
    try:
        page.page.wait_for_selector("#conn:has-text('key needed')", timeout=WAIT_MS)
        assert "requires an API key" in page.page.inner_text("#access")
        page.use_key(daemon.secrets["viewer"])
        listed = http_json(daemon.base + "/v1/models",
                           headers={"Authorization": f"Bearer {daemon.secrets['viewer']}"})[2]["data"]
        shown = page.page.eval_on_selector_all("tr[data-model]", "rows => rows.map(r => r.dataset.model)")
        assert shown == [m["id"] for m in listed]
        for m in listed:
            assert page.state_on_page(m["id"]) == m["llmux"]["state"]
        assert page.errors == []
        assert page.foreign == []
    finally:
        page.close()


def test_a_playground_message_to_a_sleeping_model_streams_and_its_switch_shows(browser, daemon, tmp_path):
    assert states(daemon)["beta"] == "asleep"
    page = Page(browser, daemon.base)
    try:
        page.use_key(daemon.secrets["viewer"])
        page.page.select_option("#play-model", "beta")
        page.page.click("#play-send")
        page.page.wait_for_selector("#play-out[data-done='1']", timeout=WAIT_MS)
        answer = page.page.inner_text("#play-out")
        assert answer.strip() and "Error" not in answer, answer
        item = page.page.wait_for_selector("#switches li[data-to='beta'][data-outcome='ok']",
                                           timeout=SHOWS_WITHIN_MS)
        phases = item.inner_text()
        assert "wake" in phases and "fifo" in phases, phases
        # and the request it was: in the requests table, with the key's id
        page.page.wait_for_selector("#requests tbody tr", timeout=SHOWS_WITHIN_MS)
        assert "viewer" in page.page.inner_text("#requests tbody tr:first-child")
        # the page with a switch, its logs and a request in it, at both widths (the README's picture)
        out = shots_dir(tmp_path)
        page.page.screenshot(path=str(out / "console-1280.png"), full_page=True)
        page.page.set_viewport_size({"width": PHONE[0], "height": PHONE[1]})
        page.page.screenshot(path=str(out / "console-phone.png"), full_page=True)
        assert (out / "console-1280.png").stat().st_size > 0 and (out / "console-phone.png").stat().st_size > 0
        assert page.errors == []
    finally:
        page.close()


def test_a_backend_log_line_shows_in_the_log_view(browser, daemon):
    page = Page(browser, daemon.base)
    try:
        page.use_key(daemon.secrets["viewer"])
        ask(daemon.base, "alpha", daemon.secrets["viewer"])  # alpha's backend is running
        marker = f"console-marker-{os.getpid()}"
        with __import__("urllib.request").request.urlopen(
                f"http://127.0.0.1:{daemon.backend_ports['alpha']}/v1/models?{marker}", timeout=30):
            pass
        page.page.wait_for_selector(f"#logs span:has-text('{marker}')", timeout=SHOWS_WITHIN_MS)
        page.page.select_option("#log-filter", "beta")  # filtered by model: alpha's line is hidden
        assert marker not in page.page.inner_text("#logs")
        page.page.select_option("#log-filter", "alpha")
        assert marker in page.page.inner_text("#logs")
    finally:
        page.close()


def test_without_keys_the_console_is_read_only_and_says_how_to_enable_controls(browser, open_daemon):
    page = Page(browser, open_daemon.base)
    try:
        page.wait_live()
        assert "llmuxctl keys add NAME --control" in page.page.inner_text("#access")
        page.page.click("button[aria-label='switch to gamma']")
        page.page.wait_for_selector("#notice:has-text('Refused')", timeout=WAIT_MS)
        assert "llmuxctl keys add NAME --control" in page.page.inner_text("#notice")
        assert states(open_daemon)["gamma"] == "asleep"
        assert page.errors == [] or all("403" in e for e in page.errors), page.errors
    finally:
        page.close()


def test_a_key_without_control_rights_is_refused_and_a_control_key_switches(browser, daemon):
    page = Page(browser, daemon.base)
    try:
        page.use_key(daemon.secrets["viewer"])
        target = next(m for m, s in states(daemon).items() if s == "asleep")
        page.page.click(f"button[aria-label='switch to {target}']")
        page.page.wait_for_selector("#notice:has-text('Refused')", timeout=WAIT_MS)
        assert "no control rights" in page.page.inner_text("#notice")
        assert states(daemon)[target] == "asleep"

        page.use_key(daemon.secrets["admin"])
        assert "Controls enabled" in page.page.inner_text("#access")
        page.page.click(f"button[aria-label='switch to {target}']")
        page.page.wait_for_selector(f"tr[data-model='{target}'] .state-active", timeout=WAIT_MS)
        assert states(daemon)[target] == "active"
        page.page.wait_for_selector(f"#switches li[data-to='{target}']:has-text('manual switch')",
                                    timeout=SHOWS_WITHIN_MS)
        page.page.click(f"button[aria-label='pin {target}']")
        page.page.wait_for_selector(f"button[aria-label='unpin {target}']", timeout=WAIT_MS)
        assert f"pinned: {target}" in page.page.inner_text("#mode")
        page.page.click(f"button[aria-label='unpin {target}']")
        page.page.wait_for_selector(f"button[aria-label='pin {target}']", timeout=WAIT_MS)
    finally:
        page.close()


@pytest.mark.systemd
def test_under_systemd_a_control_key_acts_and_the_page_rides_out_a_restart(browser, tmp_path):
    from test_service import boot_from_tree
    from test_service_bus import llmuxctl

    svc = boot_from_tree()
    try:
        keys_dir = svc.host_path("/run/llmux-test/keys.d")
        keys_dir.mkdir(parents=True)
        admin = add_key(keys_dir, "admin", "--control")
        config = yaml.safe_load(svc.host_path(svc.config_file).read_text())
        config["keys_dir"] = "/run/llmux-test/keys.d"
        svc.host_path(svc.config_file).write_text(yaml.safe_dump(config))
        svc.write_model("alpha")
        svc.write_model("beta")
        svc.enable_now()
        base = f"http://127.0.0.1:{svc.port}"
        page = Page(browser, base)
        try:
            page.use_key(admin)
            page.page.click("button[aria-label='switch to beta']")
            page.page.wait_for_selector("tr[data-model='beta'] .state-active", timeout=WAIT_MS)
            status = json.loads(llmuxctl(svc, "--json", "status").stdout)
            assert status["models"]["beta"]["state"] == "active", status
            # system mode: the backend's output comes from the journal, by unit
            page.page.wait_for_selector("#logs span.log-backend:has-text('beta')", timeout=WAIT_MS)

            page.record_connection()
            result = svc.systemctl("restart", "llmuxd.service")
            assert result.returncode == 0, result.stderr
            wait_until("the page to say it reconnects", lambda: any("reconnecting" in t for t in page.connection_log()))
            page.wait_live()
            page.page.wait_for_selector("#notice:has-text('llmuxd restarted')", timeout=WAIT_MS)
            assert page.state_on_page("beta") == "active"  # the current state, after adoption
            assert page.errors == [] or all("Failed to load" in e or "ERR_" in e for e in page.errors), page.errors
        finally:
            page.close()
    finally:
        svc.shut_down()
