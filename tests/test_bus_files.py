"""The files shipped in dbus/: introspection XML equal to what the code
exports, a bus policy that works on Debian's own system bus configuration
and opens nothing else, the activation file, and the polkit actions."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from llmuxd.bus.auth import ACTIONS
from llmuxd.bus.introspection import shipped_files
from llmuxd.names import BUS_NAME
from test_bus_support import NOBODY, PrivateBus, call_as, start_service

DBUS_DIR = Path(__file__).resolve().parent.parent / "dbus"
SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")


@pytest.mark.parametrize("name", sorted(shipped_files()))
def test_shipped_introspection_equals_the_code(name):
    shipped = (DBUS_DIR / name).read_text()
    assert shipped == shipped_files()[name], (
        f"dbus/{name} is stale; regenerate it with: python -m llmuxd.bus.introspection dbus"
    )
    ET.fromstring(shipped.split("\n", 2)[2])  # well-formed after the DOCTYPE


def test_bus_policy_names_a_destination_in_every_rule():
    root = ET.parse(DBUS_DIR / f"{BUS_NAME}.conf").getroot()
    policies = {(p.get("user"), p.get("context")): p for p in root.findall("policy")}
    assert set(policies) == {("root", None), (None, "default")}
    assert [r.attrib for r in policies[("root", None)]] == [
        {"own": BUS_NAME},
        {"send_destination": BUS_NAME},
    ]
    default_rules = list(policies[(None, "default")])
    assert all(r.tag == "allow" and r.get("send_destination") == BUS_NAME for r in default_rules)
    assert {r.get("send_interface") for r in default_rules} == {
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Peer",
        "org.freedesktop.DBus.Properties",
        "org.freedesktop.DBus.ObjectManager",
        "io.llmux.LLMux1.Manager",
        "io.llmux.LLMux1.Model",
    }
    assert not any(r.get("own") for r in default_rules)


def test_activation_file():
    path = DBUS_DIR / f"{BUS_NAME}.service"
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read(path)
    section = dict(parser["D-BUS Service"])
    assert section == {
        "Name": path.stem,  # dbus-daemon (and lintian) require file name == Name=
        "Exec": "/bin/false",
        "User": "root",
        "SystemdService": "dbus-io.llmux.LLMux1.service",
    }


def test_polkit_actions_match_the_code():
    root = ET.parse(DBUS_DIR / f"{BUS_NAME}.policy").getroot()
    actions = {a.get("id"): a for a in root.findall("action")}
    assert set(actions) == set(ACTIONS)
    for action in actions.values():
        assert action.findtext("description") and action.findtext("message")
        defaults = {d.tag: d.text for d in action.find("defaults")}
        assert defaults == {k: "auth_admin_keep" for k in ("allow_any", "allow_inactive", "allow_active")}


def debian_system_bus_config(include: Path) -> str:
    """Debian's own /usr/share/dbus-1/system.conf (deny by default), made to
    run privately: no user switch, fork, pid file, syslog or standard dirs,
    our policy as the only include."""
    text = SYSTEM_CONF.read_text()
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for pattern in (
        r"<user>.*?</user>", r"<fork/>", r"<standard_system_servicedirs/>", r"<servicehelper>.*?</servicehelper>",
        r"<pidfile>.*?</pidfile>", r"<syslog/>", r"<includedir>.*?</includedir>", r"<include[ >].*?</include>",
    ):
        text = re.sub(pattern, "", text, flags=re.S)
    text = re.sub(r"<listen>.*?</listen>", "<listen>unix:tmpdir=/tmp</listen>", text, flags=re.S)
    assert '<deny send_type="method_call"/>' in text and '<deny own="*"/>' in text
    return text.replace("</busconfig>", f"<include>{include}</include>\n</busconfig>")


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_CONF.exists(),
    reason="needs root, setpriv and Debian's system bus configuration",
)
async def test_bus_policy_on_debians_system_bus():
    bus = PrivateBus("system", config=debian_system_bus_config(DBUS_DIR / f"{BUS_NAME}.conf"))
    try:
        running = await start_service(bus.address)  # as root: may own the name
        try:
            # anyone may read
            got = await call_as(NOBODY, bus.address, "GetStatus")
            assert got["ok"][0]["state"] == "idle"
            got = await call_as(
                NOBODY, bus.address, "Get", "ss", ["io.llmux.LLMux1.Manager", "Version"],
                interface="org.freedesktop.DBus.Properties",
            )
            assert got == {"ok": ["0.1.0-test"]}
            # and reach the daemon's methods (polkit decides there; none here)
            got = await call_as(NOBODY, bus.address, "Pin", "s", ["llama"])
            assert got["error"] == "org.freedesktop.DBus.Error.AccessDenied"
            assert "polkit is not running" in got["message"]
            # but not another interface on our name
            got = await call_as(NOBODY, bus.address, "Anything", interface="org.example.Other")
            assert got["error"] == "org.freedesktop.DBus.Error.AccessDenied"
            assert "rejected" in got["message"].lower()
            # and may not own our name
            got = await call_as(
                NOBODY, bus.address, "RequestName", "su", [BUS_NAME, 4],
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
            )
            assert got["error"] == "org.freedesktop.DBus.Error.AccessDenied"
        finally:
            await running.close()
    finally:
        bus.close()
