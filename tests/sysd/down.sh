#!/usr/bin/env bash
# Tear down a test systemd booted by tests/sysd/up.sh: orderly exit (SIGRTMIN+4,
# poweroff == exit in a container), SIGKILL of its PID 1 if it hangs (the kernel
# then kills the whole PID namespace), then remove its cgroup and state dir.
# Only the PIDs recorded by up.sh are signalled. SYSD_TEST_KEEP=1 keeps the state dir.
set -uo pipefail
D=${SYSD_TEST_DIR:?set SYSD_TEST_DIR to the state dir tests/sysd/up.sh printed}
[ -f "$D/env" ] || { echo "nothing to tear down in $D"; rm -rf "$D"; exit 0; }
PID=$(sed -n 's/^SYSD_TEST_PID=//p' "$D/env")
UNSHARE_PID=$(sed -n 's/^SYSD_TEST_UNSHARE_PID=//p' "$D/env")
CG=$(sed -n 's/^SYSD_TEST_CGROUP=//p' "$D/env")
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
is_systemd() { [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$(readlink -f /lib/systemd/systemd)" ]; }

if alive "$PID" && is_systemd "$PID"; then
  kill -s SIGRTMIN+4 "$PID"
  for _ in $(seq 1 "${SYSD_TEST_STOP_TIMEOUT:-150}"); do alive "$PID" || break; sleep 0.1; done
  alive "$PID" && { echo "systemd did not exit in time, SIGKILL pid $PID" >&2; kill -9 "$PID"; }
fi
for _ in $(seq 1 50); do alive "$UNSHARE_PID" || break; sleep 0.1; done
alive "$UNSHARE_PID" && kill -9 "$UNSHARE_PID"
case "$CG" in */llmux-sysd-*)
  for _ in $(seq 1 50); do
    [ -d "$CG" ] || break
    find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null
    sleep 0.1
  done
  [ -d "$CG" ] && echo "warning: cgroup $CG is not empty" >&2 ;;
esac
if [ "${SYSD_TEST_KEEP:-0}" = 1 ]; then echo "kept $D (journal in $D/run/log/journal)"; else rm -rf "$D"; fi
echo "test systemd in $D torn down"
