"""What systemd does before a backend's first instruction, said for people.

Between fork and exec, systemd switches to the unit's User=, enters its
WorkingDirectory=, sets up the journal streams, the cgroup and the sandbox.
When a step fails the process exits with one of systemd's own statuses
(systemd.exec(5), "Process Exit Codes"), and all a person sees is "exited
with status 200". `explain_setup_failure` turns the status into the cause
and the fix, with the unit's user, directory and command filled in.

`user_can_enter` is the check made before choosing a working directory: as
the backend's user, not as llmuxd (root passes every check, so its own
access says nothing).
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import NamedTuple


class SetupStep(NamedTuple):
    name: str  # systemd's symbolic name, EXIT_<name>
    #: what failed and what to do; {user} {group} (quoted), {login} (bare), {directory} {command} {unit}
    fix: str


_SAYS_WHY = "'journalctl -u {unit}' says why"
_GENERIC = "systemd could not set up the backend's process at this step; " + _SAYS_WHY

#: systemd.exec(5), "Process Exit Codes": the statuses systemd itself exits with
SETUP_STEPS: dict[int, SetupStep] = {
    200: SetupStep("CHDIR", "systemd could not enter the working directory {directory} as user {user}; make it "
                            "reachable for that user (chown {login}: {directory}, as the package's tmpfiles rule "
                            "does), or move state_dir"),
    201: SetupStep("NICE", _GENERIC),
    202: SetupStep("FDS", _GENERIC),
    203: SetupStep("EXEC", "systemd could not execute {command} as user {user}; check that it exists and that "
                           "user {user} may read and run it and every directory above it (a virtualenv under "
                           "/root is not), or correct the model's command"),
    204: SetupStep("MEMORY", "the machine ran out of memory while systemd set up the backend; free memory or "
                             "lower what other units use"),
    205: SetupStep("LIMITS", "systemd could not apply the unit's resource limits; check the Limit*= settings of "
                             "llmux.slice and the kernel's maximums"),
    206: SetupStep("OOM_ADJUST", _GENERIC),
    207: SetupStep("SIGNAL_MASK", _GENERIC),
    208: SetupStep("STDIN", "systemd could not set up the backend's standard input; " + _SAYS_WHY),
    209: SetupStep("STDOUT", "systemd could not connect the backend's output to the journal; check that "
                             "systemd-journald is running"),
    210: SetupStep("CHROOT", _GENERIC),
    211: SetupStep("IOPRIO", _GENERIC),
    212: SetupStep("TIMERSLACK", _GENERIC),
    213: SetupStep("SECUREBITS", _GENERIC),
    214: SetupStep("SETSCHEDULER", _GENERIC),
    215: SetupStep("CPUAFFINITY", _GENERIC),
    216: SetupStep("GROUP", "systemd could not switch to group {group}: it does not exist here; create it or "
                            "name an existing group"),
    217: SetupStep("USER", "systemd could not switch to user {user}: it does not exist here (or cannot be "
                           "used); create it (systemd-sysusers with the package's llmux.conf, or useradd "
                           "--system {login}) or set `user:` in the config, for the model or for all, to an "
                           "existing user"),
    218: SetupStep("CAPABILITIES", _GENERIC),
    219: SetupStep("CGROUP", "systemd could not put the backend into its cgroup in llmux.slice; check that the "
                             "unified cgroup hierarchy is mounted and llmux.slice is not limited to death"),
    220: SetupStep("SETSID", _GENERIC),
    221: SetupStep("CONFIRM", _GENERIC),
    222: SetupStep("STDERR", "systemd could not connect the backend's errors to the journal; check that "
                             "systemd-journald is running"),
    224: SetupStep("PAM", _GENERIC),
    225: SetupStep("NETWORK", _GENERIC),
    226: SetupStep("NAMESPACE", "systemd could not set up the backend's file-system namespace; a path the unit "
                                "names may be missing; " + _SAYS_WHY),
    227: SetupStep("NO_NEW_PRIVILEGES", _GENERIC),
    228: SetupStep("SECCOMP", _GENERIC),
    229: SetupStep("SELINUX_CONTEXT", _GENERIC),
    230: SetupStep("PERSONALITY", _GENERIC),
    231: SetupStep("APPARMOR_PROFILE", _GENERIC),
    232: SetupStep("ADDRESS_FAMILIES", _GENERIC),
    233: SetupStep("RUNTIME_DIRECTORY", _GENERIC),
    235: SetupStep("CHOWN", _GENERIC),
    236: SetupStep("SMACK_PROCESS_LABEL", _GENERIC),
    237: SetupStep("KEYRING", _GENERIC),
    238: SetupStep("STATE_DIRECTORY", _GENERIC),
    239: SetupStep("CACHE_DIRECTORY", _GENERIC),
    240: SetupStep("LOGS_DIRECTORY", _GENERIC),
    241: SetupStep("CONFIGURATION_DIRECTORY", _GENERIC),
    242: SetupStep("NUMA_POLICY", _GENERIC),
    243: SetupStep("CREDENTIALS", _GENERIC),
    245: SetupStep("BPF", _GENERIC),
}


def explain_setup_failure(code: int | None, *, unit: str, user: str | None, group: str | None,
                          directory: str | None, command: str) -> str | None:
    """'systemd exit status 217/USER: <cause and fix>' for one of systemd's own
    statuses; None for any other (the backend's own exit status)."""
    step = SETUP_STEPS.get(code) if code is not None else None
    if step is None:
        return None
    login = user or "root"
    text = step.fix.format(user=f"'{login}'", login=login, group=f"'{group}'" if group else "(the user's)",
                           directory=directory or "/", command=command, unit=unit)
    return f"systemd exit status {code}/{step.name}: {text}"


def user_can_enter(path: str, user: str | None) -> bool | None:
    """Whether `user` (None: root) may make `path` its working directory: search
    permission on it and every directory above it, by owner, group and mode
    (ACLs are not read). None when the user does not exist."""
    try:
        entry = pwd.getpwuid(int(user)) if user and user.isdigit() else pwd.getpwnam(user or "root")
    except KeyError:
        return None
    if entry.pw_uid == 0:
        return True
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    try:
        target = Path(path).resolve(strict=True)
        for directory in (target, *target.parents):
            st = os.stat(directory)
            if not stat.S_ISDIR(st.st_mode):
                return False
            if st.st_uid == entry.pw_uid:
                allowed = st.st_mode & stat.S_IXUSR
            elif st.st_gid in groups:
                allowed = st.st_mode & stat.S_IXGRP
            else:
                allowed = st.st_mode & stat.S_IXOTH
            if not allowed:
                return False
    except OSError:
        return False
    return True


def user_ids(user: str | None) -> tuple[int, int] | None:
    """(uid, primary gid) of `user`; None when it does not exist (or is None)."""
    if not user:
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid
