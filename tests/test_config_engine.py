"""`engine: openai` in the configuration: what loads, what it means, and the one-line
error (``FILE: KEY: what; what is allowed``) for each mistake a llama.cpp / SGLang / Ollama
user can make."""

from __future__ import annotations

import asyncio
import io
import textwrap

import pytest

from fakes import FakeBackends, make_config, virtual
from llmuxd.config import ConfigError, load_config
from llmuxd.daemon.checkconfig import check_config
from llmuxd.engine import ENGINES
from llmuxd.errors import InvalidEviction
from llmuxd.eviction import ENGINE_WEIGHTS, STOP_EVICTION, Eviction, WeightStrategy
from llmuxd.orchestrator import backend_argv
from llmuxd.switcher import Switcher

LLAMA_SERVER = '[llama-server, -m, "${MODEL_PATH}", --host, "${HOST}", --port, "${PORT}", -a, "${MODEL_ID}"]'


def write(tmp_path, text: str) -> str:
    path = tmp_path / "llmux.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def smol(tmp_path, *lines: str, command: str = LLAMA_SERVER, policy: str = "") -> str:
    body = "".join(f"    {line}\n" for line in lines)
    return write(tmp_path, f"{policy}models:\n  smol:\n    engine: openai\n    model_path: /m/smol.gguf\n"
                           f"    port: 8101\n    command: {command}\n{body}")


CAN = "retain+freeze, retain+cuda_suspend, retain+checkpoint, retain+stop"

BAD = [
    # (id, extra model lines, command, expected message after "FILE: ")
    ("offload", ["eviction: offload+keep_running"], LLAMA_SERVER,
     "models.smol.eviction: model 'smol' runs engine 'openai', which cannot offload its weights "
     f"(that needs vLLM's sleep endpoints); it can do: {CAN}"),
    ("discard-freeze", ["eviction: discard+freeze"], LLAMA_SERVER,
     "models.smol.eviction: model 'smol' runs engine 'openai', which cannot discard its weights "
     f"(that needs vLLM's sleep endpoints); it can do: {CAN}"),
    ("legacy-level-1", ["eviction: 1"], LLAMA_SERVER,
     "models.smol.eviction: model 'smol' runs engine 'openai', which cannot offload its weights"),
    ("unknown-engine", ["eviction: retain+stop"], LLAMA_SERVER, None),  # engine replaced below
    ("no-port", ["eviction: retain+stop"], '[llama-server, -m, "${MODEL_PATH}"]',
     "models.smol.command: engine 'openai' runs the command as written, so it must say where the server "
     "listens: put ${PORT} in it (e.g. '--port', '${PORT}'), llmux fills in the model's port"),
    ("unknown-placeholder", ["eviction: retain+stop"], '[llama-server, -m, "${MODEL}", --port, "${PORT}"]',
     "models.smol.command: unknown placeholder ${MODEL}; allowed: ${PORT}, ${HOST}, ${MODEL_PATH}, ${MODEL_ID}"),
]


