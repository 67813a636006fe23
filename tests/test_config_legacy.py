"""llmux 0.7 configurations load unchanged: every key 0.7.7 documents (its
README, its config structs and its example configs) is translated, or loads
with a warning that says what llmux does instead; unknown keys are warnings
(``check-config --strict`` fails on them); zero values mean what they meant."""

from __future__ import annotations

import io
import json
import pathlib

import pytest
import yaml

from llmuxd.config import Config, ConfigError, load_config
from llmuxd.config.legacy import CONTROL_ROUTES, LEGACY_STARTUP_TIMEOUT
from llmuxd.daemon.checkconfig import check_config
from llmuxd.eviction import Eviction

DATA = pathlib.Path(__file__).resolve().parent / "data" / "config"
EVERY_KEY = DATA / "llmux-0.7.7-every-key.json"
TIME_SLICE = DATA / "llmux-0.7.7-time-slice.json"

#: every key llmux 0.7.7 documents, by section (README tables, src/config.rs,
#: and the keys its example configs carry that its code never read)
KEYS_07 = {
    "": ["models", "policy", "port", "metrics_port", "admin_port", "vllm_command", "checkpoint", "warmup",
         "startup_timeout_secs", "max_sleeping"],
    "models.*": ["model_path", "port", "extra_args", "eviction", "checkpoint_path"],
    "policy": ["policy_type", "request_timeout_secs", "drain_before_switch", "eviction", "min_active_secs",
               "coalesce_window_ms", "amortization_factor", "max_wait_secs", "tick_interval_ms", "min_quantum_ms"],
    "checkpoint": ["criu_path", "cuda_plugin_dir", "images_dir", "cuda_checkpoint_path", "keep_images", "object_store"],
    "checkpoint.object_store": ["endpoint", "bucket", "access_key", "secret_key", "region"],
}


def _section(data: dict, where: str) -> list:
    if not where:
        return [data]
    if where == "models.*":
        return list(data["models"].values())
    for part in where.split("."):
        data = data[part]
    return [data]


def check(path, *, strict=False):
    out, err = io.StringIO(), io.StringIO()
    code = check_config(str(path), stdout=out, stderr=err, strict=strict)
    return code, out.getvalue(), err.getvalue().splitlines()


def test_the_every_key_config_has_every_key_07_documents():
    data = json.loads(EVERY_KEY.read_text())
    missing = [f"{where}.{key}".lstrip(".") for where, keys in KEYS_07.items() for key in keys
               if not any(key in section for section in _section(data, where))]
    assert missing == []


def test_every_07_key_loads_and_means_what_it_meant():
    config = load_config(str(EVERY_KEY))
    assert config.listen == "127.0.0.1:3300"  # port, on loopback
    assert (config.metrics_port, config.admin_port, config.warmup) == (9300, 3301, True)
    chat, coder, tiny = (config.models[m] for m in ("chat", "coder", "tiny"))
    assert chat.command == ["/opt/vllm/bin/vllm", "serve"]  # vllm_command
    assert [m.startup_timeout for m in (chat, coder, tiny)] == [900.0] * 3  # startup_timeout_secs
    assert (chat.port, coder.port, tiny.port) == (8011, 8012, 8013)
    assert str(chat.eviction) == "offload+keep_running" and str(coder.eviction) == "discard+checkpoint"
    assert tiny.eviction == Eviction.parse("discard+keep_running")  # policy.eviction
    assert coder.checkpoint_path == "/srv/llmux-images/coder/images"
    assert chat.extra_args == ["--max-model-len", "4096", "--gpu-memory-utilization", "0.85"]
    p = config.policy
    assert (p.type, p.request_timeout, p.drain_before_switch) == ("cost_aware", 120.0, False)
    assert (p.min_active, p.coalesce_window, p.amortization_factor) == (0.0, 0.0, 0.0)
    assert (p.max_wait, p.tick_interval, p.min_quantum) == (30.0, 0.25, 0.0)
    cp = config.checkpoint
    assert (cp.criu_path, cp.cuda_plugin_dir, cp.images_dir) == ("/usr/local/sbin/criu", "/usr/local/lib/criu/", "/srv/llmux-images")
    assert (cp.cuda_checkpoint_path, cp.keep_images) == ("/usr/local/bin/cuda-checkpoint", True)
    store = cp.object_store
    assert (store.endpoint, store.bucket, store.region) == ("http://127.0.0.1:9200", "llmux-images", "eu-west-1")
    assert (store.access_key, store.secret_key) == ("llmux", "not-a-real-secret")


def test_check_config_passes_with_a_warning_for_each_key_that_does_nothing_here():
    code, out, err = check(EVERY_KEY)
    assert code == 0
    warnings = [line for line in err if line.startswith("warning: ")]
    assert [w.split(": ", 3)[2] for w in warnings] == ["max_sleeping", "admin_port", "models.tiny"]
    assert all(w.startswith(f"warning: {EVERY_KEY}: ") for w in warnings)  # names the file
    max_sleeping, admin, tiny = (w.split(": ", 3)[3] for w in warnings)
    assert tiny == ("sets no eviction, so it gets policy.eviction 'discard+keep_running' as llmux 0.7 documented; "
                    "llmux 0.7.7 itself applied 'retain+stop' to such a model (its per-model default); write "
                    "\"eviction\": \"retain+stop\" to keep what 0.7.7 did")
    assert "ignored (llmux 0.7 ignored it as well)" in max_sleeping and "'...+stop'" in max_sleeping
    assert admin.startswith("not opened: llmux takes control calls on D-Bus (io.llmux.LLMux1, authorized by polkit)")
    for route, ctl, method in CONTROL_ROUTES:  # every 0.7 control route has its replacement named
        assert f"{route} -> {ctl} ({method})" in admin
    notes = [line for line in err if line.startswith("note: ")]
    assert notes == ["note: startup_timeout_secs: 900s is the startup_timeout of every model that sets none "
                     "(llmux 0.7.7 ignored this key and waited 1800s; 0.9 reads it as here)"]
    assert yaml.safe_load(out)["policy"]["amortization_factor"] == 0.0


def test_check_config_strict_fails_on_those_warnings():
    code, out, err = check(EVERY_KEY, strict=True)
    assert code == 1 and out == ""
    assert [line.split(": ", 2)[1] for line in err[:-1]] == ["max_sleeping", "admin_port", "models.tiny"]
    assert err[-1] == "3 problem(s) (--strict: warnings count); nothing was changed"


def test_time_slice_rig_with_keys_its_version_never_read():
    config = load_config(str(TIME_SLICE))
    assert [m.startup_timeout for m in config.models.values()] == [600.0, 600.0]
    assert config.metrics_port is None  # 0: off
    assert (config.policy.type, config.policy.min_quantum, config.policy.tick_interval) == ("time_slice", 5.0, 0.5)
    assert [w.split(": ")[1] for w in config.warnings] == ["max_sleeping"]
    assert [m.tensor_parallel_size for m in config.models.values()] == [4, 4]


def test_json_without_startup_timeout_gets_07s_fixed_1800s_and_yaml_gets_ours(tmp_path):
    legacy = tmp_path / "config.json"
    legacy.write_text('{"models": {"m": {"model_path": "x", "port": 8001}}, "metrics_port": 0}')
    assert load_config(str(legacy)).models["m"].startup_timeout == LEGACY_STARTUP_TIMEOUT == 1800.0
    assert Config.from_dict({"models": {"m": {"model_path": "x"}}}).models["m"].startup_timeout == 600.0
    assert load_config(str(legacy)).notes == []


def test_json_without_metrics_port_notes_where_metrics_went(tmp_path):
    legacy = tmp_path / "config.json"
    legacy.write_text('{"models": {}}')
    assert load_config(str(legacy)).notes == [
        "metrics_port: not set; llmux 0.7 served metrics on port 9090 then, llmux serves /metrics on the "
        "listen address (and on metrics_port when set)"
    ]


ZEROS = [
    # (0.7 key, 0.7 config, where it lands, value)
    ("metrics_port", {"metrics_port": 0}, "metrics_port", None),
    ("admin_port", {"admin_port": 0}, "admin_port", None),
    ("min_active_secs", {"policy": {"min_active_secs": 0}}, "policy.min_active", 0.0),
    ("coalesce_window_ms", {"policy": {"coalesce_window_ms": 0}}, "policy.coalesce_window", 0.0),
    ("amortization_factor", {"policy": {"amortization_factor": 0}}, "policy.amortization_factor", 0.0),
    ("amortization_factor float", {"policy": {"amortization_factor": 0.0}}, "policy.amortization_factor", 0.0),
    ("max_wait_secs", {"policy": {"max_wait_secs": 0}}, "policy.max_wait", 0.0),
    ("tick_interval_ms", {"policy": {"tick_interval_ms": 0}}, "policy.tick_interval", 0.0),
    ("min_quantum_ms", {"policy": {"min_quantum_ms": 0}}, "policy.min_quantum", 0.0),
    ("startup_timeout_secs", {"startup_timeout_secs": 0, "models": {"m": {"model_path": "x", "port": 8001}}},
     "models.m.startup_timeout", 1800.0),
]


@pytest.mark.parametrize("key,data,where,value", ZEROS, ids=[z[0] for z in ZEROS])
def test_zero_values_07_accepted_load(tmp_path, key, data, where, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    target = load_config(str(path))
    for part in where.split("."):
        target = target[part] if isinstance(target, dict) else getattr(target, part)
    assert target == value


def test_zero_startup_timeout_secs_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"startup_timeout_secs": 0, "metrics_port": 0}')
    assert load_config(str(path)).warnings == [
        f"{path}: startup_timeout_secs: 0 ignored (llmux 0.7.7 ignored this key); models keep startup_timeout "
        "1800s unless they set their own"
    ]


