"""The HTTP server's log (llmuxd/http/listen.py `_ServerLog`, aiohttp's
`logger=`): a request aiohttp's parser refused is one warning line without a
traceback, at most one per interval, counting the rest; any other exception
keeps its ERROR and traceback. The end-to-end check (100 KB headers against
`llmuxd run`) is tests/stress/test_bad_input.py's."""

from __future__ import annotations

import logging
import time

import pytest
from aiohttp.http_exceptions import BadStatusLine, LineTooLong

from llmuxd.http.listen import _ServerLog


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler = Records()
    loggers = [logging.getLogger("llmuxd.http.listen"), logging.getLogger("aiohttp.server")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def refused(n: int) -> LineTooLong:
    return LineTooLong(f"header line {n}", "8190", "102400")


def test_refused_requests_are_one_warning_per_interval_counting_the_rest(records):
    server_log = _ServerLog(interval=0.2)
    for n in range(5):
        server_log.exception("Error handling request", exc_info=refused(n))
    server_log.exception("Error handling request", exc_info=BadStatusLine("GARBAGE"))
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.WARNING, None)]
    assert "refused a malformed HTTP request (400" in records[0].getMessage()
    time.sleep(0.25)  # the interval is over
    server_log.exception("Error handling request", exc_info=refused(9))
    assert len(records) == 2 and "(5 more since the last such line)" in records[1].getMessage()


def test_other_exceptions_keep_their_traceback(records):
    try:
        raise RuntimeError("a bug of ours")
    except RuntimeError as exc:
        _ServerLog().exception("Error handling request", exc_info=exc)
    [record] = records
    assert record.levelno == logging.ERROR and record.name == "aiohttp.server"
    assert record.exc_info and record.exc_info[1].args == ("a bug of ours",)
