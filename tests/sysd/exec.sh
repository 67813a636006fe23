#!/usr/bin/env bash
# Run a command inside the test systemd's namespaces (tests/sysd/up.sh), where
# systemctl, systemd-run, journalctl and busctl work unchanged and the PIDs
# systemd reports are valid. Needs SYSD_TEST_DIR (printed by up.sh).
#   SYSD_TEST_DIR=/tmp/llmux-sysd.abc123 tests/sysd/exec.sh systemctl list-units 'llmux-*'
set -euo pipefail
D=${SYSD_TEST_DIR:?set SYSD_TEST_DIR to the state dir tests/sysd/up.sh printed}
[ -f "$D/env" ] || { echo "no test systemd in $D (run tests/sysd/up.sh)" >&2; exit 1; }
PID=$(sed -n 's/^SYSD_TEST_PID=//p' "$D/env")
kill -0 "$PID" 2>/dev/null || { echo "the test systemd (pid $PID) is not running" >&2; exit 1; }
unset DBUS_SYSTEM_BUS_ADDRESS
exec nsenter --target "$PID" --mount --pid --uts --ipc --cgroup --wd="$PWD" -- "$@"
