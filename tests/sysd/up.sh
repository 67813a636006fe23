#!/usr/bin/env bash
# Boot a real systemd 252 as PID 1 of its own PID, mount, cgroup, UTS and IPC
# namespaces, with Debian's dbus-daemon as the system bus and journald, for the
# `systemd`-marked tests. Needs root; nothing is downloaded; boots in < 1 s.
#
#   tests/sysd/up.sh                 # state dir: $SYSD_TEST_DIR or a fresh /tmp/llmux-sysd.XXXXXX
#   tests/sysd/exec.sh systemctl status
#   tests/sysd/down.sh
#
# Several instances may run at once (parallel helpers, CI jobs): each has its
# own state dir and its own cgroup (llmux-sysd-<state dir basename>).
# The last lines printed (and $SYSD_TEST_DIR/env) are shell assignments:
#   SYSD_TEST_DIR, SYSD_TEST_PID (host pid of the namespaced systemd),
#   DBUS_SYSTEM_BUS_ADDRESS, SYSD_TEST_JOURNAL_DIR, SYSD_TEST_DBUS_POLICY_DIR, ...
#
# How: the instance's /run is a bind mount of $SYSD_TEST_DIR/run (bus socket and
# journal reachable from the host); network, /tmp, /usr, /etc and /dev are shared
# with the host (units run the project's venv and listen on host-visible ports);
# a private cgroup2 subtree is the root of a new cgroup namespace, so systemd
# runs in pure unified mode (FreezeUnit works); only units in $SYSD_TEST_DIR/units
# exist, so none of the host's services can start.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "tests/sysd/up.sh: must be root (it boots systemd in namespaces)" >&2; exit 1; }
D=${SYSD_TEST_DIR:-$(mktemp -d /tmp/llmux-sysd.XXXXXX)}
case "$D" in /|/tmp|/run|"") echo "refusing SYSD_TEST_DIR=$D" >&2; exit 1 ;; esac
CG_NAME=${SYSD_TEST_CG:-llmux-sysd-$(basename "$D")}
SYSTEMD_BIN=${SYSTEMD_BIN:-/lib/systemd/systemd}
BOOT_TIMEOUT=${SYSD_TEST_BOOT_TIMEOUT:-60}
for b in unshare nsenter busctl "$SYSTEMD_BIN" /usr/bin/dbus-daemon /lib/systemd/systemd-journald; do
  command -v "$b" >/dev/null || { echo "tests/sysd/up.sh: missing $b (apt install systemd dbus util-linux)" >&2; exit 1; }
done
if [ -f "$D/env" ]; then
  old=$(sed -n 's/^SYSD_TEST_PID=//p' "$D/env")
  if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then
    echo "a test systemd already runs from $D (pid $old); run tests/sysd/down.sh first" >&2; exit 1
  fi
fi

# a cgroup2 hierarchy on the host: pure v2, hybrid (…/unified), or our own mount
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then CG2=/sys/fs/cgroup
elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then CG2=/sys/fs/cgroup/unified
else
  CG2=/tmp/llmux-cgroup2; mkdir -p "$CG2"
  mountpoint -q "$CG2" || mount -t cgroup2 none "$CG2"
fi
CG="$CG2/$CG_NAME"
mkdir -p "$CG"

rm -rf "$D"
mkdir -p "$D/run/systemd/journald.conf.d" "$D/run/systemd/system.conf.d" "$D/units" "$D/generators" "$D/dbus-system.d"
: >"$D/console.log"
cp -a /etc/dbus-1/system.d/. "$D/dbus-system.d/" 2>/dev/null || true
chmod 755 "$D" "$D/run"
cat >"$D/run/systemd/journald.conf.d/50-llmux-test.conf" <<'EOF'
[Journal]
Storage=volatile
RateLimitIntervalSec=0
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
ReadKMsg=no
EOF
cat >"$D/run/systemd/system.conf.d/50-llmux-test.conf" <<'EOF'
[Manager]
DefaultTimeoutStopSec=10s
DefaultTimeoutStartSec=30s
DefaultCPUAccounting=yes
EOF

# the minimal unit set: real journald and dbus units, stub targets
U="$D/units"
for u in systemd-journald.service systemd-journald.socket dbus.service dbus.socket systemd-exit.service exit.target; do
  ln -s "/lib/systemd/system/$u" "$U/$u"
