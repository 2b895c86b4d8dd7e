"""The one way a test waits: poll a condition until a deadline, then fail saying what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], what: str, timeout: float = 120.0, every: float = 0.01) -> T:
    """Return the first true value of `cond()`; an AssertionError naming `what` once `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
