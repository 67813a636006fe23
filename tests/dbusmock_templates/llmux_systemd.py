"""python-dbusmock template: the part of org.freedesktop.systemd1 that llmuxd uses.

The stock `systemd` template creates no unit on StartTransientUnit, has no
FreezeUnit/ThawUnit and escapes paths differently from systemd. This one is
strict where systemd is strict, so unit tests catch what the real one would
refuse:

- StartTransientUnit checks every property name *and* its D-Bus type against
  systemd 252 (an unknown name or a wrong type fails the whole call with
  InvalidArgs, as systemd does); creates the unit object (Unit + Service
  interfaces, MainPID, ControlGroup, the properties given); emits JobNew and
  JobRemoved("done") *before* the method returns, like a fast real job;
  an existing active unit gives UnitExists.
- StopUnit: inactive, PropertiesChanged, JobRemoved, UnitRemoved, object gone
  (CollectMode=inactive-or-failed). Unknown unit: NoSuchUnit.
- FreezeUnit / ThawUnit: FreezerState; NotSupported when the mock is told the
  freezer is missing; UnitInactive when not active.
- GetUnit, LoadUnit, ListUnits, ListUnitsByPatterns, GetUnitProcesses, KillUnit,
  Subscribe, Unsubscribe.
- Mock-only (org.freedesktop.DBus.Mock): SetUnitExited(name, result, code, status)
  simulates a crash; SetFreezerSupported(bool).

Load it by path: `DBusTestCase.spawn_server_template(PATH, {}, system_bus=True)`.
"""

import fnmatch

import dbus
from dbusmock import MOCK_IFACE, mockobject

BUS_NAME = "org.freedesktop.systemd1"
MAIN_OBJ = "/org/freedesktop/systemd1"
MAIN_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
SYSTEM_BUS = True
UINT64_MAX = 2**64 - 1

#: settable transient properties of a service in systemd 252 and their write types
#: (the subset llmuxd may send; TRANSIENT-SETTINGS.md lists them all)
SETTABLE = {
    "Description": "s", "Slice": "s", "Type": "s", "ExecStart": "a(sasb)", "Environment": "as",
    "KillMode": "s", "TimeoutStopUSec": "t", "TimeoutStartUSec": "t", "SyslogIdentifier": "s",
    "LogExtraFields": "aay", "CollectMode": "s", "User": "s", "Group": "s",
    "WorkingDirectory": "s", "DevicePolicy": "s", "DeviceAllow": "a(ss)", "MemoryMax": "t",
    "CPUWeight": "t", "TasksMax": "t", "Restart": "s", "OOMPolicy": "s", "PrivateTmp": "b",
    "NoNewPrivileges": "b", "SupplementaryGroups": "as", "StandardOutput": "s",
    "StandardError": "s", "Delegate": "b", "RemainAfterExit": "b", "PIDFile": "s",
}
#: written as a(sasb), read back as a(sasbttttuii) — the mock keeps what was written
_BASIC = {dbus.String: "s", dbus.UInt64: "t", dbus.Int64: "x", dbus.UInt32: "u", dbus.Int32: "i",
          dbus.Boolean: "b", dbus.Byte: "y", dbus.ObjectPath: "o", dbus.Double: "d", dbus.Signature: "g"}


def signature_of(value):
    """The D-Bus signature a dbus-python value was received with."""
    for cls, sig in _BASIC.items():
        if isinstance(value, cls):
            return sig
    if isinstance(value, dbus.ByteArray):
        return "ay"
    if isinstance(value, dbus.Array):
        return "a" + (value.signature or "v")
    if isinstance(value, dbus.Struct):
        return "(" + "".join(signature_of(v) for v in value) + ")"
    if isinstance(value, dbus.Dictionary):
        return "a{" + (value.signature or "sv") + "}"
    return "?"


def bus_label_escape(text):
    """systemd's bus_label_escape(): [A-Za-z0-9] kept (a leading digit escaped), the rest _xx."""
    return "".join(
        ch if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)) else f"_{ord(ch):02x}"
        for i, ch in enumerate(text)
    )


def unit_path(name):
    return f"{MAIN_OBJ}/unit/{bus_label_escape(name)}"


def _error(name, message):
    return dbus.exceptions.DBusException(message, name=name)


def load(mock, parameters):
    mock.next_job_id = 1
    mock.next_pid = int(parameters.get("FirstPid", 1000))
    mock.units = {}
    mock.freezer_supported = True
    mock.AddProperties(MAIN_IFACE, {
        "Version": dbus.String(parameters.get("Version", "252 (llmux mock)")),
        "SystemState": dbus.String("running"),
    })


def _job(mock, name):
    job_id = mock.next_job_id
    mock.next_job_id += 1
    job_path = dbus.ObjectPath(f"{MAIN_OBJ}/job/{job_id}")
    mock.EmitSignal(MAIN_IFACE, "JobNew", "uos", [dbus.UInt32(job_id), job_path, name])
    mock.EmitSignal(MAIN_IFACE, "JobRemoved", "uoss", [dbus.UInt32(job_id), job_path, name, "done"])
    return job_path


