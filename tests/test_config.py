"""Configuration: what loads, what it means, and the exact message a person
gets for each mistake (``FILE: KEY.PATH: what was wrong; what is allowed``)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import textwrap

import pytest
import yaml

from llmuxd.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    GroupConfig,
    ModelConfig,
    PolicyConfig,
    load_config,
    parse_duration,
    parse_size,
    tensor_parallel_size_from_args,
)
from llmuxd.daemon.checkconfig import check_config, main as check_config_main
from llmuxd.errors import InvalidConfig
from llmuxd.eviction import DEFAULT_EVICTION, Eviction

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(__file__).resolve().parent / "data" / "config"
SHIPPED = ROOT / "etc" / "llmux" / "llmux.yaml"


def write(directory: pathlib.Path, name: str, text: str) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


# ------------------------------------------------------------- good files


def test_llmux_07_example_json_loads_unchanged():
    path = str(DATA / "llmux-0.7-example.json")
    config = load_config(path)
    assert config.sources == [path]
    assert config.listen == "127.0.0.1:3000"  # 0.7's port, bound to loopback
    assert list(config.models) == ["qwen-14b", "gemma-12b"]
    qwen, gemma = config.models["qwen-14b"], config.models["gemma-12b"]
    assert (qwen.name, qwen.model_path, qwen.port) == ("qwen-14b", "Qwen/Qwen3-14B", 8001)
    assert str(qwen.eviction) == "offload+keep_running"
    assert str(gemma.eviction) == "discard+checkpoint"
    assert gemma.port == 8002
    assert qwen.command == ["/opt/vllm/bin/vllm", "serve"]  # vllm_command
    assert qwen.extra_args == ["--gpu-memory-utilization", "0.9", "--max-model-len", "8192"]
    assert (config.metrics_port, config.admin_port) == (9090, 3001)
    assert config.checkpoint == CheckpointConfig(images_dir="/tmp/llmux-checkpoints")
    policy = config.policy
    assert policy.type == "cost_aware"
    assert (policy.request_timeout, policy.min_active, policy.max_wait) == (300.0, 5.0, 15.0)
    assert (policy.coalesce_window, policy.tick_interval, policy.min_quantum) == (2.0, 0.5, 2.0)
    assert policy.drain_before_switch is True and policy.amortization_factor == 0.5
    assert config.warmup is False


def test_llmux_06_sleep_level_json_loads():
    config = load_config(str(DATA / "llmux-0.6-sleep-level.json"))
    evictions = {name: str(m.eviction) for name, m in config.models.items()}
    assert evictions == {
        "llama-7b": "offload+keep_running",
        "mistral-7b": "discard+checkpoint",
        "tinyllama": "offload+keep_running",  # from policy.sleep_level
    }
    assert config.metrics_port is None  # 0 disabled metrics in 0.x


def test_json_model_without_eviction_keeps_07_default_retain_stop(tmp_path):
    path = write(tmp_path, "config.json", '{"models": {"m": {"model_path": "x", "port": 8001}}}')
    assert str(load_config(path).models["m"].eviction) == "retain+stop"


def test_json_model_without_eviction_gets_policy_eviction(tmp_path):
    path = write(
        tmp_path,
        "config.json",
        '{"models": {"m": {"model_path": "x", "port": 8001}},'
        ' "policy": {"eviction": {"weights": "discard", "process": "keep_running"}}}',
    )
    assert str(load_config(path).models["m"].eviction) == "discard+keep_running"


def test_yaml_model_without_eviction_gets_offload_keep_running(tmp_path):
    path = write(tmp_path, "llmux.yaml", "models: {m: {model_path: x}}")
    assert load_config(path).models["m"].eviction == DEFAULT_EVICTION


def test_json_detected_by_content(tmp_path):
    path = write(tmp_path, "llmux.conf", '{"models": {"m": {"model_path": "x", "port": 8001}}}')
    assert str(load_config(path).models["m"].eviction) == "retain+stop"


def test_full_yaml():
    config = load_config(str(DATA / "full.yaml"))
    assert config.listen == "0.0.0.0:4000" and config.listen_port == 4000
    assert config.port_range == (9100, 9199)
    assert config.max_body_bytes == 4 * 1024 * 1024
    assert (config.metrics_port, config.admin_port) == (9091, 9092)
    assert config.state_dir == "/srv/llmux" and config.user == "vllm"
    assert config.warmup is True and config.stop_backends_on_exit is True
    assert config.policy == PolicyConfig(
        type="time_slice",
        request_timeout=120,
        drain_before_switch=False,
        drain_timeout=30,
        min_active=1.5,
        coalesce_window=0.5,
        amortization_factor=0.25,
        max_wait=90,
        tick_interval=0.25,
        min_quantum=1,
        queue_limit=50,
        sleep_timeout=3600,
        wake_timeout=90,
        failure_backoff=0,
    )
    assert config.groups == {"default": GroupConfig(), "big": GroupConfig(budget_gib=80)}
    assert config.checkpoint == CheckpointConfig(images_dir="/srv/llmux/images", quota_gib=200)

    llama = config.models["llama-3.1-8b"]
    assert llama.port == 9101  # 9100 is qwen's
    assert llama.extra_args == ["--max-model-len", "8192", "--tensor-parallel-size=2"]
    assert llama.tensor_parallel_size == 2
    assert llama.env == {"HF_HOME": "/srv/hf", "VLLM_LOGGING_LEVEL": "DEBUG", "OMP_NUM_THREADS": "4"}
    assert (llama.gpus, llama.gpu_group, llama.gpu_memory_gib) == ([0, 1], "big", 40.0)
    assert str(llama.eviction) == "retain+keep_running"  # allowed: group has a budget

    qwen = config.models["qwen"]
    assert qwen.command == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert qwen.extra_args[:2] == ["--gpu-memory-utilization", "0.9"]  # YAML float made a string
    assert qwen.tensor_parallel_size == 4
    assert (qwen.startup_timeout, qwen.checkpoint_path, qwen.warmup_prompt) == (1200.0, "/srv/llmux/images/qwen", "Say hi")
    assert qwen.user is None and config.model_user("qwen") == "vllm"

    embed = config.models["embed"]
    assert embed.command == ["vllm", "serve"] and embed.host == "::1"
    assert str(embed.eviction) == "retain+stop" and embed.sleep_mode is False
    assert embed.port == 9102


def test_defaults_match_internals():
    config = Config.from_dict({"models": {"m": {"model_path": "org/m"}}})
    assert config.listen == "127.0.0.1:3000"
    assert config.port_range == (8100, 8999)
    assert config.max_body_bytes == 16 * 1024 * 1024
    assert (config.metrics_port, config.admin_port, config.checkpoint) == (None, None, None)
    assert config.state_dir == "/var/lib/llmux" and config.user == "llmux"
    assert config.warmup is False and config.stop_backends_on_exit is False
    assert config.groups == {"default": GroupConfig(budget_gib=None)}
    assert config.sources == ["<dict>"]
    assert config.policy == PolicyConfig(
        type="fifo", request_timeout=300, drain_before_switch=True, drain_timeout=60, min_active=5,
        coalesce_window=2, amortization_factor=0.5, max_wait=15, tick_interval=0.5, min_quantum=2,
        queue_limit=1000, sleep_timeout=120, wake_timeout=120, failure_backoff=2,
    )  # fmt: skip
    model = config.models["m"]
    assert model == ModelConfig(
        name="m", model_path="org/m", command=["vllm", "serve"], port=8100, host="127.0.0.1",
        eviction=DEFAULT_EVICTION, extra_args=[], env={}, gpu_group="default", gpu_memory_gib=None,
        gpus=[], checkpoint_path=None, startup_timeout=600, sleep_mode=True, user=None,
        warmup_prompt="Hello",
    )  # fmt: skip
    assert model.tensor_parallel_size == 1


def test_dropins_merge_in_name_order_later_wins():
    main = str(DATA / "dropins" / "llmux.yaml")
    dropins = DATA / "dropins" / "models.d"
    config = load_config(main)
    assert config.sources == [main, str(dropins / "10-beta.yaml"), str(dropins / "20-gamma.yaml"), str(dropins / "30-empty.yaml")]
    assert list(config.models) == ["alpha", "beta", "gamma"]
    beta = config.models["beta"]
    assert beta.model_path == "org/beta-v2"
    assert beta.eviction == DEFAULT_EVICTION  # replaced as a whole: main's discard is gone
    assert {n: m.port for n, m in config.models.items()} == {"alpha": 8101, "beta": 8102, "gamma": 8100}
    assert config.model_sources == {"alpha": main, "beta": str(dropins / "10-beta.yaml"), "gamma": str(dropins / "20-gamma.yaml")}
    assert config.notes == [f"models.beta: {dropins / '10-beta.yaml'} replaces the definition in {main}"]


def test_explicit_dropin_dir(tmp_path):
    main = write(tmp_path, "etc/llmux.yaml", "models: {}")
    write(tmp_path, "elsewhere/a.yaml", "models: {extra: {model_path: x}}")
    write(tmp_path, "etc/models.d/b.yaml", "models: {beside: {model_path: y}}")
    assert list(load_config(main, dropin_dir=str(tmp_path / "elsewhere")).models) == ["extra"]
    assert list(load_config(main).models) == ["beside"]


def test_shipped_conffile_is_valid_with_no_models():
    config = load_config(str(SHIPPED), dropin_dir=str(SHIPPED.parent / "does-not-exist"))
    assert config.models == {}
    assert config.policy.eviction == DEFAULT_EVICTION
    assert config.to_dict() == Config.from_dict({}).to_dict()  # it states the defaults


@pytest.mark.parametrize("schema", [Config, PolicyConfig, ModelConfig, GroupConfig, CheckpointConfig])
def test_shipped_conffile_documents_every_key(schema):
    text = SHIPPED.read_text()
    internal = {"name", "tensor_parallel_size", "sources", "model_sources", "notes", "warnings"}
    undocumented = [key for key in schema.__fields__ if key not in internal and f"{key}:" not in text]
    assert undocumented == []


def test_to_dict_is_json_and_round_trips():
    config = load_config(str(DATA / "full.yaml"))
    data = config.to_dict()
    json.dumps(data)
    assert data["models"]["qwen"]["eviction"] == "discard+checkpoint"
    assert "tensor_parallel_size" not in data["models"]["qwen"]
    again = Config.from_dict(data)
    assert again.to_dict() == data
    assert again.models == config.models


def test_ports_are_deterministic_and_skip_reserved_ones():
    data = {
        "listen": "127.0.0.1:8100",
        "metrics_port": 8102,
        "port_range": [8100, 8105],
        "models": {"a": {"model_path": "x"}, "b": {"model_path": "x", "port": 8101}, "c": {"model_path": "x"}},
    }
    ports = {name: m.port for name, m in Config.from_dict(data).models.items()}
    assert ports == {"a": 8103, "b": 8101, "c": 8104}
    assert ports == {name: m.port for name, m in Config.from_dict(data).models.items()}


def test_unix_listen_reserves_no_port():
    config = Config.from_dict({"listen": "unix:/run/llmux/llmux.sock", "models": {"a": {"model_path": "x"}}})
    assert config.listen_port is None and config.models["a"].port == 8100


@pytest.mark.parametrize(
    "args,size",
    [
        ([], 1),
        (["--tensor-parallel-size", "4"], 4),
        (["--tensor-parallel-size=2"], 2),
        (["-tp", "8"], 8),
        (["-tp=2", "--max-model-len", "4096"], 2),
        (["--tensor-parallel-size"], 1),  # dangling flag: vLLM itself will complain
    ],
)
def test_tensor_parallel_size_from_args(args, size):
    assert tensor_parallel_size_from_args(args) == size


@pytest.mark.parametrize("command,argv", [("vllm serve", ["vllm", "serve"]), ("'/opt/my vllm/bin/vllm' serve", ["/opt/my vllm/bin/vllm", "serve"]), (["python3", "-m", "sim"], ["python3", "-m", "sim"])])
def test_command_string_or_list(command, argv):
    config = Config.from_dict({"models": {"m": {"model_path": "x", "command": command}}})
    assert config.models["m"].command == argv


@pytest.mark.parametrize(
    "value,seconds",
    [(30, 30.0), (0.5, 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("500ms", 0.5), ("1m30s", 90.0), ("2", 2.0), ("0", 0.0), (" 10 s ", 10.0)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value,message",
    [
        (-1, "negative duration -1; durations must be 0 or more"),
        ("-5s", "negative duration '-5s'; durations must be 0 or more"),
        ("soon", "invalid duration 'soon'; write seconds as a number or a string like '500ms', '30s', '5m', '1h', '1m30s'"),
        ("5 minutes", "invalid duration '5 minutes'"),
        ("s", "invalid duration 's'"),
        (True, "expected a duration, got true"),
        (None, "expected a duration, got null"),
    ],
)
def test_bad_durations(value, message):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("value,size", [(1024, 1024), ("16MiB", 16 << 20), ("1GB", 10**9), ("512 KiB", 512 << 10), ("100", 100)])
def test_sizes(value, size):
    assert parse_size(value) == size


def test_config_error_is_invalid_config_and_lists_every_problem(tmp_path):
    path = write(tmp_path, "llmux.yaml", "listen: nowhere\nmodels: {m: {prot: 1}}\n")
    with pytest.raises(InvalidConfig) as info:
        load_config(path)
    assert isinstance(info.value, ConfigError)
    assert [str(i) for i in info.value.issues] == str(info.value).splitlines()
    assert str(info.value).splitlines() == [
        f"{path}: listen: invalid listen address 'nowhere'; write 'HOST:PORT' (e.g. '127.0.0.1:3000', '[::1]:3000') or 'unix:/absolute/path'",
        f"{path}: models.m.model_path: required key is missing; give a Hugging Face model id or a local directory",
    ]
    # the unknown key beside the errors often explains one of them
    assert [str(w) for w in info.value.warnings] == [f"{path}: models.m.prot: unknown key, ignored; did you mean 'port'?"]


# -------------------------------------------------------------- bad files

_M = "models:\n  m:\n    model_path: org/m\n"  # a valid model to build on

BAD_YAML = [
    # (id, file text, expected message after "FILE: ")
    ("yaml-syntax", "models:\n  m:\n    model_path: x\n   port: 1\n",
     "line 4, column 4: invalid YAML: expected <block end>, but found '<block mapping start>'; check the indentation and quoting there"),
    ("yaml-duplicate-key", _M + "    port: 8001\n    port: 8002\n",
     "line 5, column 5: invalid YAML: key 'port' is given twice; remove one"),
    ("not-a-mapping", "- models\n",
     "expected a mapping of keys (listen, models, policy, ...), got a list"),
    ("missing-model-path", "models:\n  m:\n    port: 8001\n",
     "models.m.model_path: required key is missing; give a Hugging Face model id or a local directory"),
    ("model-without-settings", "models:\n  m:\n",
     "models.m: has no settings; give at least model_path"),
    ("model-path-number", "models:\n  m:\n    model_path: 7\n",
     "models.m.model_path: expected a string, got 7; quote it"),
    ("port-string", _M + "    port: '8001'\n",
     "models.m.port: expected a whole number, got '8001'"),
    ("port-range", _M + "    port: 70000\n",
     "models.m.port: port 70000 is out of range; use 1-65535"),
    ("bool-wrong", _M + "    sleep_mode: yes please\n",
     "models.m.sleep_mode: expected true or false, got 'yes please'"),
    ("list-wrong", _M + "    gpus: 0\n",
     "models.m.gpus: expected a list, got 0"),
    ("env-bad-name", _M + "    env: {1X: y}\n",
     "models.m.env.1X: invalid environment variable name; use letters, digits and '_', not starting with a digit"),
    ("extra-args-unsplittable", _M + "    extra_args: --x 'y\n",
     "models.m.extra_args: cannot split \"--x 'y\" into arguments (No closing quotation); use a list"),
    ("extra-args-mapping-item", _M + "    extra_args: [--x, {a: 1}]\n",
     "models.m.extra_args[1]: expected a string, got a mapping; quote it"),
    ("tp-not-a-number", _M + "    extra_args: [-tp, two]\n",
     "models.m.extra_args: -tp must be a whole number of GPUs (1 or more), got 'two'"),
    ("tp-key", _M + "    tensor_parallel_size: 2\n",
     "models.m.tensor_parallel_size: is read from extra_args; write '--tensor-parallel-size N' in extra_args instead"),
    ("empty-command", _M + "    command: []\n",
     "models.m.command: command is empty; give the program, e.g. ['vllm', 'serve']"),
    ("negative-duration", _M + "    startup_timeout: -5m\n",
     "models.m.startup_timeout: negative duration '-5m'; durations must be 0 or more"),
    ("zero-timeout", "policy:\n  request_timeout: 0\n",
     "policy.request_timeout: must be more than 0, got 0; write seconds as a number or a string like '500ms', '30s', '5m', '1h', '1m30s'"),
    ("bad-duration", "policy:\n  max_wait: soon\n",
     "policy.max_wait: invalid duration 'soon'; write seconds as a number or a string like '500ms', '30s', '5m', '1h', '1m30s'"),
    ("amortization", "policy:\n  amortization_factor: -0.5\n",
     "policy.amortization_factor: must be 0 or more, got -0.5"),
    ("queue-limit", "policy:\n  queue_limit: 0\n",
     "policy.queue_limit: must be 1 or more, got 0"),
    ("policy-type", "policy:\n  type: lifo\n",
     "policy.type: unknown policy 'lifo'; allowed: fifo, cost_aware, time_slice (llmux 0.7 silently used fifo for an unknown policy_type; write 'fifo' to keep that)"),
    ("legacy-and-new-key", "policy:\n  request_timeout: 10\n  request_timeout_secs: 10\n",
     "policy.request_timeout_secs: given together with 'request_timeout'; keep only 'request_timeout'"),
    ("legacy-ms-negative", "policy:\n  tick_interval_ms: -500\n",
     "policy.tick_interval_ms: negative duration -500; durations must be 0 or more"),
    ("port-and-listen", "port: 3000\nlisten: 127.0.0.1:3000\n",
     "port: given together with 'listen'; keep only 'listen' (port is llmux 0.7's spelling)"),
    ("bad-listen", "listen: localhost\n",
     "listen: invalid listen address 'localhost'; write 'HOST:PORT' (e.g. '127.0.0.1:3000', '[::1]:3000') or 'unix:/absolute/path'"),
    ("port-range-reversed", "port_range: [9000, 8000]\n",
     "port_range: port_range 9000-8000 is empty; write [LOW, HIGH] with LOW <= HIGH"),
    ("port-range-one", "port_range: [9000]\n",
     "port_range: expected a list of two port numbers [LOW, HIGH]"),
    ("port-range-full", "port_range: 8100-8100\nmodels:\n  a: {model_path: x}\n  b: {model_path: x}\n",
     "models.b.port: no free port left in port_range 8100-8100; widen port_range or set port"),
    ("size", "max_body_bytes: 16 megs\n",
     "max_body_bytes: invalid size '16 megs'; write a number of bytes or a string like '16MiB', '512KiB', '1GB'"),
    ("duplicate-ports", "models:\n  a: {model_path: x, port: 8001}\n  b: {model_path: y, port: 8001}\n",
     "models.b.port: port 8001 is also used by model 'a'; give each model its own port, or omit port to pick a free one from port_range"),
    ("listen-port-clash", "listen: 0.0.0.0:8001\nmodels:\n  a: {model_path: x, port: 8001}\n",
     "models.a.port: port 8001 is the listen port; give each model its own port, or omit port to pick a free one from port_range"),
    ("admin-port-clash", "admin_port: 8001\nmodels:\n  a: {model_path: x, port: 8001}\n",
     "models.a.port: port 8001 is admin_port; give each model its own port, or omit port to pick a free one from port_range"),
    ("name-with-slash", "models:\n  org/model: {model_path: x}\n",
     "models.org/model: invalid model name 'org/model': use 1-64 characters from A-Z a-z 0-9 . _ : @ + -, starting with a letter or digit, without '..' (no '/', spaces or other characters: the name becomes a unit name, a D-Bus path, a metric label and a directory)"),
    ("name-with-space", "models:\n  my model: {model_path: x}\n",
     "models.my model: invalid model name 'my model': use 1-64 characters"),
    ("name-unicode", "models:\n  modèle: {model_path: x}\n",
     "models.modèle: invalid model name 'modèle': use 1-64 characters"),
    ("name-dotdot", "models:\n  a..b: {model_path: x}\n",
     "models.a..b: invalid model name 'a..b': use 1-64 characters"),
    ("name-number", "models:\n  7: {model_path: x}\n",
     "models.7: model name must be a string, not int; 1-64 characters"),
    ("name-mismatch", "models:\n  a: {model_path: x, name: b}\n",
     "models.a.name: is 'b' but the model's key is 'a'; remove 'name' (the key is the name)"),
    ("eviction-unknown", _M + "    eviction: offload+sleep\n",
     "models.m.eviction: unknown process strategy 'sleep'; allowed: keep_running, freeze, cuda_suspend, checkpoint, stop"),
    ("eviction-level", _M + "    eviction: 7\n",
     "models.m.eviction: legacy eviction level 7 does not exist; use 1-5 or write 'WEIGHTS+PROCESS'"),
    ("policy-eviction", "policy:\n  eviction: nap\n",
     "policy.eviction: invalid eviction 'nap'; write 'WEIGHTS+PROCESS'"),
    ("inherited-eviction", "policy:\n  eviction: discard+checkpoint\n" + _M,
     "policy.eviction: 'discard+checkpoint' (the eviction of model 'm', which sets none) needs a top-level 'checkpoint:' section; add 'checkpoint: {}' for the defaults or choose another process strategy"),
    ("checkpoint-without-section", _M + "    eviction: discard+checkpoint\n",
     "models.m.eviction: 'discard+checkpoint' needs a top-level 'checkpoint:' section; add 'checkpoint: {}' for the defaults or choose another process strategy"),
    ("checkpoint-path-without-section", _M + "    checkpoint_path: /srv/img\n",
     "models.m.checkpoint_path: needs a top-level 'checkpoint:' section; add 'checkpoint: {}' for the defaults or remove checkpoint_path"),
    ("object-store-without-endpoint", "checkpoint:\n  object_store: {bucket: b}\n",
     "checkpoint.object_store.endpoint: required key is missing"),
    ("undefined-group", _M + "    gpu_group: big\n",
     "models.m.gpu_group: group 'big' is not defined; define it under 'groups:' or use one of: default"),
    ("over-budget", "groups: {big: {budget_gib: 80}}\n" + _M + "    gpu_group: big\n    gpu_memory_gib: 96\n",
     "models.m.gpu_memory_gib: 96 GiB is more than the budget_gib 80 of group 'big'; lower it or raise the budget"),
    ("budget-needs-memory", "groups: {big: {budget_gib: 80}}\n" + _M + "    gpu_group: big\n",
     "models.m.gpu_memory_gib: required in group 'big', which has budget_gib 80; give the GiB the model needs awake"),
    ("budget-negative", "groups: {big: {budget_gib: -1}}\n",
     "groups.big.budget_gib: must be more than 0, got -1"),
    ("managed-flag", _M + "    extra_args: [--port, '9000']\n",
     "models.m.extra_args: '--port' is set by llmux; remove it and use the model's 'port' key"),
    ("managed-flag-equals", _M + "    extra_args: [--enable-sleep-mode=true]\n",
     "models.m.extra_args: '--enable-sleep-mode' is set by llmux; remove it and use the model's 'sleep_mode' key"),
    ("too-few-gpus", _M + "    extra_args: [-tp, '2']\n    gpus: [3]\n",
     "models.m.gpus: lists 1 GPU(s) but extra_args ask for tensor parallel size 2; list at least that many GPUs or leave gpus empty"),
    ("models-list", "models: [a, b]\n",
     "models: expected a mapping of model name to settings, got a list"),
    ("policy-list", "policy: [fifo]\n",
     "policy: expected a mapping (key: value), got a list"),
]


@pytest.mark.parametrize("text,message", [case[1:] for case in BAD_YAML], ids=[case[0] for case in BAD_YAML])
def test_bad_yaml_says_file_key_and_fix(tmp_path, text, message):
    path = write(tmp_path, "llmux.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: {message}")


BAD_JSON = [
    ("json-syntax", '{\n  "models": {\n    "m": {"model_path": "x",}\n  }\n}\n',
     "line 3, column 29: invalid JSON: Expecting property name enclosed in double quotes"),
    ("json-policy-type", '{"policy": {"policy_type": "round_robin"}}',
     "policy.policy_type: unknown policy 'round_robin'; allowed: fifo, cost_aware, time_slice (llmux 0.7 silently used fifo for an unknown policy_type; write 'fifo' to keep that)"),
    ("json-zero-request-timeout", '{"policy": {"request_timeout_secs": 0}}',
     "policy.request_timeout_secs: 0 would turn away every request that has to wait for a switch (llmux 0.7 answered 504 to all of them but the one that started the switch); give the seconds a request may wait for its model, e.g. 300 (0.7's default)"),
    ("json-startup-timeout-string", '{"startup_timeout_secs": "10m"}',
     "startup_timeout_secs: expected a number of seconds, got '10m'"),
    ("json-ms-string", '{"policy": {"coalesce_window_ms": "2s"}}',
     "policy.coalesce_window_ms: expected a number of milliseconds, got '2s'"),
    ("json-eviction-object", '{"models": {"m": {"model_path": "x", "port": 8001, "eviction": {"weights": "offload"}}}}',
     "models.m.eviction: eviction is missing ['process']"),
    ("json-checkpoint-path", '{"models": {"m": {"model_path": "x", "port": 8001, "checkpoint_path": "/img"}}}',
     "models.m.checkpoint_path: needs a top-level 'checkpoint:' section"),
    ("json-vllm-command", '{"vllm_command": ["vllm"]}',
     "vllm_command: expected the vLLM program as a string, got a list"),
]


@pytest.mark.parametrize("text,message", [case[1:] for case in BAD_JSON], ids=[case[0] for case in BAD_JSON])
def test_bad_json_says_file_key_and_fix(tmp_path, text, message):
    path = write(tmp_path, "config.json", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_errors_and_warnings_in_a_dropin_name_the_dropin(tmp_path):
    main = write(tmp_path, "llmux.yaml", "models:\n  a: {model_path: x, port: 8001}\n")
    dropin = write(tmp_path, "models.d/50-b.yaml", "models:\n  b: {model_path: y, port: '8002', evicton: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value).splitlines() == [
        f"{dropin}: models.b.port: expected a whole number, got '8002'"
    ]
    assert [str(w) for w in info.value.warnings] == [f"{dropin}: models.b.evicton: unknown key, ignored; did you mean 'eviction'?"]


def test_cross_file_port_clash_names_both_models(tmp_path):
    main = write(tmp_path, "llmux.yaml", "models:\n  a: {model_path: x, port: 8001}\n")
    dropin = write(tmp_path, "models.d/50-b.yaml", "models:\n  b: {model_path: y, port: 8001}\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value) == (
        f"{dropin}: models.b.port: port 8001 is also used by model 'a'; give each model its own port, "
        "or omit port to pick a free one from port_range"
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("models: [x]\n", "models: expected a mapping of model name to settings, got a list"),
        ("models:\n  a: {model_path: x\n", "line 3, column 1: invalid YAML: expected ',' or '}', but got '<stream end>'; check the indentation and quoting there"),
    ],
)
def test_bad_dropin_files(tmp_path, text, message):
    main = write(tmp_path, "llmux.yaml", "models: {}\n")
    dropin = write(tmp_path, "models.d/10-x.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert str(info.value) == f"{dropin}: {message}"


# ----------------------------------------------------------- check-config


def test_check_config_prints_effective_yaml():
    out, err = io.StringIO(), io.StringIO()
    path = str(DATA / "llmux-0.7-example.json")
    assert check_config(path, stdout=out, stderr=err) == 0
    admin, images = err.getvalue().splitlines()  # the two warnings
    assert admin.startswith(f"warning: {path}: admin_port: not opened: ")
    assert images.startswith(f"warning: {path}: checkpoint.images_dir: '/tmp/llmux-checkpoints' is under /tmp, which "
                             "llmuxd.service sees as its own private /tmp (PrivateTmp=yes)")
    text = out.getvalue()
    assert text.startswith(f"# effective configuration, read from:\n#   {path}\n")
    effective = yaml.safe_load(text)
    assert effective == load_config(path).to_dict()
    assert effective["models"]["gemma-12b"]["eviction"] == "discard+checkpoint"


def test_check_config_prints_errors_and_fails(tmp_path):
    path = write(tmp_path, "llmux.yaml", "models:\n  qwen:\n    model_pth: x\n")
    out, err = io.StringIO(), io.StringIO()
    assert check_config(path, stdout=out, stderr=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == (
        f"{path}: models.qwen.model_path: required key is missing; give a Hugging Face model id or a local directory\n"
        f"warning: {path}: models.qwen.model_pth: unknown key, ignored; did you mean 'model_path'?\n"
        "1 problem(s); nothing was changed\n"
    )


def test_check_config_shows_notes_on_stderr(capsys):
    assert check_config_main([str(DATA / "dropins" / "llmux.yaml")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: models.beta: ")
    assert "gamma:" in captured.out


def test_check_config_module_runs(tmp_path):
    import subprocess
    import sys

    bad = write(tmp_path, "llmux.yaml", "modles: {}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "llmuxd.daemon.checkconfig", "--strict", bad], capture_output=True, text=True,
        env=env, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"{bad}: modles: unknown key, ignored; did you mean 'models'?"


def test_evictions_are_eviction_objects():
    config = Config.from_dict({"models": {"m": {"model_path": "x", "eviction": {"weights": "discard", "process": "freeze"}}}})
    assert isinstance(config.models["m"].eviction, Eviction)
    assert config.models["m"].eviction.sleep_level == 2


def test_tensor_parallel_suspend_without_eager_is_noted():
    data = {
        "checkpoint": {},
        "models": {
            "big": {"model_path": "x", "eviction": "retain+cuda_suspend", "extra_args": ["-tp", "2"]},
            "ok": {"model_path": "y", "eviction": "discard+checkpoint", "extra_args": ["-tp", "2", "--enforce-eager", "--disable-custom-all-reduce"]},
        },
    }
    assert Config.from_dict(data).notes == [
        "models.big: tensor parallel 2 with 'retain+cuda_suspend' usually needs --enforce-eager and "
        "--disable-custom-all-reduce in extra_args"
    ]


@pytest.mark.parametrize(
    "legacy,key,value",
    [
        ({"port": 3100}, "listen", "127.0.0.1:3100"),
        ({"metrics_port": 0}, "metrics_port", None),
        ({"policy": {"policy_type": "time_slice"}}, "policy.type", "time_slice"),
        ({"policy": {"request_timeout_secs": 60}}, "policy.request_timeout", 60.0),
        ({"policy": {"min_active_secs": 1}}, "policy.min_active", 1.0),
        ({"policy": {"coalesce_window_ms": 250}}, "policy.coalesce_window", 0.25),
        ({"policy": {"max_wait_secs": 30}}, "policy.max_wait", 30.0),
        ({"policy": {"tick_interval_ms": 100}}, "policy.tick_interval", 0.1),
        ({"policy": {"min_quantum_ms": 1500}}, "policy.min_quantum", 1.5),
        ({"policy": {"sleep_level": 2}}, "policy.eviction", Eviction.parse("discard+keep_running")),
    ],
)
def test_llmux_07_keys_are_accepted_in_yaml_too(legacy, key, value):
    config = Config.from_dict(legacy)
    target = config
    for part in key.split("."):
        target = getattr(target, part)
    assert target == value


def test_to_dict_keeps_user_keys_that_look_internal():
    config = Config.from_dict({"models": {"m": {"model_path": "x", "env": {"name": "kept"}}}})
    assert config.to_dict()["models"]["m"]["env"] == {"name": "kept"}
    assert list(config.to_dict())[:3] == ["listen", "models", "policy"]


def test_sleep_mode_off_with_a_sleeping_eviction_is_allowed_and_noted():
    """vLLM's CPU build rejects --enable-sleep-mode but still pauses on /sleep."""
    config = Config.from_dict({"models": {"m": {"model_path": "x", "sleep_mode": False}}})
    assert config.models["m"].sleep_mode is False
    assert config.notes == [
        "models.m: sleep_mode is false, so 'offload+keep_running' only pauses vLLM's scheduler "
        "(CPU builds) and frees no memory; on a GPU the sleep fails and llmux stops the model instead"
    ]
