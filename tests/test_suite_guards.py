"""The test suite guards itself against assertions that cannot fail.

Two slips make an ``assert`` pass whatever the code under test does:

* a coroutine function called without ``await``: the coroutine object is always true
  (``assert ordering.event_has_been_seen(event)``);
* a bare ``assert await ...`` on an answer that is not a bool: ``Begun`` is always
  true, a list only says "not empty", None is never true.  Such answers are compared
  (``==``, ``is True``, ``isinstance``) instead.

Both are found by reading the tests' source: the names checked are those of the
coroutine methods of the store's public classes and of the helpers' consumers.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

from ordering import CausalOrdering, admin
from ordering.backends import Backend

from .helpers import Consumer

TESTS = Path(__file__).resolve().parent


def _coroutine_returns() -> dict[str, set[str]]:
    """Coroutine function name -> the return annotations it has across the classes
    and modules the tests call."""
    found: dict[str, set[str]] = {}
    owners: list[object] = [CausalOrdering, Backend, Consumer, admin]
    for owner in owners:
        for name, member in inspect.getmembers(owner):
            if name.startswith("__") or not inspect.iscoroutinefunction(member):
                continue
            returns = inspect.signature(member).return_annotation
            text = returns if isinstance(returns, str) else getattr(returns, "__name__", "")
            found.setdefault(name, set()).add(str(text))
    return found


COROUTINES = _coroutine_returns()


def _called_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute):
            return node.func.attr
        if isinstance(node.func, ast.Name):
            return node.func.id
    return None


def _asserted(test: ast.expr) -> ast.expr:
    """The expression an assert tests, without ``not``."""
    while isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test = test.operand
    return test


def _problems(source: str, where: str) -> Iterator[str]:
    tree = ast.parse(source, filename=where)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        tested = _asserted(node.test)
        name = _called_name(tested)
        if name in COROUTINES:
            yield f"{where}:{node.lineno}: {name}(...) is asserted without await"
        if isinstance(tested, ast.Await):
            awaited = _called_name(tested.value)
            returns = COROUTINES.get(awaited or "", set())
            if returns - {"bool"}:
                yield (
                    f"{where}:{node.lineno}: a bare assert on {awaited}(...), which returns "
                    f"{' or '.join(sorted(returns))}: compare it instead"
                )


def test_the_names_checked_are_the_stores_coroutines() -> None:
    """The guard knows the calls it looks for (a renamed method would slip past)."""
    assert COROUTINES["event_has_been_seen"] == {"bool"}
    assert COROUTINES["begin"] == {"Begun | Refused"}
    assert COROUTINES["consume"] == {"bool"}
    assert "get_followers" in COROUTINES and "status" in COROUTINES


def test_the_guard_finds_both_slips() -> None:
    source = (
        "async def t(ordering, backend, request):\n"
        "    assert ordering.event_has_been_seen(1)\n"
        "    assert not ordering.record_event_as_processing(1)\n"
        "    assert await backend.begin(request)\n"
        "    assert await ordering.event_has_been_seen(1)\n"
        "    assert isinstance(await backend.begin(request), object)\n"
    )
    found = list(_problems(source, "example.py"))
    assert [line.split(":")[1] for line in found] == ["2", "3", "4"]


def test_no_test_asserts_what_cannot_fail() -> None:
    problems = [
        problem
        for path in sorted(TESTS.rglob("*.py"))
        if path.name != Path(__file__).name
        for problem in _problems(path.read_text(), str(path.relative_to(TESTS.parent)))
    ]
    assert problems == []
