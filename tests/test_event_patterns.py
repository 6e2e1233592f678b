"""Event-name patterns (``*``, ``**``, ``?``): the same answers as Moleculer's regex reading,
in time linear in the name whatever the pattern (patterns come from peers' INFO and from HTTP
clients of the gateway: a backtracking regex made of many ``**`` froze a node)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

import nerve
from nerve.registry import match_event

import pytest

pytestmark = pytest.mark.anyio


def reference(name: str, pattern: str) -> bool:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        out.append("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z").match(name) is not None


@settings(max_examples=3000, deadline=None)
@given(st.text("ab.*?", max_size=9), st.text("ab.", max_size=10))
def test_matching_agrees_with_the_regex_reading(pattern: str, name: str) -> None:
    assert match_event(name, pattern) == reference(name, pattern)


def test_known_cases() -> None:
    assert match_event("user.created", "user.*")
    assert not match_event("user.created.today", "user.*")
    assert match_event("user.created.today", "user.**")
    assert match_event("anything.at.all", "**")
    assert match_event("a.b", "?.?") and not match_event("ab.b", "?.?")
    assert match_event("x", "x") and not match_event("x", "y")


def test_pathological_patterns_answer_at_once() -> None:
    # As backtracking regexes these take minutes to hours; here a few milliseconds.
    assert not match_event("a" * 40, "**" * 10 + "x")
    assert not match_event("a." * 200, "**a**a**a**a**a**a**a**a**b")
    assert not match_event("a" * 2000, "*a*a*a*a*a*a*a*a*a*a*a*b")
    assert match_event("a" * 2000 + "b", "*a*a*a*a*a*a*a*a*a*a*a*b")


async def test_a_peer_announcing_a_pathological_pattern_does_not_freeze_the_node() -> None:
    import trio

    class Bad(nerve.Service):
        name = "bad"

        @nerve.event("**" * 40 + "x")
        async def never(self, ctx: nerve.Context) -> None:
            raise AssertionError("matched")

    async with nerve.Broker("a", services=[Bad()]) as a:
        with trio.fail_after(30):
            for _ in range(100):
                await a.emit("y" * 60, 1)
