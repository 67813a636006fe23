"""journald logging: native-protocol datagrams, <N> prefixes, plain lines."""

from __future__ import annotations

import array
import io
import logging
import os
import socket
import struct

import pytest

from llmuxd.daemon import journal
from llmuxd.daemon.journal import (
    EVENT_SWITCH_FINISHED,
    MESSAGE_IDS,
    JournalHandler,
    encode_fields,
    journal_field_name,
    log_event,
    setup_logging,
)


def decode_fields(data: bytes) -> dict[str, str]:
    """Parse the native journal protocol (the inverse of encode_fields)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            fields[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return fields


@pytest.fixture()
def journald(tmp_path):
    """A datagram socket standing in for /run/systemd/journal/socket."""
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def receive() -> dict[str, str]:
        data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        if not data and ancdata:  # a memfd passed with SCM_RIGHTS
            fds = array.array("i")
            fds.frombytes(ancdata[0][2][: fds.itemsize])
            with os.fdopen(fds[0], "rb") as memfd:
                memfd.seek(0)
                data = memfd.read()
        return decode_fields(data)

    yield path, receive
    sock.close()


@pytest.fixture()
def logger():
    log = logging.getLogger("llmuxd.test_journal")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_encode_fields_simple_and_binary_forms():
    data = encode_fields({"MESSAGE": "two\nlines", "PRIORITY": 6, "LLMUX_MODEL": "qwen"})
    assert data == (b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"
                    b"PRIORITY=6\nLLMUX_MODEL=qwen\n")
    assert decode_fields(data) == {"MESSAGE": "two\nlines", "PRIORITY": "6", "LLMUX_MODEL": "qwen"}


def test_event_reaches_journald_with_its_fields(journald, logger):
    path, receive = journald
    logger.addHandler(JournalHandler(path))
    log_event(logger, EVENT_SWITCH_FINISHED, "switched %s -> %s in %.1fs", "a", "b", 3.25,
              model="b", from_model="a", duration=3.25, error=None)
    fields = receive()
    assert fields["MESSAGE"] == "switched a -> b in 3.2s"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "llmuxd"
    assert fields["LLMUX_EVENT"] == "switch_finished"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS[EVENT_SWITCH_FINISHED]
    assert fields["LLMUX_MODEL"] == "b"
    assert fields["LLMUX_FROM_MODEL"] == "a"
    assert fields["LLMUX_DURATION"] == "3.25"
    assert "LLMUX_ERROR" not in fields  # None is left out
    assert fields["CODE_FUNC"] == "test_event_reaches_journald_with_its_fields"


@pytest.mark.parametrize(
    "level, priority",
    [(logging.DEBUG, "7"), (logging.INFO, "6"), (logging.WARNING, "4"),
     (logging.ERROR, "3"), (logging.CRITICAL, "2")],
)
def test_priorities(journald, logger, level, priority):
    path, receive = journald
    logger.addHandler(JournalHandler(path))
    logger.log(level, "x")
    assert receive()["PRIORITY"] == priority


def test_traceback_is_one_entry(journald, logger):
    path, receive = journald
    logger.addHandler(JournalHandler(path))
    try:
        raise RuntimeError("backend fell over")
    except RuntimeError:
        logger.exception("switch failed")
    message = receive()["MESSAGE"]
    assert message.startswith("switch failed\nTraceback")
    assert "RuntimeError: backend fell over" in message


def test_entry_too_big_for_a_datagram_goes_as_memfd(journald, logger):
    path, receive = journald
    logger.addHandler(JournalHandler(path))
    big = "x" * (1 << 19)  # above the default datagram limit
    logger.info("%s", big)
    assert receive()["MESSAGE"] == big


def test_missing_socket_falls_back_without_raising(tmp_path, logger):
    out = io.StringIO()
    fallback = logging.StreamHandler(out)
    fallback.setFormatter(journal.PrefixFormatter())
    logger.addHandler(JournalHandler(str(tmp_path / "no-journald"), fallback=fallback))
    logger.warning("still logged")
    assert out.getvalue() == "<4>llmuxd.test_journal: still logged\n"


def test_prefix_formatter_prefixes_every_line():
    record = logging.LogRecord("llmuxd", logging.ERROR, __file__, 1, "a\nb", (), None)
    assert journal.PrefixFormatter().format(record) == "<3>llmuxd: a\n<3>b"


@pytest.mark.parametrize(
    "key, name",
    [("model", "LLMUX_MODEL"), ("from_model", "LLMUX_FROM_MODEL"), ("MESSAGE_ID", "MESSAGE_ID")],
)
def test_field_names(key, name):
    assert journal_field_name(key) == name


@pytest.mark.parametrize("key", ["_TRUSTED", "with-dash", "Ünicode"])
def test_bad_field_names_are_refused(key):
    with pytest.raises(ValueError, match="invalid journal field name"):
        journal_field_name(key)


def test_message_ids_are_distinct_128_bit_ids():
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    for value in MESSAGE_IDS.values():
        assert len(value) == 32 and int(value, 16) >= 0


def _journal_stream_env(stream) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_setup_under_journald_uses_native_socket(tmp_path, journald, logger):
    path, receive = journald
    with open(tmp_path / "stderr", "w") as stream:
        handler = setup_logging(stream=stream, env=_journal_stream_env(stream),
                                journal_socket=path, logger=logger)
        assert isinstance(handler, JournalHandler)
        logger.info("hello")
        assert receive()["MESSAGE"] == "hello"


def test_setup_under_journald_without_socket_prefixes_stderr(tmp_path, logger):
    with open(tmp_path / "stderr", "w+") as stream:
        setup_logging(stream=stream, env=_journal_stream_env(stream),
                      journal_socket=str(tmp_path / "none"), logger=logger)
        logger.warning("disk is full")
        stream.seek(0)
        assert stream.read() == "<4>llmuxd.test_journal: disk is full\n"


def test_setup_elsewhere_writes_plain_lines(tmp_path, logger):
    with open(tmp_path / "stderr", "w+") as stream:
        # JOURNAL_STREAM of some other file: our stderr is not the journal
        setup_logging(stream=stream, env={"JOURNAL_STREAM": "1:2"}, logger=logger)
        logger.info("serving on 127.0.0.1:3000")
        stream.seek(0)
        line = stream.read()
    assert not line.startswith("<")
    assert line.rstrip().endswith("INFO    llmuxd.test_journal: serving on 127.0.0.1:3000")


def test_setup_twice_replaces_its_own_handler(tmp_path, logger):
    with open(tmp_path / "stderr", "w") as stream:
        setup_logging(stream=stream, env={}, logger=logger)
        setup_logging(stream=stream, env={}, logger=logger)
    assert [type(h) for h in logger.handlers if getattr(h, "_llmuxd_handler", False)] == [
        logging.StreamHandler]
