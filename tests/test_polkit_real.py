"""Authorization by the real polkitd (Debian's polkitd 122) in the test systemd.

test_bus_auth.py drives the authorizer against dbusmock's polkitd; here the
real one decides. Inside the test systemd (tests/sysd) run llmuxd.service as
in test_service_bus.py and polkit.service from the host's polkitd package,
with the shipped dbus/io.llmux.LLMux1.policy installed. Callers run inside
the test systemd's namespaces (so polkitd can look their processes up) as
two throwaway users: one in the group `llmux`, one not.

Nothing on the host changes: the test systemd has a mount namespace of its
own, and there (only) a private actions directory, rules directory,
/etc/passwd and /etc/group are bind-mounted over the host's; they go away
with the test systemd.

What a user sees: without rights, Switch/Pin/Reload are refused
(AccessDenied from busctl, which allows interactive authorization and finds
no agent; InteractiveAuthorizationRequired for a caller that does not, e.g.
dbus-send) while properties and GetStatus stay readable; a rules.d rule for
the group lets its member switch; root passes even when a rule says no to
everyone (llmuxd does not ask polkit about uid 0). The scenarios run in file
order on one daemon.
"""

from __future__ import annotations

import grp
import json
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sysd.testbed import unavailable_reason
from test_bus_support import CLIENT
from test_service import BUS_NAME, MANAGER, ROOT, ServiceBed, boot_from_tree, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.polkit, pytest.mark.slow]

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_UNIT = Path("/lib/systemd/system/polkit.service")
ACTIONS_DIR = "/usr/share/polkit-1/actions"
RULES_DIR = "/etc/polkit-1/rules.d"
GROUP = "llmux"
MEMBER = "llmux-pk-member"  # in GROUP
STRANGER = "llmux-pk-stranger"  # in no group that polkit knows
INSIDE_BUS = "unix:path=/run/dbus/system_bus_socket"  # the test bus, as seen inside
DENIED = "org.freedesktop.DBus.Error.AccessDenied"
CHALLENGE = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
CONTROL, RELOAD = "io.llmux.LLMux1.control", "io.llmux.LLMux1.reload"
#: the rule the shipped .policy file documents, for the group `llmux`
GROUP_RULE = """polkit.addRule(function(action, subject) {
    if (action.id.indexOf("io.llmux.LLMux1.") == 0 && subject.isInGroup("llmux"))
        return polkit.Result.YES;
});
"""
NOBODY_RULE = """polkit.addRule(function(action, subject) {
    if (action.id.indexOf("io.llmux.LLMux1.") == 0)
        return polkit.Result.NO;
});
"""


def why_not() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    if not POLKITD.exists() or not POLKIT_UNIT.exists():
        return "polkitd is not installed (apt install polkitd; scripts/install-test-deps does)"
    if shutil.which("setpriv") is None:
        return "setpriv is missing (apt install util-linux)"
    return None


def _free_ids(count: int, start: int = 61000) -> list[int]:
    """Numbers that are neither a uid nor a gid on this machine."""
    found: list[int] = []
    n = start
    while len(found) < count:
        try:
            pwd.getpwuid(n)
        except KeyError:
            try:
                grp.getgrgid(n)
            except KeyError:
                found.append(n)
        n += 1
    return found


def _with_users(passwd: str, group: str) -> tuple[str, str]:
    """/etc/passwd and /etc/group plus MEMBER (in GROUP) and STRANGER."""
    member_id, stranger_id, group_id = _free_ids(3)
    passwd += "".join(f"{name}:x:{uid}:{uid}:llmux test caller:/nonexistent:/usr/sbin/nologin\n"
                      for name, uid in ((MEMBER, member_id), (STRANGER, stranger_id)))
    lines = group.splitlines()
    for i, line in enumerate(lines):
        name, password, gid, members = line.split(":", 3)
        if name == GROUP:  # the package's group exists here: add the member to it
            lines[i] = f"{name}:{password}:{gid}:{','.join(filter(None, [*members.split(','), MEMBER]))}"
            break
    else:
        lines.append(f"{GROUP}:x:{group_id}:{MEMBER}")
    lines += [f"{MEMBER}:x:{member_id}:", f"{STRANGER}:x:{stranger_id}:"]
    return passwd, "\n".join(lines) + "\n"


