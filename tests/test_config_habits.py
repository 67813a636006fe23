"""Configuration for issue 25: aliases, preload, idle_timeout, max_concurrency, llmux
0.7's eviction pairs and defaults, 0.7.7's own example configs, and check-config on a
listen address that llmux.socket overrides.

Bad input is table-driven: each row is one file and the one line it must produce,
with the file and the key in it.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from llmuxd.config import ConfigError, load_config
from llmuxd.daemon.checkconfig import check_config
from llmuxd.daemon.socket_unit import served_elsewhere, socket_unit_streams

EXAMPLES = Path(__file__).parent / "data" / "config" / "llmux-0.7.7-examples"

IMAGES_TMP = ("checkpoint.images_dir: '/tmp/llmux-checkpoints' is under /tmp, which llmuxd.service sees as its "
              "own private /tmp (PrivateTmp=yes)")

#: llmux 0.7.7's example configs (copied from its v0.7.7 tag) and the warnings README documents for them
EXAMPLE_WARNINGS = {
    "config.example.json": ["admin_port: not opened: ", IMAGES_TMP],
    "config.6x4090.json": ["max_sleeping: not supported, ignored"],
    "config.test-checkpoint.json": [IMAGES_TMP],
    "config.test-cudasuspend.json": [IMAGES_TMP],
    "config.test-s3.json": [],  # images_dir under /dev/shm: visible to the service
    "config.test-sleep-fast.json": [],
    "config.test-sleep.json": [],
    "config.test-tp2.json": [],
}


def write(tmp: Path, text: str, name: str = "llmux.yaml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def test_every_example_of_0_7_7_is_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.json")) == sorted(EXAMPLE_WARNINGS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_WARNINGS))
def test_07_examples_load_with_the_documented_warnings(name):
    path = EXAMPLES / name
    config = load_config(str(path))
    warnings = [w.split(": ", 1)[1] for w in config.warnings]
    assert all(w.startswith(f"{path}: ") for w in config.warnings)
    assert len(warnings) == len(EXAMPLE_WARNINGS[name]), warnings
    for got, want in zip(warnings, EXAMPLE_WARNINGS[name]):
        assert got.startswith(want), got
    assert config.models  # every example has its models


_M = "models:\n  a: {model_path: x}\n  b: {model_path: y"
BAD = [
    ("alias-is-a-model", _M + ", aliases: [a]}\n",
     "models.b.aliases: 'a' is the name of model 'a' ({f}); remove it from the aliases of model 'b' or rename "
     "one of the two models"),
    ("alias-of-two-models", "models:\n  a: {model_path: x, aliases: [gpt-4]}\n  b: {model_path: y, aliases: [gpt-4]}\n",
     "models.b.aliases: 'gpt-4' is also an alias of model 'a' ({f}); give it to one of 'a' and 'b' only"),
    ("alias-twice", _M + ", aliases: [g, g]}\n", "models.b.aliases: 'g' is listed twice; list it once"),
    ("alias-with-space", _M + ", aliases: ['my model']}\n",
     "models.b.aliases: 'my model' is not a usable name; write it without spaces or control characters"),
    ("preload-unknown", _M + "}\npreload: [a, nope]\n",
     "preload[1]: 'nope' is not a model; preload names models under 'models:' (known: a, b)"),
    ("preload-twice", _M + "}\npreload: [a, a]\n", "preload[1]: 'a' is preloaded twice; list it once"),
    ("max-concurrency-zero", _M + ", max_concurrency: 0}\n", "models.b.max_concurrency: "),
    ("idle-timeout-negative", _M + ", idle_timeout: -5}\n", "models.b.idle_timeout: negative duration"),
]


@pytest.mark.parametrize("case,text,line", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_with_file_and_key(tmp_path, case, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: " + line.format(f=path)), lines[0]


def test_an_alias_clash_names_the_file_of_each_model(tmp_path):
    main = write(tmp_path, "models:\n  a: {model_path: x}\n")
    (tmp_path / "models.d").mkdir()
    dropin = write(tmp_path / "models.d", "models:\n  b: {model_path: y, aliases: [a]}\n", "10-b.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value) == (f"{dropin}: models.b.aliases: 'a' is the name of model 'a' ({main}); remove it "
                               "from the aliases of model 'b' or rename one of the two models")


@pytest.mark.parametrize("text,key", [
    ("policy: {min_active: 10, idle_timeout: 3}\nmodels: {a: {model_path: x}}\n", "policy.idle_timeout"),
    ("policy: {min_active: 10}\nmodels: {a: {model_path: x, idle_timeout: 3s}}\n", "models.a.idle_timeout"),
])
def test_idle_timeout_below_min_active_is_a_warning_not_an_error(tmp_path, text, key):
    path = write(tmp_path, text)
    config = load_config(path)
    assert config.warnings == [
        f"{path}: {key}: 3s is below policy.min_active 10s: a model stays awake at least min_active after it wakes, "
        "so an idle model is evicted after 10s at the earliest; raise idle_timeout or lower min_active"]
    out, err = io.StringIO(), io.StringIO()
    assert check_config(path, stdout=out, stderr=err) == 0
    assert check_config(path, stdout=io.StringIO(), stderr=io.StringIO(), strict=True) == 1


def test_habits_load_and_show_in_the_effective_config(tmp_path):
    path = write(tmp_path, yaml.safe_dump({
        "policy": {"idle_timeout": "10m", "min_active": 5},
        "preload": ["gpt-4o-mini"],
        "models": {"a": {"model_path": "x", "aliases": ["gpt-4o-mini"], "max_concurrency": 4, "idle_timeout": 0},
                   "b": {"model_path": "y"}},
    }))
    config = load_config(path)
    assert config.resolve_model("gpt-4o-mini") == "a" and config.resolve_model("b") == "b"
    assert config.resolve_model("nope") is None
    assert (config.idle_timeout_of("a"), config.idle_timeout_of("b")) == (0.0, 600.0)
    effective = config.to_dict()
    assert effective["preload"] == ["gpt-4o-mini"] and effective["policy"]["idle_timeout"] == 600.0
    assert effective["models"]["a"]["aliases"] == ["gpt-4o-mini"] and effective["models"]["a"]["max_concurrency"] == 4
    assert config.warnings == []


# ---------------------------------------------------------------------------- llmux 0.7 meanings


@pytest.mark.parametrize("eviction", ["offload+stop", "discard+stop"])
def test_07s_weights_plus_stop_pairs_load_and_say_what_they_do(tmp_path, eviction):
    path = write(tmp_path, f"models:\n  m: {{model_path: x, eviction: {eviction}}}\n")
    config = load_config(path)
    assert str(config.models["m"].eviction) == eviction and config.warnings == []
    assert config.notes == [f"models.m.eviction: '{eviction}' stops the process as llmux 0.7 did (the weight step "
                            "is skipped: the process and its memory are gone either way); 'retain+stop' says the same"]


def test_07s_retain_keep_running_loads_with_a_warning_where_the_group_has_no_budget(tmp_path):
    path = write(tmp_path, "models:\n  m: {model_path: x, eviction: retain+keep_running}\n")
    config = load_config(path)
    assert str(config.models["m"].eviction) == "retain+keep_running"
    assert config.warnings == [
        f"{path}: models.m.eviction: 'retain+keep_running' (model 'm') evicts nothing, as in llmux 0.7: the model "
        "keeps its GPU memory while another model of group 'default' serves, so they must fit the GPU together "
        "(lower --gpu-memory-utilization); give the group a budget_gib and the models gpu_memory_gib to say so, "
        "or choose e.g. 'offload+keep_running'"]
    budget = write(tmp_path, "groups: {g: {budget_gib: 40}}\nmodels:\n  m: {model_path: x, eviction: "
                   "retain+keep_running, gpu_group: g, gpu_memory_gib: 20}\n", "budget.yaml")
    assert load_config(budget).warnings == []  # negative control: a budget says they fit


@pytest.mark.parametrize("policy,warned", [
    ('"policy": {"eviction": {"weights": "offload", "process": "keep_running"}}, ', True),
    ("", False),  # no policy.eviction: 0.7's retain+stop, the same as 0.7.7 did
])
def test_a_07_model_without_eviction_says_what_0_7_7_did(tmp_path, policy, warned):
    path = write(tmp_path, '{%s"models": {"m": {"model_path": "x", "port": 8001}}, "metrics_port": 0}' % policy,
                 "config.json")
    config = load_config(path)
    expected = "offload+keep_running" if warned else "retain+stop"
    assert str(config.models["m"].eviction) == expected  # the documented meaning: policy.eviction
    if warned:
        assert config.warnings == [
            f"{path}: models.m: sets no eviction, so it gets policy.eviction 'offload+keep_running' as llmux 0.7 "
            "documented; llmux 0.7.7 itself applied 'retain+stop' to such a model (its per-model default); write "
            "\"eviction\": \"retain+stop\" to keep what 0.7.7 did"]
    else:
        assert config.warnings == []


@pytest.mark.parametrize("images_dir,warned", [
    ("/tmp/llmux-checkpoints", True), ("/var/tmp/images", True), ("/tmpfs/images", False),
    ("/var/lib/llmux/checkpoints", False), ("/dev/shm/llmux", False)])
def test_images_dir_under_a_private_tmp_warns(tmp_path, images_dir, warned):
    path = write(tmp_path, f"checkpoint: {{images_dir: {images_dir}}}\nmodels: {{m: {{model_path: x}}}}\n")
    warnings = load_config(path).warnings
    assert bool(warnings) is warned, warnings
    if warned:
        assert warnings[0].startswith(f"{path}: checkpoint.images_dir: '{images_dir}' is under ")


# ---------------------------------------------------------------------------- listen vs llmux.socket


def install_socket(root: Path, *dropins: str) -> None:
    units = root / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "llmux.socket").write_text("[Socket]\nListenStream=127.0.0.1:3000\nFileDescriptorName=http\n")
    if dropins:
        d = root / "etc" / "systemd" / "system" / "llmux.socket.d"
        d.mkdir(parents=True)
        for i, text in enumerate(dropins):
            (d / f"{i}-x.conf").write_text(text)


def test_socket_unit_streams_apply_dropins(tmp_path):
    assert socket_unit_streams(str(tmp_path)) is None
    install_socket(tmp_path, "[Socket]\nListenStream=\nListenStream=0.0.0.0:8080\n")
    assert socket_unit_streams(str(tmp_path)) == ["0.0.0.0:8080"]


@pytest.mark.parametrize("listen,served,elsewhere", [
    ("127.0.0.1:3000", ["127.0.0.1:3000"], False),
    ("127.0.0.1:4000", ["127.0.0.1:3000"], True),
    ("0.0.0.0:3000", ["3000"], False),
    ("unix:/run/llmux.sock", ["/run/llmux.sock"], False),
    ("127.0.0.1:3000", [], False),
])
def test_served_elsewhere(listen, served, elsewhere):
    assert served_elsewhere(listen, served) is elsewhere


def test_check_config_says_which_address_serves_and_how_to_move_it(tmp_path):
    install_socket(tmp_path / "root")
    path = write(tmp_path, '{"port": 8080, "models": {"m": {"model_path": "x", "port": 8001}}, "metrics_port": 0}',
                 "config.json")
    err = io.StringIO()
    assert check_config(path, stdout=io.StringIO(), stderr=err, unit_root=str(tmp_path / "root")) == 0
    assert err.getvalue().splitlines() == [
        f"warning: {path}: listen: '127.0.0.1:8080' is not served under the service: llmux.socket hands over "
        "127.0.0.1:3000, which serves instead (systemd holds the socket); to serve on 127.0.0.1:8080, move the "
        "socket with a drop-in: `systemctl edit llmux.socket` with the lines '[Socket]', 'ListenStream=', "
        "'ListenStream=127.0.0.1:8080', then `systemctl restart llmux.socket llmuxd`"]
    same = write(tmp_path, '{"port": 3000, "models": {"m": {"model_path": "x", "port": 8001}}, "metrics_port": 0}',
                 "same.json")
    err = io.StringIO()
    assert check_config(same, stdout=io.StringIO(), stderr=err, unit_root=str(tmp_path / "root")) == 0
    assert err.getvalue() == ""  # negative control: the socket serves what the config says
