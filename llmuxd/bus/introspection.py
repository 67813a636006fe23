"""Introspection XML, written from the interface classes themselves.

The same renderer answers `Introspect` on the bus (so `busctl introspect`
shows argument names and EmitsChangedSignal annotations, which dbus-fast's
own introspection leaves out) and writes the files shipped in `dbus/`
(with each member's docstring as a comment); a golden test keeps the two
equal. `python -m llmuxd.bus.introspection DIR` regenerates the files.
"""

import inspect
import sys
from pathlib import Path
from typing import Any, Iterable, Optional
from xml.sax.saxutils import quoteattr

from dbus_fast.service import ServiceInterface, _Property

from llmuxd.bus.auth import OUT_NAMES_ATTR
from llmuxd.names import MANAGER_IFACE, MODEL_IFACE

DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)

_STANDARD = """\
 <interface name="org.freedesktop.DBus.Peer">
  <method name="Ping"/>
  <method name="GetMachineId">
   <arg type="s" name="machine_uuid" direction="out"/>
  </method>
 </interface>
 <interface name="org.freedesktop.DBus.Introspectable">
  <method name="Introspect">
   <arg type="s" name="xml_data" direction="out"/>
  </method>
 </interface>
 <interface name="org.freedesktop.DBus.Properties">
  <method name="Get">
   <arg type="s" name="interface_name" direction="in"/>
   <arg type="s" name="property_name" direction="in"/>
   <arg type="v" name="value" direction="out"/>
  </method>
  <method name="GetAll">
   <arg type="s" name="interface_name" direction="in"/>
   <arg type="a{sv}" name="props" direction="out"/>
  </method>
  <method name="Set">
   <arg type="s" name="interface_name" direction="in"/>
   <arg type="s" name="property_name" direction="in"/>
   <arg type="v" name="value" direction="in"/>
  </method>
  <signal name="PropertiesChanged">
   <arg type="s" name="interface_name"/>
   <arg type="a{sv}" name="changed_properties"/>
   <arg type="as" name="invalidated_properties"/>
  </signal>
 </interface>
"""

_OBJECT_MANAGER = """\
 <interface name="org.freedesktop.DBus.ObjectManager">
  <method name="GetManagedObjects">
   <arg type="a{oa{sa{sv}}}" name="objects" direction="out"/>
  </method>
  <signal name="InterfacesAdded">
   <arg type="o" name="object_path"/>
   <arg type="a{sa{sv}}" name="interfaces_and_properties"/>
  </signal>
  <signal name="InterfacesRemoved">
   <arg type="o" name="object_path"/>
   <arg type="as" name="interfaces"/>
  </signal>
 </interface>
"""


def _doc_comment(obj: Any, indent: str) -> str:
    doc = inspect.getdoc(obj) or ""
    if not doc:
        return ""
    text = " ".join(doc.split("\n\n", 1)[0].split()).replace("--", "- -")
    return f"{indent}<!-- {text} -->\n"


def _members(cls: type) -> Iterable[tuple[str, Any]]:
    """Exported members in the order the class declares them."""
    seen = set()
    for klass in reversed(cls.__mro__):
        for attr, member in vars(klass).items():
            if attr not in seen:
                seen.add(attr)
                yield attr, member


def render_interface(iface: ServiceInterface, *, docs: bool) -> str:
    """One <interface> element for `iface` (an instance), one space per level."""
    cls = type(iface)
    emits: dict[str, str] = getattr(cls, "PROPERTY_EMITS", {})
    out = [f" <interface name={quoteattr(iface.name)}>\n"]
    methods, signals, props = [], [], []
    for _attr, member in _members(cls):
        d = getattr(member, "__dict__", {})
        if "__DBUS_METHOD" in d:
            methods.append(member)
        elif "__DBUS_SIGNAL" in d:
            signals.append(member)
        elif isinstance(member, _Property):
            props.append(member)
    for member in methods:
        m = member.__dict__["__DBUS_METHOD"]
        if m.disabled:
            continue
        if docs:
            out.append(_doc_comment(member, "  "))
        args = [(a.signature, a.name, "in") for a in m.introspection.in_args]
        out_names = getattr(member, OUT_NAMES_ATTR, ())
        for i, a in enumerate(m.introspection.out_args):
            args.append((a.signature, out_names[i] if i < len(out_names) else None, "out"))
        out.append(_element("method", m.name, args))
    for member in signals:
        s = member.__dict__["__DBUS_SIGNAL"]
        if s.disabled:
            continue
        if docs:
            out.append(_doc_comment(member, "  "))
        names = list(inspect.signature(member).parameters)[1:]
        args = []
        for i, a in enumerate(s.introspection.args):
            args.append((a.signature, names[i] if i < len(names) else None, None))
        out.append(_element("signal", s.name, args))
    for prop in props:
        if prop.disabled:
            continue
        if docs:
            out.append(_doc_comment(prop.prop_getter, "  "))
        access = prop.access.value if hasattr(prop.access, "value") else str(prop.access)
        head = f"  <property name={quoteattr(prop.name)} type={quoteattr(prop.signature)} access={quoteattr(access)}"
        emit = emits.get(prop.name)
        if emit:
            out.append(
                f"{head}>\n   <annotation name=\"org.freedesktop.DBus.Property.EmitsChangedSignal\" "
                f"value={quoteattr(emit)}/>\n  </property>\n"
            )
        else:
            out.append(f"{head}/>\n")
    out.append(" </interface>\n")
    return "".join(out)


def _element(kind: str, name: str, args: list[tuple[str, Optional[str], Optional[str]]]) -> str:
    if not args:
        return f"  <{kind} name={quoteattr(name)}/>\n"
    lines = [f"  <{kind} name={quoteattr(name)}>\n"]
    for sig, arg_name, direction in args:
        attrs = f"type={quoteattr(sig)}"
        if arg_name:
            attrs += f" name={quoteattr(arg_name)}"
        if direction:
            attrs += f" direction={quoteattr(direction)}"
        lines.append(f"   <arg {attrs}/>\n")
    lines.append(f"  </{kind}>\n")
    return "".join(lines)


def render_node(
    interfaces: Iterable[ServiceInterface],
    children: Iterable[str],
    *,
    object_manager: bool = False,
    standard: bool = True,
) -> str:
    """The answer to Introspect for one object path."""
    out = [DOCTYPE, "<node>\n"]
    if standard:
        out.append(_STANDARD)
    if object_manager:
        out.append(_OBJECT_MANAGER)
    for iface in interfaces:
        out.append(render_interface(iface, docs=False))
    for child in sorted(set(children)):
        out.append(f" <node name={quoteattr(child)}/>\n")
    out.append("</node>\n")
    return "".join(out)


def render_shipped(iface: ServiceInterface) -> str:
    """The file shipped as dbus/<interface>.xml (installed to /usr/share/dbus-1/interfaces/)."""
    return f"{DOCTYPE}<node>\n{render_interface(iface, docs=True)}</node>\n"


def shipped_files() -> dict[str, str]:
    from llmuxd.bus.service import ManagerInterface, ModelInterface

    return {
        f"{MANAGER_IFACE}.xml": render_shipped(ManagerInterface(None)),
        f"{MODEL_IFACE}.xml": render_shipped(ModelInterface(None, "example")),
    }


def main(argv: Optional[list[str]] = None) -> int:
    target = Path((argv or sys.argv[1:] or ["dbus"])[0])
    for name, text in shipped_files().items():
        (target / name).write_text(text)
        print(target / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