@dataclass
class PolkitBed:
    svc: ServiceBed
    rules: Path  # the rules.d polkitd reads, seen from here

    def call(self, user: str, member: str, signature: str = "", *args: str, interactive: bool) -> dict:
        """A bus call from a process running as `user` inside the test systemd:
        {"ok": body} or {"error": name, "message": text}."""
        result = self.svc.bed.run(
            *as_user(user), sys.executable, "-c", CLIENT, INSIDE_BUS, BUS_NAME, *MANAGER, member, signature,
            json.dumps(list(args)), str(4 if interactive else 0), check=False, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def busctl(self, user: str, *args: str):
        return self.svc.bed.run(*as_user(user), "busctl", "--system", "--no-pager", *args, check=False, timeout=120)

    def active_models(self) -> str:
        result = self.busctl("root", "get-property", BUS_NAME, *MANAGER, "ActiveModels")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def set_rule(self, text: str | None) -> None:
        """Write (or remove) rules.d/50-llmux-test.rules, then restart
        polkitd, so the next call meets the new rule (not a reload race)."""
        path = self.rules / "50-llmux-test.rules"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        result = self.svc.systemctl("restart", "polkit.service")
        assert result.returncode == 0, result.stderr + self.svc.journal("-u", "polkit.service")


def as_user(user: str) -> list[str]:
    if user == "root":
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]


@pytest.fixture(scope="module")
def pk():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    svc = boot_from_tree()
    try:
        bed = svc.bed
        private = Path(bed.state_dir) / "polkit-test"
        actions, rules = private / "actions", private / "rules.d"
        actions.mkdir(parents=True)
        rules.mkdir()
        private.chmod(0o755)
        rules.chmod(0o755)
        for policy in Path(ACTIONS_DIR).glob("*.policy"):
            shutil.copy(policy, actions)
        shutil.copy(ROOT / "dbus" / "io.llmux.LLMux1.policy", actions)
        passwd, group = _with_users(Path("/etc/passwd").read_text(), Path("/etc/group").read_text())
        (private / "passwd").write_text(passwd)
        (private / "group").write_text(group)
        for source, target in ((actions, ACTIONS_DIR), (rules, RULES_DIR),
                               (private / "passwd", "/etc/passwd"), (private / "group", "/etc/group")):
            bed.run("mount", "--bind", str(source), target)  # in the test systemd's mount namespace only
        # beside the test systemd's own units (not /run/systemd/system), so it can be masked
        shutil.copy(POLKIT_UNIT, Path(bed.state_dir) / "units" / POLKIT_UNIT.name)
        bed.run("systemctl", "daemon-reload")
        for model in ("alpha", "beta"):
            svc.write_model(model)
        svc.enable_now()
        result = svc.systemctl("start", "polkit.service")
        assert result.returncode == 0, result.stderr + svc.journal("-u", "polkit.service")
        yield PolkitBed(svc, rules)
    finally:
        svc.shut_down()


# --------------------------------------------------------------- scenarios


def test_real_polkitd_knows_the_shipped_actions(pk):
    assert pk.svc.prop("polkit.service", "ActiveState") == "active"
    owner = pk.busctl("root", "status", "org.freedesktop.PolicyKit1")
    assert "polkitd" in owner.stdout, owner.stdout + owner.stderr
    for action, words in ((CONTROL, "switch, pin, wake or put to sleep"), (RELOAD, "reload the llmux configuration"),
                          ("io.llmux.LLMux1.acquire", "hold a model")):
        shown = pk.svc.bed.run("pkaction", "--verbose", "--action-id", action, check=False)
        assert shown.returncode == 0, shown.stderr
        assert words in shown.stdout and "implicit any:      auth_admin_keep" in shown.stdout, shown.stdout
    # the users exist as polkit sees them
    assert f"({GROUP})" in pk.svc.bed.run(*as_user(MEMBER), "id").stdout
    assert f"({GROUP})" not in pk.svc.bed.run(*as_user(STRANGER), "id").stdout


def test_root_switches_with_polkit_running(pk):
    result = pk.busctl("root", "call", BUS_NAME, *MANAGER, "Switch", "s", "alpha")
    assert (result.returncode, result.stderr) == (0, "")
    wait_for(lambda: pk.active_models() == 'as 1 "alpha"', "alpha active")


CHANGES = [("Switch", "s", ("beta",), CONTROL), ("Pin", "s", ("beta",), CONTROL), ("Reload", "", (), RELOAD)]


