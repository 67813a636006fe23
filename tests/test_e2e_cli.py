"""`llmuxd`'s command line: what a person typing it sees."""

from __future__ import annotations

import sys

import pytest

from llmuxd.daemon import main as cli

DEMO = "etc/llmux/examples/demo.yaml"


def test_check_config_is_dispatched_with_its_own_arguments(capsys):
    assert cli.main(["check-config", DEMO]) == 0
    out = capsys.readouterr().out
    for model in ("chat-small", "chat-large", "embed-mini"):
        assert f"  {model}:" in out


def test_check_config_reports_a_broken_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a:\n    model_path: /m\n    eviction: sometimes\n")
    assert cli.main(["check-config", str(bad)]) == 1
    assert f"{bad}: models.a.eviction" in capsys.readouterr().err


def test_run_with_a_broken_config_exits_1_naming_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\nmodels: {}\n")
    assert cli.main(["run", "--config", str(bad)]) == 1
    assert "listen" in capsys.readouterr().err


def test_run_requires_a_config(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run"])
    assert exc.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_system_mode_slot(monkeypatch, capsys):
    """Without llmuxd/daemon/system.py the default command says so; with it, it is called."""
    monkeypatch.setitem(sys.modules, cli.SYSTEM_MODULE, None)  # import fails like a missing module
    assert cli.main([]) == 2
    assert "system mode not available" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, cli.SYSTEM_MODULE)

    calls = []

    class FakeSystem:
        @staticmethod
        def main(argv):
            calls.append(argv)
            return 0

    monkeypatch.setitem(sys.modules, cli.SYSTEM_MODULE, FakeSystem)
    assert cli.main(["--config", "/etc/llmux/llmux.yaml"]) == 0
    assert calls == [["--config", "/etc/llmux/llmux.yaml"]]


@pytest.mark.parametrize("argv", [
    ["--config", "{cfg}", "validate", "m", "--policies", "offload+keep_running"],
    ["validate", "--config", "{cfg}", "m", "--policies", "offload+keep_running"],
])
def test_tools_read_the_config_given_before_or_after_the_subcommand(tmp_path, capsys, argv):
    missing = str(tmp_path / "absent.yaml")
    assert cli.main([a.replace("{cfg}", missing) for a in argv]) == 2
    assert f"{missing}: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("soft, hard", [(256, None), (256, 512), (512, 512)])
def test_run_lifts_the_open_file_limit_to_the_hard_one(soft, hard):
    """`llmuxd run` as an ordinary user starts with a soft limit of 1024 files
    (two sockets per proxied request): it lifts it so that hundreds of
    concurrent requests do not fail with 'Too many open files'. Checked in a
    child process, which may lower its limits without touching the tests'."""
    import json
    import subprocess

    code = (
        "import json, resource\n"
        "from llmuxd.daemon.main import raise_open_file_limit\n"
        f"soft, hard = {soft}, {hard}\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))\n"
        "raise_open_file_limit()\n"
        "print(json.dumps(resource.getrlimit(resource.RLIMIT_NOFILE)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    soft_after, hard_after = json.loads(out)
    assert soft_after == hard_after
    if hard is not None:
        assert hard_after == hard