done
cat >"$U/llmux-test.target" <<'EOF'
[Unit]
Description=llmux test systemd
Requires=basic.target
Wants=dbus.socket dbus.service systemd-journald.socket systemd-journald.service
After=basic.target dbus.service
AllowIsolate=yes
EOF
cat >"$U/basic.target" <<'EOF'
[Unit]
Description=Basic System (llmux test)
Requires=sysinit.target
Wants=sockets.target timers.target paths.target slices.target
After=sysinit.target sockets.target paths.target slices.target timers.target
EOF
printf '[Unit]\nDescription=System Initialization (llmux test)\nWants=systemd-journald.service\n' >"$U/sysinit.target"
for t in sockets timers paths slices local-fs swap network network-online nss-user-lookup remote-fs time-sync emergency rescue; do
  printf '[Unit]\nDescription=%s.target (llmux test stub)\n' "$t" >"$U/$t.target"
done
for t in shutdown umount final; do
  printf '[Unit]\nDescription=%s (llmux test)\nDefaultDependencies=no\n' "$t" >"$U/$t.target"
done
for t in poweroff halt reboot ctrl-alt-del; do ln -s exit.target "$U/$t.target"; done
ln -s llmux-test.target "$U/default.target"

# stage 1 (host): join the private cgroup, unshare; stage 2 (new namespaces): private mounts, exec systemd
cat >"$D/stage2.sh" <<EOF
#!/bin/sh
set -e
mount --make-rprivate /
mount --bind "$D/run" /run
# LoadCredential=: systemd mounts a unit's credentials in a child namespace and
# they reach PID 1's through /run/credentials, a shared tmpfs as on a host (/run)
mkdir -p /run/credentials
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run/credentials
mount --make-shared /run/credentials
mount --bind "$D/console.log" /dev/console
mount --bind "$D/dbus-system.d" /etc/dbus-1/system.d
umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup 2>/dev/null || true
mount -t cgroup2 -o nsdelegate none /sys/fs/cgroup
exec "$SYSTEMD_BIN" --unit=llmux-test.target --log-target=journal --log-level=\${SYSD_TEST_LOG_LEVEL:-info} --show-status=no
EOF
cat >"$D/stage1.sh" <<EOF
#!/bin/sh
echo \$\$ >"$CG/cgroup.procs"
exec unshare --pid --fork --kill-child=SIGKILL --mount --cgroup --uts --ipc --mount-proc --propagation private "$D/stage2.sh"
EOF
chmod +x "$D/stage1.sh" "$D/stage2.sh"

# transient units must be on the unit path or they turn not-found after daemon-reload
UNIT_PATH="/run/systemd/system.control:/run/systemd/transient:/run/systemd/system:$U"
setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin container=llmux-test LANG=C.UTF-8 \
  SYSTEMD_UNIT_PATH="$UNIT_PATH" SYSTEMD_GENERATOR_PATH="$D/generators" \
  SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$D/generators" \
  "$D/stage1.sh" </dev/null >"$D/systemd.log" 2>&1 &
UNSHARE_PID=$!

SYSD_PID=""
for _ in $(seq 1 200); do
  SYSD_PID=$(awk '{print $1}' "/proc/$UNSHARE_PID/task/$UNSHARE_PID/children" 2>/dev/null || true)
  [ -n "$SYSD_PID" ] && [ "$(readlink "/proc/$SYSD_PID/exe" 2>/dev/null)" = "$(readlink -f "$SYSTEMD_BIN")" ] && break
  SYSD_PID=""
  sleep 0.05
done
ADDR="unix:path=$D/run/dbus/system_bus_socket"
cat >"$D/env" <<EOF
SYSD_TEST_DIR=$D
SYSD_TEST_PID=$SYSD_PID
SYSD_TEST_UNSHARE_PID=$UNSHARE_PID
SYSD_TEST_CGROUP=$CG
DBUS_SYSTEM_BUS_ADDRESS=$ADDR
SYSD_TEST_JOURNAL_DIR=$D/run/log/journal
SYSD_TEST_DBUS_POLICY_DIR=$D/dbus-system.d
EOF
fail() { echo "tests/sysd/up.sh: $1; log:" >&2; tail -50 "$D/systemd.log" >&2; SYSD_TEST_DIR=$D SYSD_TEST_KEEP=1 "$(dirname "$0")/down.sh" >/dev/null 2>&1 || true; exit 1; }
[ -n "$SYSD_PID" ] || fail "systemd did not start"

state=""
for _ in $(seq 1 $((BOOT_TIMEOUT * 10))); do
  if [ -S "$D/run/dbus/system_bus_socket" ]; then
    state=$(DBUS_SYSTEM_BUS_ADDRESS=$ADDR busctl --system get-property org.freedesktop.systemd1 \
      /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager SystemState 2>/dev/null | awk '{print $2}' | tr -d '"') || true
    case "$state" in running|degraded) break ;; esac
  fi
  kill -0 "$SYSD_PID" 2>/dev/null || fail "systemd died"
  sleep 0.1
done
case "$state" in running|degraded) ;; *) fail "systemd not up after ${BOOT_TIMEOUT}s (state '$state')" ;; esac
cat "$D/env"