@pytest.mark.parametrize("user", [STRANGER, MEMBER], ids=["stranger", "member-before-any-rule"])
@pytest.mark.parametrize("method, signature, args, action", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_user_without_rights_is_refused(pk, user, method, signature, args, action):
    # allowing interaction (as busctl does): polkit finds no agent to ask, so no
    got = pk.call(user, method, signature, *args, interactive=True)
    assert got == {"error": DENIED, "message": f"not authorized for {action}; ask an administrator or use sudo"}
    # not allowing it (dbus-send, llmuxctl off a terminal): the caller is told how it could pass
    got = pk.call(user, method, signature, *args, interactive=False)
    assert got["error"] == CHALLENGE and got["message"].startswith(f"{action} needs authentication"), got
    result = pk.busctl(user, "call", BUS_NAME, *MANAGER, method, signature, *args) if signature else \
        pk.busctl(user, "call", BUS_NAME, *MANAGER, method)
    assert (result.returncode, result.stderr) == (1, "Call failed: Access denied\n")
    assert pk.active_models() == 'as 1 "alpha"'
    assert pk.busctl("root", "get-property", BUS_NAME, *MANAGER, "PinnedModel").stdout.strip() == 's ""'


@pytest.mark.parametrize("user", [STRANGER, MEMBER])
def test_a_user_without_rights_still_reads(pk, user):
    result = pk.busctl(user, "get-property", BUS_NAME, *MANAGER, "ActiveModels")
    assert (result.returncode, result.stdout.strip()) == (0, 'as 1 "alpha"'), result.stderr
    got = pk.call(user, "GetStatus", interactive=False)
    assert got["ok"][0]["state"] == "active:alpha", got


def test_a_rule_for_the_group_lets_its_member_switch(pk):
    pk.set_rule(GROUP_RULE)
    result = pk.busctl(MEMBER, "call", BUS_NAME, *MANAGER, "Switch", "s", "beta")
    assert (result.returncode, result.stderr) == (0, "")
    wait_for(lambda: pk.active_models() == 'as 1 "beta"', "beta active after the member's switch")
    # llmuxctl off a terminal does not allow interaction: the rule answers yes without asking
    ctl = pk.svc.bed.run(*as_user(MEMBER), str(Path(sys.executable).parent / "llmuxctl"), "switch", "alpha",
                         check=False, timeout=120)
    assert ctl.returncode == 0, ctl.stdout + ctl.stderr
    assert pk.active_models() == 'as 1 "alpha"'
    # the rule is about the group: the stranger is refused as before
    got = pk.call(STRANGER, "Switch", "s", "beta", interactive=True)
    assert got["error"] == DENIED, got
    assert pk.active_models() == 'as 1 "alpha"'


ROOT_CALLS = (("Switch", "s", ("beta",)), ("Pin", "s", ("beta",)), ("Unpin", "", ()), ("Reload", "", ()),
              ("Switch", "s", ("alpha",)))


def test_root_passes_even_when_a_rule_says_no_to_everyone(pk):
    pk.set_rule(NOBODY_RULE)
    got = pk.call(MEMBER, "Switch", "s", "beta", interactive=True)  # the rule is in force
    assert got["error"] == DENIED, got
    for method, signature, args in ROOT_CALLS:
        got = pk.call("root", method, signature, *args, interactive=False)
        assert "ok" in got, (method, got)
    wait_for(lambda: pk.active_models() == 'as 1 "alpha"', "alpha active after root's switches")


def test_root_passes_without_polkitd_and_everyone_else_is_told_why_not(pk):
    """polkitd itself says yes to root, so only with polkitd gone does it show
    that llmuxd lets uid 0 through without asking."""
    pk.set_rule(GROUP_RULE)  # the member would pass, could polkit be asked
    for command in (("stop", "polkit.service"), ("mask", "--runtime", "polkit.service")):
        result = pk.svc.systemctl(*command)
        assert result.returncode == 0, result.stderr
    try:
        got = pk.call(MEMBER, "Switch", "s", "beta", interactive=True)
        assert got == {"error": DENIED, "message": f"not authorized for {CONTROL}: polkit is not running, "
                                                   "so only root may do this (use sudo)"}, got
        for method, signature, args in ROOT_CALLS:
            got = pk.call("root", method, signature, *args, interactive=False)
            assert "ok" in got, (method, got)
        assert pk.active_models() == 'as 1 "alpha"'
    finally:
        pk.svc.systemctl("unmask", "--runtime", "polkit.service")
