"""The front end with API keys, against the fake switcher and backends of test_http.

What a client sees: 401 for a missing, wrong or expired key (Bearer or
x-api-key), the same 404 for a model out of its key's scope as for one that
does not exist, 429 with OpenAI's headers at the key's limits, /v1/models
filtered, and the key never forwarded to a backend.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llmuxd.http import FrontEnd, HttpServer
from llmuxd.http.auth import API_KEY, KEY_STORE, KeyGate, authenticate, exposure_problem
from llmuxd.keys import ApiKey, KeyStore, hash_secret
from llmuxd.metrics import Metrics
from llmuxd.priority import Priority
from test_http import Client, FakeBackend, FakeSwitcher, make_config

CHAT, BATCH, OLD = "sk-llmux-chat", "sk-llmux-batch", "sk-llmux-old"


def keys() -> list:
    past = datetime.now(timezone.utc) - timedelta(days=1)
    return [
        ApiKey("chat", hash_secret(CHAT), models=("alpha",)),
        ApiKey("batch", hash_secret(BATCH), rate=0.25, burst=2, max_in_flight=5, priority=Priority.BATCH),
        ApiKey("old", hash_secret(OLD), expires=past),
    ]


class PrioritySwitcher(FakeSwitcher):
    """A switcher whose acquire takes the request's priority (the switcher room's signature)."""

    async def acquire(self, model, timeout=None, *, priority=Priority.INTERACTIVE):
        self.priorities = getattr(self, "priorities", []) + [priority]
        return await super().acquire(model, timeout)


@pytest.fixture(params=[FakeSwitcher, PrioritySwitcher], ids=["plain-acquire", "acquire-with-priority"])
async def rig(request):
    alpha, beta = FakeBackend("alpha"), FakeBackend("beta")
    await alpha.server.start_server()
    await beta.server.start_server()
    switcher = request.param({"alpha": alpha.url, "beta": beta.url})
    metrics = Metrics()
    gate = KeyGate(KeyStore(keys()))
    front = FrontEnd(make_config(), switcher, metrics, keys=gate)
    server = HttpServer(front.make_app(), listen="127.0.0.1:0")
    await server.start()
    client = Client(f"http://{server.addresses[0]}")
    yield SimpleNamespace(client=client, switcher=switcher, alpha=alpha, front=front, metrics=metrics, gate=gate)
    await client.close()
    await server.stop()
    await alpha.server.close()
    await beta.server.close()


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


AUTH_CASES = [
    # (headers, words of the 401 message)
    ({}, "You didn't provide an API key"),
    (bearer("sk-llmux-wrong"), "Incorrect API key provided"),
    ({"x-api-key": "sk-llmux-wrong"}, "Incorrect API key provided"),
    ({"Authorization": f"Basic {CHAT}"}, "You didn't provide an API key"),
    (bearer(OLD), "has expired"),
]


@pytest.mark.parametrize("headers,words", AUTH_CASES, ids=["missing", "wrong", "wrong-x-api-key", "not-bearer",
                                                           "expired"])
async def test_refused_keys_get_401_before_the_body_is_read(rig, headers, words):
    for path in ("/v1/chat/completions", "/v1/models", "/v1/models/alpha"):
        method = rig.client.post if path == "/v1/chat/completions" else rig.client.get
        resp = await method(path, json={"model": "alpha"}, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="llmux"'
        err = (await resp.json())["error"]
        assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")
        assert words in err["message"]
        assert "chat" not in err["message"] and "old" not in err["message"], "no key id in a refusal"
    assert rig.switcher.acquired == []


@pytest.mark.parametrize("headers", [bearer(CHAT), {"x-api-key": CHAT}, {"Authorization": f"bearer  {CHAT} "}])
async def test_a_good_key_is_served_and_never_forwarded(rig, headers):
    resp = await rig.client.post("/v1/chat/completions", json={"model": "alpha", "messages": []},
                                 headers={**headers, "X-Other": "kept"})
    assert resp.status == 200 and (await resp.json())["model"] == "alpha"
    seen = {k.lower() for k in rig.alpha.seen_headers}
    assert "authorization" not in seen and "x-api-key" not in seen and "x-other" in seen


async def test_out_of_scope_model_is_the_same_404_as_an_unknown_one(rig):
    async def answer(model, path="/v1/chat/completions"):
        if path.startswith("/v1/models/"):
            resp = await rig.client.get(path + model, headers=bearer(CHAT))
        else:
            resp = await rig.client.post(path, json={"model": model}, headers=bearer(CHAT))
        return resp.status, (await resp.json())["error"]

    for path in ("/v1/chat/completions", "/v1/models/"):
        status, forbidden = await answer("beta", path)
        status_unknown, unknown = await answer("zeta", path)
        assert status == status_unknown == 404
        assert forbidden == {**unknown, "message": unknown["message"].replace("zeta", "beta")}
        assert forbidden["code"] == "model_not_found" and forbidden["param"] == "model"
        assert "does not exist or you do not have access to it; known models: alpha" in forbidden["message"]
    assert rig.switcher.acquired == []


async def test_models_list_is_filtered_by_key(rig):
    async def listed(secret):
        resp = await rig.client.get("/v1/models", headers=bearer(secret))
        return [m["id"] for m in (await resp.json())["data"]]

    assert await listed(CHAT) == ["alpha"]
    assert await listed(BATCH) == ["alpha", "beta"]


async def test_rate_limit_answers_429_with_openai_headers(rig):
    for _ in range(2):  # burst 2
        assert (await rig.client.post("/v1/chat/completions", json={"model": "beta"}, headers=bearer(BATCH))).status == 200
    resp = await rig.client.post("/v1/chat/completions", json={"model": "beta"}, headers=bearer(BATCH))
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
    assert "Rate limit reached for key 'batch'" in err["message"]
    headers = resp.headers
    assert int(headers["Retry-After"]) >= 1 and 0 < int(headers["retry-after-ms"]) <= 4000
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    # the other key is not affected
    assert (await rig.client.post("/v1/chat/completions", json={"model": "alpha"}, headers=bearer(CHAT))).status == 200
    text = await (await rig.client.get("/metrics")).text()
    assert 'llmux_requests_total{key="batch",model="beta",status="200",waited="false"} 2.0' in text
    assert 'llmux_requests_total{key="batch",model="beta",status="429",waited="false"} 1.0' in text
    assert 'llmux_requests_total{key="chat",model="alpha",status="200",waited="false"} 1.0' in text
    assert BATCH not in text and hash_secret(BATCH) not in text
    usage = rig.gate.usage()
    assert (usage["batch"]["requests"], usage["batch"]["limited"], usage["batch"]["in_flight"]) == (2, 1, 0)


async def test_priority_goes_to_the_switcher_that_takes_it(rig):
    await rig.client.post("/v1/chat/completions", json={"model": "beta"}, headers=bearer(BATCH))
    await rig.client.post("/v1/chat/completions", json={"model": "alpha"}, headers=bearer(CHAT))
    assert [m for m, _ in rig.switcher.acquired] == ["beta", "alpha"]
    if isinstance(rig.switcher, PrioritySwitcher):
        assert rig.switcher.priorities == [Priority.BATCH, Priority.INTERACTIVE]


async def test_authenticate_stores_the_key_on_the_request_for_other_routes():
    """The contract the console's routes rely on: request[API_KEY] and app[KEY_STORE]."""
    async def whoami(request):
        key = authenticate(request)
        assert request[API_KEY] is key
        return web.json_response({"id": key.id if key else None})

    for store, headers, expected in [(KeyStore(keys()), bearer(CHAT), "chat"), (KeyStore(), {}, None)]:
        app = web.Application()
        KeyGate(store).install(app)
        assert app[KEY_STORE] is store
        app.router.add_get("/whoami", whoami)
        async with TestClient(TestServer(app)) as client:
            assert (await (await client.get("/whoami", headers=headers)).json()) == {"id": expected}


@pytest.mark.parametrize("addresses,configured,auth,refused", [
    (["127.0.0.1:3000"], False, "auto", False),
    (["[::1]:3000", "localhost:3000", "unix:/run/llmux.sock"], False, "auto", False),
    (["0.0.0.0:3000"], False, "auto", True),
    (["127.0.0.1:3000", "192.168.1.5:3000"], False, "auto", True),
    (["gpu1.example:3000"], False, "auto", True),
    (["0.0.0.0:3000"], True, "auto", False),
    (["0.0.0.0:3000"], False, "none", False),
])
def test_other_hosts_are_served_only_with_keys_or_auth_none(addresses, configured, auth, refused):
    problem = exposure_problem(addresses, configured, auth)
    assert (problem is not None) == refused
    if refused:
        assert "no API keys" in problem and "auth: none" in problem and "llmuxctl keys add" in problem
