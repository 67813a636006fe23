"""Issue 25 where it concerns the service, under the real test systemd (tests/sysd):
a `listen` that llmux.socket overrides is named in the journal at start and by
check-config with the drop-in that moves it; preload wakes its model at start
(GetStatus / llmuxctl status show the progress); an idle model is put to sleep and
the journal says so.

The scenarios run in file order on one daemon (module fixture `habits_svc`).
"""

from __future__ import annotations


import pytest
import yaml

from sysd.helpers import free_port
from test_service import boot_from_tree, wait_for
from test_service_bus import VENV_BIN, ctl_status as status

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


@pytest.fixture(scope="module")
def habits_svc():
    svc = boot_from_tree()
    try:
        config = svc.host_path(svc.config_file)
        data = yaml.safe_load(config.read_text())
        svc.config_listen = f"127.0.0.1:{free_port()}"  # not llmux.socket's address
        data.update(listen=svc.config_listen, preload=["alpha"])
        config.write_text(yaml.safe_dump(data))
        svc.write_model("alpha", idle_timeout=8)
        svc.write_model("beta")
        svc.enable_now()
        yield svc
    finally:
        svc.shut_down()


def test_the_journal_says_which_address_serves_and_how_to_move_it(habits_svc):
    svc = habits_svc
    journal = svc.journal("LLMUX_EVENT=listen_not_served")
    assert (f"config: listen: '{svc.config_listen}' is not served under the service: llmux.socket hands over "
            f"127.0.0.1:{svc.port}, which serves instead") in journal, svc.journal("-u", "llmuxd.service")[-3000:]
    assert f"'ListenStream={svc.config_listen}'" in journal and "systemctl edit llmux.socket" in journal
    code, _ = svc.request("beta")
    assert code == 200  # served on the socket's address


def test_check_config_says_it_too(habits_svc):
    svc = habits_svc
    result = svc.bed.run(str(VENV_BIN / "llmuxd"), "check-config", svc.config_file, check=False)
    assert result.returncode == 0, result.stderr
    assert (f"warning: {svc.config_file}: listen: '{svc.config_listen}' is not served under the service: "
            f"llmux.socket hands over 127.0.0.1:{svc.port}") in result.stderr, result.stderr


def test_preload_woke_alpha_at_start_and_status_shows_it(habits_svc):
    svc = habits_svc
    assert "alpha" in status(svc)["preload"]
    journal = svc.journal("LLMUX_EVENT=preload", "LLMUX_MODEL=alpha")
    assert "preload: model alpha starting" in journal and "preload: model alpha awake" in journal, journal


def test_an_idle_model_is_put_to_sleep_and_the_journal_says_so(habits_svc):
    svc = habits_svc
    code, _ = svc.request("alpha")
    assert code == 200
    left = wait_for(lambda: status(svc)["models"]["alpha"].get("idle_left_usec"), "GetStatus counting down")
    assert 0 < left <= 8_000_000
    wait_for(lambda: status(svc)["models"]["alpha"]["state"] == "asleep", "alpha asleep after idle_timeout")
    assert "idle_left_usec" not in status(svc)["models"]["alpha"]  # asleep: nothing to count down
    assert status(svc)["preload"]["alpha"] == "asleep"
    journal = wait_for(lambda: svc.journal("LLMUX_EVENT=model_idle", "LLMUX_MODEL=alpha"), "the idle journal line")
    assert "model alpha idle for" in journal and "(idle_timeout 8s): putting it to sleep with offload+keep_running" \
        in journal, journal
