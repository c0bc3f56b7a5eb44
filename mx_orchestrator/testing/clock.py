"""A virtual clock for asyncio that still waits for real I/O: simulations against real registries.

trio's ``MockClock`` makes time jump whenever every task sleeps, but the Redis
client is asyncio-only, and SQLite calls run in worker threads: a clock that
jumps while a registry reply is on its way would expire leases, time out calls
and reorder the simulation. :class:`VirtualClockLoop` is an asyncio event loop
whose ``time()`` is virtual and whose waiting follows one rule:

* while any *accounted* real I/O is in flight (:meth:`VirtualClockLoop.real_io`,
  every call through :func:`accounted`, and after
  :meth:`VirtualClockLoop.account_worker_threads` anything running in anyio's
  worker threads: allocations, verifications), the loop waits for it in real
  time and virtual time stands still;
* otherwise, when nothing is ready, virtual time jumps to the next timer;
* a sleep *inside* an accounted call (a registry's retry backoff) waits on
  virtual time: while it sleeps, that call is not counted as real I/O.

So a transfer of 16 GB that the model says takes 5 s costs no real time, while
every registry call is a real call to a real server, taking zero virtual time.

    anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})
    registry = accounted(SqliteRegistry(path, clock=virtual_wall_clock))
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import heapq
import inspect
import selectors
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio

__all__ = ["VirtualClockLoop", "accounted", "run_on_virtual_time", "virtual_wall_clock"]

T = TypeVar("T")

# how long one real wait for accounted I/O lasts before the loop looks again
_REAL_WAIT = 0.05


class _VirtualSelector:
    """The loop's selector, with waits replaced by jumps of virtual time when nothing real is pending."""

    def __init__(self, selector: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._selector = selector
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self._loop
        if loop.real_io_in_flight or loop.worker_threads_busy():
            # wait for the real reply (a socket or a worker thread's wake-up) in real time
            wait = _REAL_WAIT if timeout is None else min(timeout, _REAL_WAIT)
            return self._selector.select(wait)
        events = self._selector.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled and nothing accounted: something real we did not count
            return self._selector.select(_REAL_WAIT)
        loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


#: set inside an accounted call (in its task's context): sleeps there wait on virtual time
_in_accounted_call: contextvars.ContextVar[bool] = contextvars.ContextVar("mxo_accounted", default=False)


class _SleepInsideRealIo(asyncio.TimerHandle):
    """A sleep inside an accounted call (a registry's retry backoff): while it waits, the call is
    not waiting for anything real, so virtual time may move to it (else nothing would wake it)."""

    def __init__(
        self, when: float, callback: Any, args: tuple[Any, ...], loop: VirtualClockLoop, context: Any
    ) -> None:
        super().__init__(when, self._fire, (callback, *args), loop, context)
        self._virtual_loop = loop
        self._waiting = True
        loop.real_io_in_flight -= 1

    def _resume(self) -> None:
        if self._waiting:
            self._waiting = False
            self._virtual_loop.real_io_in_flight += 1

    def _fire(self, callback: Any, *args: Any) -> None:
        self._resume()
        callback(*args)

    def cancel(self) -> None:
        self._resume()
        super().cancel()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time; see the module docstring for the waiting rule."""

    def __init__(self) -> None:
        super().__init__()
        # virtual seconds since the loop began: small numbers, so adding a timer's delay is exact
        # (near 1.7e9, float steps are 2e-7 s and a timer due "now" would never be due)
        self._now = 0.0
        #: the wall-clock time the loop began, for :func:`virtual_wall_clock`
        self.epoch = time.time()
        self.real_io_in_flight = 0
        self._thread_limiter: anyio.CapacityLimiter | None = None
        self._selector: Any = _VirtualSelector(self._selector, self)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        # asyncio.sleep's own callback: a sleep, not a timeout guarding real I/O
        if _in_accounted_call.get() and getattr(callback, "__name__", "") == "_set_result_unless_cancelled":
            timer = _SleepInsideRealIo(when, callback, args, self, context)
            heapq.heappush(self._scheduled, timer)  # type: ignore[attr-defined]
            timer._scheduled = True  # type: ignore[attr-defined]
            return timer
        return super().call_at(when, callback, *args, context=context)

    def account_worker_threads(self) -> None:
        """From now on, work in anyio's worker threads (allocations, verifications, SQLite calls)
        is real I/O too: virtual time waits for it. Call it from a task of this loop."""
        self._thread_limiter = anyio.to_thread.current_default_thread_limiter()

    def worker_threads_busy(self) -> bool:
        limiter = self._thread_limiter
        return limiter is not None and limiter.borrowed_tokens > 0

    @contextlib.contextmanager
    def real_io(self) -> Iterator[None]:
        """Virtual time stands still until the block ends (it awaits something real)."""
        self.real_io_in_flight += 1
        try:
            yield
        finally:
            self.real_io_in_flight -= 1


def _running_virtual_loop() -> VirtualClockLoop | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop if isinstance(loop, VirtualClockLoop) else None


def virtual_wall_clock() -> float:
    """The running virtual loop's time as a wall clock (for registries' ``clock=``); else ``time.time()``."""
    loop = _running_virtual_loop()
    return loop.epoch + loop.time() if loop is not None else time.time()


class _Accounted:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        #: coroutine calls made through this wrapper, by method name
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            loop = _running_virtual_loop()
            if loop is None:
                return await attribute(*args, **kwargs)
            token = _in_accounted_call.set(True)
            try:
                with loop.real_io():
                    return await attribute(*args, **kwargs)
            finally:
                _in_accounted_call.reset(token)

        return call


def accounted(inner: Any) -> Any:
    """``inner`` (a registry, or anything whose coroutine methods do real I/O) with every
    coroutine call accounted as real I/O on a :class:`VirtualClockLoop` (elsewhere: unchanged),
    and counted by method name in the wrapper's ``calls``."""
    return _Accounted(inner)


def run_on_virtual_time(main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` on a :class:`VirtualClockLoop` that accounts worker threads as real work: a
    driver's timeline (deadlines, hedges, capacity waits) is then exact, whatever the machine."""

    async def accounted_main() -> T:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        loop.account_worker_threads()
        return await main()

    return anyio.run(accounted_main, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})
