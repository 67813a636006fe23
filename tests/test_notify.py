"""sd_notify datagrams, read off a socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest

from llmuxd.daemon.notify import Notifier, format_status, socket_address, watchdog_interval


@pytest.fixture()
def systemd_socket(tmp_path):
    """A datagram socket where systemd's notify socket would be; yields
    (NOTIFY_SOCKET value, receive function)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)

    def receive() -> list[str]:
        return sock.recv(65536).decode().split("\n")

    yield path, receive
    sock.close()


def test_ready_carries_status_and_mainpid(systemd_socket):
    address, receive = systemd_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": address})
    assert notifier.ready("active: qwen · 2 sleeping · 0 queued")
    assert receive() == ["READY=1", "STATUS=active: qwen · 2 sleeping · 0 queued",
                         f"MAINPID={os.getpid()}"]


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda n: n.watchdog(), ["WATCHDOG=1"]),
        (lambda n: n.stopping(), ["STOPPING=1", "STATUS=stopping"]),
        (lambda n: n.status("switching: a -> b · 0 sleeping · 3 queued"),
         ["STATUS=switching: a -> b · 0 sleeping · 3 queued"]),
        (lambda n: n.extend_timeout(90), ["EXTEND_TIMEOUT_USEC=90000000"]),
    ],
)
def test_single_notifications(systemd_socket, call, expected):
    address, receive = systemd_socket
    assert call(Notifier(env={"NOTIFY_SOCKET": address}))
    assert receive() == expected


def test_reloading_sends_monotonic_usec(systemd_socket):
    address, receive = systemd_socket
    assert Notifier(env={"NOTIFY_SOCKET": address}).reloading()
    lines = receive()
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and int(value) > 0


def test_status_is_not_resent_when_unchanged(systemd_socket):
    address, receive = systemd_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": address})
    notifier.status("active: a · 0 sleeping · 0 queued")
    notifier.status("active: a · 0 sleeping · 0 queued")
    notifier.status("active: b · 1 sleeping · 0 queued")
    assert receive() == ["STATUS=active: a · 0 sleeping · 0 queued"]
    assert receive() == ["STATUS=active: b · 1 sleeping · 0 queued"]


def test_abstract_socket():
    name = f"llmux-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10)
    try:
        assert socket_address("@" + name) == b"\0" + name.encode()
        assert Notifier(env={"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier(env={})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval() is None


def test_unreachable_socket_is_not_an_error(tmp_path):
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


async def test_watchdog_pings_from_the_event_loop(systemd_socket):
    address, receive = systemd_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_interval() == 0.01
    task = asyncio.create_task(notifier.run_watchdog())
    loop = asyncio.get_running_loop()
    try:
        for _ in range(3):
            assert await loop.run_in_executor(None, receive) == ["WATCHDOG=1"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_task_ends_at_once_without_watchdog():
    await asyncio.wait_for(Notifier(env={}).run_watchdog(), timeout=10)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(active=["qwen"], sleeping=2, queued=0), "active: qwen · 2 sleeping · 0 queued"),
        (dict(active=[], sleeping=0, queued=0), "active: none · 0 sleeping · 0 queued"),
        (dict(active=["a", "b"], sleeping=1, queued=4, pinned="a"),
         "active: a, b · 1 sleeping · 4 queued · pinned: a"),
        (dict(active=["a"], sleeping=1, queued=2, switching="a -> b"),
         "switching: a -> b · 1 sleeping · 2 queued"),
    ],
)
def test_format_status(kwargs, expected):
    assert format_status(**kwargs) == expected
