"""Where backends run: transient systemd units (system mode) or process groups (embedded mode)."""

from llmuxd.runtime.base import (
    ExitStatus,
    ForeignUnit,
    Handle,
    LaunchSpec,
    Runtime,
    RuntimeUnavailable,
    RunState,
    check_port_free,
)

__all__ = [
    "ExitStatus",
    "ForeignUnit",
    "Handle",
    "LaunchSpec",
    "Runtime",
    "RuntimeUnavailable",
    "RunState",
    "check_port_free",
]
