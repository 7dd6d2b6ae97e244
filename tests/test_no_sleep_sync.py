"""Tests synchronise on conditions with bounded polls (``tests.kafka_helpers.wait_until``),
never on fixed sleeps: a sleep that waits for something to have happened is slow when it is
long and flaky when it is short. This keeps the rule: a ``time.sleep``/``asyncio.sleep`` in
the test tree must be inside a loop's body (the pause of a bounded poll), in a function named
as a load generator or pacer, or carry a comment on its line saying it is not a
synchronisation (``# pace: ...`` for pacing, "the measurement window, not a synchronisation"
for a measurement)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SLEEPERS = {("time", "sleep"), ("asyncio", "sleep")}
PACER_NAME = re.compile(r"pace|pacer|load|generat|sender", re.IGNORECASE)
ALLOWING_COMMENT = re.compile(r"#\s*pace:|not a synchroni[sz]ation", re.IGNORECASE)
_LOOPS = (ast.While, ast.For, ast.AsyncFor)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.Module)


def _is_sleep(call: ast.Call, bare_sleep: bool) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return (f.value.id, f.attr) in SLEEPERS
    return bare_sleep and isinstance(f, ast.Name) and f.id == "sleep"


def _polls(loop: ast.While | ast.For | ast.AsyncFor) -> bool:
    """A loop is a poll when it tests a condition each round: a ``while`` with a real
    condition, or a body that can leave or fail (``for _ in range(3): sleep(1)`` is three
    fixed sleeps, not a poll)."""
    if isinstance(loop, ast.While) and not (
        isinstance(loop.test, ast.Constant) and loop.test.value
    ):
        return True
    exits = (ast.Break, ast.Return, ast.Raise, ast.Assert, ast.If)
    return any(isinstance(n, exits) for stmt in loop.body for n in ast.walk(stmt))


def _comments(source: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string
    return found


def sync_sleeps(source: str) -> list[int]:
    """The lines of ``source`` with a sleep that is neither a poll's pause nor marked pacing
    or measuring."""
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    # `from time import sleep` / `from asyncio import sleep` make a bare `sleep(...)` one too.
    bare_sleep = any(
        isinstance(n, ast.ImportFrom)
        and n.module in {"time", "asyncio"}
        and any(a.name == "sleep" and a.asname is None for a in n.names)
        for n in ast.walk(tree)
    )
    comments = _comments(source)
    bad: list[int] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _is_sleep(node, bare_sleep)):
            continue
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if any(ALLOWING_COMMENT.search(comments.get(n, "")) for n in lines):
            continue
        child: ast.AST = node
        parent = parents.get(child)
        allowed = False
        # Up to the enclosing function: a loop body, or a function named as a pacer.
        while parent is not None:
            if isinstance(parent, _LOOPS) and any(child is s for s in parent.body):
                allowed = _polls(parent)
                break
            if isinstance(parent, _SCOPES):
                name = getattr(parent, "name", "")
                allowed = bool(name) and bool(PACER_NAME.search(name))
                break
            child, parent = parent, parents.get(parent)
        if not allowed:
            bad.append(node.lineno)
    return sorted(bad)


def test_no_sleep_is_used_as_a_synchronisation() -> None:
    found = [
        f"{path.relative_to(TESTS.parent)}:{line}"
        for path in sorted(TESTS.rglob("*.py"))
        for line in sync_sleeps(path.read_text())
    ]
    assert not found, (
        "fixed sleeps used as synchronisation (wait for the condition with "
        "tests.kafka_helpers.wait_until instead, or mark pacing with '# pace:'):\n"
        + "\n".join(found)
    )


def test_the_scan_tells_a_poll_from_a_fixed_sleep() -> None:
    source = """
import asyncio
import time
from time import sleep


def fixed():
    start()
    time.sleep(1.5)  # let it start
    asyncio.sleep(0.2)
    sleep(2)


def polled(deadline):
    while not ready():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for _ in range(3):
        if ready():
            break
        time.sleep(0.1)


def sender():
    time.sleep(0.01)


def fixed_in_a_loop():
    for _ in range(3):
        time.sleep(1)
    while True:
        time.sleep(1)


def measured():
    time.sleep(2.0)  # the measurement window, not a synchronisation
    time.sleep(0.002)  # pace: a slow consumer


def loop_in_test_not_body(items):
    for item in (time.sleep(1), items):
        pass
    while True:
        def inner():
            time.sleep(1)
        break
"""
    assert sync_sleeps(source) == [9, 10, 11, 30, 32, 41, 45]