def test_a_model_startup_timeout_wins_over_startup_timeout_secs():
    config = Config.from_dict({"startup_timeout_secs": 60, "models": {"a": {"model_path": "x", "startup_timeout": "5m"},
                                                                      "b": {"model_path": "y"}}})
    assert {n: m.startup_timeout for n, m in config.models.items()} == {"a": 300.0, "b": 60.0}


UNKNOWN = [
    # (file name, text, warning after "FILE: ")
    ("llmux.yaml", "modles: {}\n", "modles: unknown key, ignored; did you mean 'models'?"),
    ("llmux.yaml", "models:\n  qwen:\n    model_path: x\n    evictoin: offload+stop\n",
     "models.qwen.evictoin: unknown key, ignored; did you mean 'eviction'?"),
    ("llmux.yaml", "policy:\n  tick_intervall: 1s\n", "policy.tick_intervall: unknown key, ignored; did you mean 'tick_interval'?"),
    ("llmux.yaml", "groups:\n  big:\n    vram: 80\n", "groups.big.vram: unknown key, ignored; allowed keys: budget_gib"),
    ("llmux.yaml", "checkpoint:\n  object_store: {endpoint: e, bucket: b, acess_key: k}\n",
     "checkpoint.object_store.acess_key: unknown key, ignored; did you mean 'access_key'?"),
    ("config.json", '{"models": {"m": {"model_path": "x", "port": 8001, "extra_arg": []}}, "metrics_port": 0}',
     "models.m.extra_arg: unknown key, ignored; did you mean 'extra_args'?"),
    ("config.json", '{"models": {}, "metrics_port": 0, "lora_adapters": {"a": "b"}}',
     "lora_adapters: unknown key, ignored; allowed keys: admin_port, auth, checkpoint, gpu_probe, groups, keys_dir, listen, "
     "max_body_bytes, metrics_port, models, policy, port_range, preload, state_dir, stop_backends_on_exit, user, warmup"),
    ("config.json", '{"policy": {"policy_typ": "fifo"}, "metrics_port": 0}',
     "policy.policy_typ: unknown key, ignored; did you mean 'policy_type'?"),
]


@pytest.mark.parametrize("name,text,warning", UNKNOWN, ids=[u[2].split(":")[0] for u in UNKNOWN])
def test_unknown_keys_are_warnings_that_name_file_and_key(tmp_path, name, text, warning):
    path = tmp_path / name
    path.write_text(text)
    config = load_config(str(path))
    assert config.warnings == [f"{path}: {warning}"]
    code, _, err = check(path)
    assert code == 0 and err == [f"warning: {path}: {warning}"]
    code, _, err = check(path, strict=True)
    assert code == 1 and err[0] == f"{path}: {warning}"


def test_an_unknown_key_in_a_dropin_names_the_dropin(tmp_path):
    (tmp_path / "models.d").mkdir()
    main = tmp_path / "llmux.yaml"
    main.write_text("models: {}\n")
    dropin = tmp_path / "models.d" / "10-x.yaml"
    dropin.write_text("listen: 0.0.0.0:1\nmodels:\n  a: {model_path: x, gpu: 1}\n")
    assert load_config(str(main)).warnings == [
        f"{dropin}: listen: unknown key, ignored; a drop-in holds only 'models:' (other keys go in the main file)",
        f"{dropin}: models.a.gpu: unknown key, ignored; did you mean 'gpus'?",
    ]


def test_unknown_policy_type_is_an_error_that_says_07_fell_back_to_fifo(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"policy": {"policy_type": "cost-aware"}}')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}: policy.policy_type: unknown policy 'cost-aware'; allowed: fifo, cost_aware, time_slice "
        "(llmux 0.7 silently used fifo for an unknown policy_type; write 'fifo' to keep that)"
    )


def test_unknown_keys_are_dropped_without_touching_the_callers_data():
    data = {"checkpoint": {"object_store": {"endpoint": "e", "bucket": "b", "acess_key": "k"}}}
    config = Config.from_dict(data)
    assert config.checkpoint.object_store.access_key is None
    assert data == {"checkpoint": {"object_store": {"endpoint": "e", "bucket": "b", "acess_key": "k"}}}


def test_metrics_port_on_the_listen_port_is_an_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"port": 3000, "metrics_port": 3000}')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (f"{path}: metrics_port: 3000 is the listen port, which serves /metrics already; "
                               "give metrics_port another port, or null")


def test_a_07_config_copied_to_llmux_yaml_is_read_as_07(tmp_path):
    path = tmp_path / "llmux.yaml"
    path.write_text(EVERY_KEY.read_text())
    config = load_config(str(path))
    assert config.listen == "127.0.0.1:3300" and config.models["tiny"].startup_timeout == 900.0
    assert str(config.models["tiny"].eviction) == "discard+keep_running"
