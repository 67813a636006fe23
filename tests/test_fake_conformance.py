"""The hand-written fake switchers speak the real Switcher's language.

tests/test_http.py and tests/test_bus_support.py drive the front end and the
bus service with small fakes instead of a Switcher. A fake that drifts from the
real public methods (a renamed method, a parameter the real one lacks, a
coroutine where the real one is plain) would keep those suites green while
the product breaks, so every public method of each fake must be the real
Switcher's method under the same name, with the same parameters (names,
kinds, defaults) and the same sync/async nature. What a fake adds for its
tests alone is listed here by name.
"""

from __future__ import annotations

import inspect

import pytest

from llmuxd.switcher import Switcher
from test_bus_support import FakeSwitcher as BusFakeSwitcher
from test_http import FakeSwitcher as HttpFakeSwitcher

#: fake -> its public members that exist for its tests only (not Switcher API)
TEST_ONLY = {
    HttpFakeSwitcher: {"leases_out"},
    BusFakeSwitcher: {"replace_models"},
}


def public_methods(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls, callable)
            if not name.startswith("_") and not inspect.isclass(member)}


def shape(function: object) -> str:
    """What a caller relies on: parameter names, kinds and defaults (not the
    annotations, which name the fake's own lease types), and async or not."""
    sig = inspect.signature(function)
    bare = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                       return_annotation=inspect.Signature.empty)
    return f"{'async ' if inspect.iscoroutinefunction(function) else ''}def {bare}"


@pytest.mark.parametrize("fake", list(TEST_ONLY), ids=lambda c: c.__module__)
def test_every_public_method_of_the_fake_is_the_real_switchers(fake):
    real = public_methods(Switcher)
    extra = sorted(set(public_methods(fake)) - set(real) - TEST_ONLY[fake])
    assert extra == [], f"{fake.__module__}.FakeSwitcher has methods Switcher lacks: {extra}"
    wrong = {name: f"fake: {shape(member)}; Switcher: {shape(real[name])}"
             for name, member in public_methods(fake).items()
             if name in real and shape(member) != shape(real[name])}
    assert wrong == {}, f"{fake.__module__}.FakeSwitcher differs from Switcher: {wrong}"


@pytest.mark.parametrize("fake", list(TEST_ONLY), ids=lambda c: c.__module__)
def test_the_test_only_list_names_only_what_the_fake_has(fake):
    assert TEST_ONLY[fake] <= set(public_methods(fake)) - set(public_methods(Switcher))