def _unit(mock, name):
    path = mock.units.get(str(name))
    if path is None:
        raise _error("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
    return mockobject.objects[path]


def _remove(mock, name):
    path = mock.units.pop(str(name))
    mock.EmitSignal(MAIN_IFACE, "UnitRemoved", "so", [name, dbus.ObjectPath(path)])
    mock.RemoveObject(path)


@dbus.service.method(MAIN_IFACE, in_signature="ssa(sv)a(sa(sv))", out_signature="o")
def StartTransientUnit(self, name, mode, properties, aux):
    name = str(name)
    if name in self.units:
        raise _error("org.freedesktop.systemd1.UnitExists",
                     f"Unit {name} was already loaded or has a fragment file.")
    given = {}
    for key, value in properties:
        key = str(key)
        if key not in SETTABLE:
            raise _error("org.freedesktop.DBus.Error.InvalidArgs", f"Cannot set property {key}, or unknown property.")
        if signature_of(value) != SETTABLE[key]:
            raise _error("org.freedesktop.DBus.Error.InvalidArgs",
                         f"Invalid argument for {key}: got {signature_of(value)}, want {SETTABLE[key]}")
        given[key] = value
    pid = self.next_pid
    self.next_pid += 1
    path = unit_path(name)
    unit_props = {
        "Id": dbus.String(name), "Names": dbus.Array([name], signature="s"),
        "Description": dbus.String(given.pop("Description", name)),
        "LoadState": dbus.String("loaded"), "ActiveState": dbus.String("active"),
        "SubState": dbus.String("running"), "FreezerState": dbus.String("running"),
        "Transient": dbus.Boolean(True),
    }
    service_props = {
        "MainPID": dbus.UInt32(pid), "ExecMainPID": dbus.UInt32(pid),
        "ExecMainCode": dbus.Int32(0), "ExecMainStatus": dbus.Int32(0),
        "ControlGroup": dbus.String(f"/{given.get('Slice', 'system.slice')}/{name}"),
        "Result": dbus.String("success"), "Type": dbus.String(given.pop("Type", "simple")),
        "Environment": dbus.Array([], signature="s"),
        "CPUUsageNSec": dbus.UInt64(0), "MemoryCurrent": dbus.UInt64(UINT64_MAX),
    }
    service_props.update(given)
    self.AddObject(path, UNIT_IFACE, unit_props, [])
    mockobject.objects[path].AddProperties(SERVICE_IFACE, service_props)
    self.units[name] = path
    return _job(self, name)


@dbus.service.method(MAIN_IFACE, in_signature="ss", out_signature="o")
def StopUnit(self, name, mode):
    unit = _unit(self, name)
    unit.UpdateProperties(SERVICE_IFACE, {"MainPID": dbus.UInt32(0), "ExecMainCode": dbus.Int32(2),
                                          "ExecMainStatus": dbus.Int32(15)})
    unit.UpdateProperties(UNIT_IFACE, {"ActiveState": dbus.String("inactive"), "SubState": dbus.String("dead")})
    job = _job(self, str(name))
    _remove(self, str(name))
    return job


@dbus.service.method(MAIN_IFACE, in_signature="ssi", out_signature="")
def KillUnit(self, name, whom, signal):
    _unit(self, name)


def _freezer(self, name, frozen):
    unit = _unit(self, name)
    if not self.freezer_supported:
        raise _error("org.freedesktop.DBus.Error.NotSupported", f"Unit '{name}' does not support freezing.")
    if unit.Get(UNIT_IFACE, "ActiveState") != "active":
        raise _error("org.freedesktop.systemd1.UnitInactive", f"Unit '{name}' is not active.")
    unit.UpdateProperties(UNIT_IFACE, {"FreezerState": dbus.String("frozen" if frozen else "running")})


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="")
def FreezeUnit(self, name):
    _freezer(self, name, True)


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="")
def ThawUnit(self, name):
    _freezer(self, name, False)


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="o")
def GetUnit(self, name):
    _unit(self, name)
    return dbus.ObjectPath(self.units[str(name)])


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="o")
def LoadUnit(self, name):
    return GetUnit(self, name)


def _unit_rows(self, patterns=()):
    rows = []
    for name, path in sorted(self.units.items()):
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        unit = mockobject.objects[path]
        rows.append((name, unit.Get(UNIT_IFACE, "Description"), "loaded", unit.Get(UNIT_IFACE, "ActiveState"),
                     unit.Get(UNIT_IFACE, "SubState"), "", dbus.ObjectPath(path), dbus.UInt32(0), "",
                     dbus.ObjectPath("/")))
    return rows


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="a(ssssssouso)")
def ListUnits(self):
    return _unit_rows(self)


@dbus.service.method(MAIN_IFACE, in_signature="asas", out_signature="a(ssssssouso)")
def ListUnitsByPatterns(self, states, patterns):
    return [r for r in _unit_rows(self, [str(p) for p in patterns]) if not states or r[3] in states]


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="a(sus)")
def GetUnitProcesses(self, name):
    unit = _unit(self, name)
    pid = unit.Get(SERVICE_IFACE, "MainPID")
    return [(unit.Get(SERVICE_IFACE, "ControlGroup"), dbus.UInt32(pid), "backend")] if pid else []


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="")
def Subscribe(self):
    pass


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="")
def Unsubscribe(self):
    pass


@dbus.service.method(MOCK_IFACE, in_signature="ssii", out_signature="")
def SetUnitExited(self, name, result, code, status):
    """Mock-only: the backend ended on its own (code 1 = exited with status, 2 = killed by signal)."""
    unit = _unit(self, name)
    unit.UpdateProperties(SERVICE_IFACE, {"MainPID": dbus.UInt32(0), "Result": dbus.String(result),
                                          "ExecMainCode": dbus.Int32(code), "ExecMainStatus": dbus.Int32(status)})
    unit.UpdateProperties(UNIT_IFACE, {"ActiveState": dbus.String("failed"), "SubState": dbus.String("failed")})
    _remove(self, str(name))


@dbus.service.method(MOCK_IFACE, in_signature="b", out_signature="")
def SetFreezerSupported(self, supported):
    """Mock-only: pretend the cgroup-v2 freezer is missing (hybrid/v1 hosts)."""
    self.freezer_supported = bool(supported)
