"""Where a run's time goes: `with recording() as seconds:` collects, per step name, the seconds
spent inside every `with step(name):` reached from that block (load, checker, annotation, each
pass, save, verification, ...). Outside a recording `step` costs nothing but a lookup; nested
steps count in both."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("normopt_timings", default=None)


@contextlib.contextmanager
def recording(into: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    seconds = into if into is not None else {}
    token = _current.set(seconds)
    try:
        yield seconds
    finally:
        _current.reset(token)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    seconds = _current.get()
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
