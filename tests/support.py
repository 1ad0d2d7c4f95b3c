"""What tests share besides fixtures: waiting for a condition, never for a time.

``eventually`` polls a predicate until it holds or fails the test naming what it waited
for; ``eventually_blocking`` is its twin for synchronous tests and fixtures (subprocesses).
``handled`` reads a service's endpoint statistics: wait on it for a published message to
have been handled.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar, overload

import pytest

from gpufaas.shared.service import Service

T = TypeVar("T")

INTERVAL_S = 0.01  # short: a wait ends soon after its condition holds


def _timed_out(what: str, timeout: float, last: object) -> NoReturn:
    pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last: {repr(last)[:200]})")


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T], timeout: float = ..., what: str = ..., interval: float = ...
) -> T: ...


async def eventually(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = INTERVAL_S,
) -> object:
    """Poll ``predicate()`` (sync or async) until it returns something true, and return that.

    Fails the test after ``timeout`` seconds, naming ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            _timed_out(what, timeout, result)
        await asyncio.sleep(interval)


def eventually_blocking(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = INTERVAL_S,
) -> T:
    """``eventually`` for synchronous code: blocks the thread between polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            _timed_out(what, timeout, result)
        time.sleep(interval)


def handled(service: Service, subject: str) -> int:
    """Messages ``service`` has finished handling on ``subject`` (its endpoint statistics)."""
    return sum(e.requests for e in service.service_stats().endpoints if e.subject == subject)
