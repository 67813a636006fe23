"""Small helpers shared by the runtime and orchestrator tests."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from ports import free_port  # noqa: F401  (re-exported: tests import it from here)

PYTHON = sys.executable
#: generous: tests run on 2 shared cores next to other helpers' suites
DEADLINE = 60.0




def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def ahttp(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    return await asyncio.to_thread(http, method, url, body, timeout)


async def wait_http(url: str, deadline: float = DEADLINE) -> None:
    """Poll until url answers 200 (event-like: returns as soon as it does)."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            status, _ = await ahttp("GET", url, timeout=5)
            if status == 200:
                return
        except OSError as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {deadline}s ({last})")


async def wait_until(predicate, deadline: float = DEADLINE, what: str = "condition") -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {deadline}s")


def completion(base_url: str, model: str, prompt: str = "What is 2+2?", timeout: float = 30.0) -> str:
    """The deterministic temperature-0 answer of a backend."""
    status, body = http(
        "POST", f"{base_url}/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=timeout,
    )
    assert status == 200, body
    return body["choices"][0]["text"]