@pytest.mark.parametrize("lines,command,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_openai_model_is_one_line_with_file_and_key(tmp_path, lines, command, message):
    path = smol(tmp_path, *lines, command=command)
    if message is None:  # an engine llmux does not know
        text = open(path).read().replace("engine: openai", "engine: llamacpp")
        open(path, "w").write(text)
        message = "models.smol.engine: unknown engine 'llamacpp'; allowed: vllm, openai"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines_out = str(info.value).splitlines()
    assert len(lines_out) == 1, lines_out
    assert lines_out[0].startswith(f"{path}: {message}")


def test_check_config_refuses_offload_for_openai_naming_model_and_strategies(tmp_path):
    path = smol(tmp_path, "eviction: offload+freeze")
    out, err = io.StringIO(), io.StringIO()
    assert check_config(path, stdout=out, stderr=err) == 1
    assert err.getvalue().splitlines() == [
        f"{path}: models.smol.eviction: model 'smol' runs engine 'openai', which cannot offload its weights "
        f"(that needs vLLM's sleep endpoints); it can do: {CAN}",
        "1 problem(s); nothing was changed",
    ]


@pytest.mark.parametrize("eviction", ["retain+freeze", "retain+cuda_suspend", "retain+stop"])
def test_process_level_evictions_load(tmp_path, eviction):
    model = load_config(smol(tmp_path, f"eviction: {eviction}")).models["smol"]
    assert (model.engine, str(model.eviction)) == ("openai", eviction)


def test_checkpoint_loads_with_a_checkpoint_section(tmp_path):
    path = smol(tmp_path, "eviction: retain+checkpoint", policy="checkpoint: {}\n")
    assert str(load_config(path).models["smol"].eviction) == "retain+checkpoint"


@pytest.mark.parametrize("policy", ["", "policy:\n  eviction: offload+freeze\n"])
def test_inherited_eviction_the_engine_cannot_do_becomes_retain_stop_with_a_note(tmp_path, policy):
    config = load_config(smol(tmp_path, policy=policy))
    assert config.models["smol"].eviction == STOP_EVICTION
    assert [n for n in config.notes if n.startswith("models.smol: engine 'openai' cannot do policy.eviction")]


def test_inherited_eviction_the_engine_can_do_is_kept(tmp_path):
    config = load_config(smol(tmp_path, policy="policy:\n  eviction: retain+freeze\n"))
    assert str(config.models["smol"].eviction) == "retain+freeze"
    assert not [n for n in config.notes if "engine" in n]


def test_vllm_is_the_default_engine_and_keeps_its_evictions(tmp_path):
    path = write(tmp_path, "models:\n  q:\n    model_path: Qwen/Qwen3-0.6B\n    eviction: discard+freeze\n")
    model = load_config(path).models["q"]
    assert (model.engine, str(model.eviction)) == ("vllm", "discard+freeze")


def test_openai_command_is_run_as_written_with_placeholders_filled(tmp_path):
    model = load_config(smol(tmp_path, "eviction: retain+stop", "extra_args: [-c, '2048']")).models["smol"]
    assert backend_argv(model) == ["llama-server", "-m", "/m/smol.gguf", "--host", "127.0.0.1", "--port", "8101",
                                   "-a", "smol", "-c", "2048"]


def test_openai_port_flag_is_not_refused_as_managed(tmp_path):
    """vLLM's --port is llmux's to set; an openai command must name it itself."""
    assert load_config(smol(tmp_path, "eviction: retain+stop")).models["smol"].port == 8101


def test_llama_cpp_python_without_interrupt_setting_is_noted(tmp_path):
    command = '[python3, -m, llama_cpp.server, --model, "${MODEL_PATH}", --port, "${PORT}"]'
    config = load_config(smol(tmp_path, "eviction: retain+stop", command=command))
    assert any("--interrupt_requests False" in n for n in config.notes), config.notes
    quiet = load_config(smol(tmp_path, "eviction: retain+stop", "extra_args: [--interrupt_requests, 'False']",
                             command=command))
    assert not any("interrupt_requests" in n for n in quiet.notes)


def test_engine_round_trips_through_to_dict(tmp_path):
    config = load_config(smol(tmp_path, "eviction: retain+freeze"))
    assert config.to_dict()["models"]["smol"]["engine"] == "openai"


@pytest.mark.parametrize("engine", sorted(ENGINE_WEIGHTS))
def test_each_engine_client_declares_what_check_config_enforces(engine):
    assert ENGINES[engine].weight_strategies == ENGINE_WEIGHTS[engine]
    assert (WeightStrategy.OFFLOAD in ENGINES[engine].weight_strategies) == (engine == "vllm")
    assert Eviction.parse("retain+stop").weights in ENGINES[engine].weight_strategies


# ------------------------------------------------------------------ at run time (SetEviction)


@virtual
async def test_runtime_eviction_override_refuses_what_the_engine_cannot_do():
    """SetEviction / Sleep with an eviction go through the switcher: an openai model's
    offload is refused there (400, InvalidEviction) before any backend is touched."""
    llama = {"engine": "openai", "eviction": "retain+stop", "port": 8101,
             "command": ["llama-server", "--port", "${PORT}"]}
    config = make_config({"a": llama, "b": {}}, policy={"min_active": 0})
    backends = FakeBackends(config)
    switcher = Switcher(config, backends, clock=asyncio.get_running_loop().time)
    await switcher.start()
    with pytest.raises(InvalidEviction) as info:
        switcher.set_eviction("a", "offload+keep_running")
    assert info.value.http_status == 400
    assert str(info.value).startswith("model 'a' runs engine 'openai', which cannot offload its weights")
    (await switcher.acquire("a")).release()
    with pytest.raises(InvalidEviction, match="cannot discard"):
        await switcher.sleep_model("a", "discard+freeze")
    assert not [c for c in backends.calls if c[0] == "sleep"]
    switcher.set_eviction("a", "retain+freeze")
    switcher.set_eviction("b", "offload+freeze")  # vLLM can
    (await switcher.acquire("b")).release()
    assert ("sleep", "a", "retain+freeze") in backends.calls
