"""How far the host may run ahead of the devices, and a watchdog for devices that stop answering.

XLA:CPU with several devices deadlocks when the host queues too many steps (docs/distributed.md), so the loops
keep at most ``steps_in_flight`` unfinished (``InFlight``). What bounding cannot rule out, ``StallWatchdog``
ends: a wait longer than ``stall_timeout_seconds`` prints one line and ends the process (a thread blocked in
XLA cannot be interrupted); the last finished epoch's checkpoint stays for a rerun.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from typing import Callable

import jax

STALL_EXIT_CODE = 5


class StallWatchdog:
    """Ends the process with one line when a wait inside ``waiting`` lasts over ``timeout`` seconds, while
    ``running``; otherwise no thread of it is left."""

    def __init__(self):
        self.timeout, self.hint = 0.0, ""
        self._since: float | None = None
        self._what: Callable[[], str] = str
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    @contextlib.contextmanager
    def running(self, timeout: float, hint: str = ""):
        """Watches for the block (0 = never); ``hint``, ending in "; ", says what to try."""
        self.timeout, self.hint = timeout, hint
        try:
            yield self
        finally:
            self.timeout = 0.0
            if self._thread is not None:
                self._done.set()
                self._thread.join()
                self._thread = None
                self._done.clear()

    @contextlib.contextmanager
    def waiting(self, what: Callable[[], str]):
        """Watches the block inside; ``what()`` describes it (called only if it stalls)."""
        if not self.timeout:
            yield
            return
        if self._thread is None:  # started by the first wait, so that a run on one device has none
            self._thread = threading.Thread(target=self._watch, name="oat_jax-stall-watchdog", daemon=True)
            self._thread.start()
        with self._lock:
            self._since, self._what = time.monotonic(), what
        try:
            yield
        finally:
            with self._lock:
                self._since = None

    def _watch(self):
        while not self._done.wait(min(1.0, self.timeout / 4 or 1.0)):
            with self._lock:
                stalled = bool(self.timeout and self._since is not None
                               and time.monotonic() - self._since > self.timeout)
                what = self._what if stalled else None
            if stalled:
                process = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
                print(f"error: {process}{what()} has waited over {self.timeout:g} s for its {jax.device_count()} "
                      f"devices and is stalled; {self.hint}rerun the same command to resume from the last "
                      "finished epoch", file=sys.stderr, flush=True)
                os._exit(STALL_EXIT_CODE)


# One per process, watching while a run holds it running (train.train_and_evaluate).
WATCHDOG = StallWatchdog()


class InFlight:
    """Keeps at most ``limit`` dispatched steps unfinished (0 = no bound): ``add`` waits for the oldest beyond it."""

    def __init__(self, limit: int, watchdog: StallWatchdog = WATCHDOG):
        self.limit, self.watchdog = limit, watchdog
        self._pending: collections.deque = collections.deque()

    def add(self, value, what: Callable[[], str]) -> None:
        self._pending.append((value, what))
        while self.limit and len(self._pending) > self.limit:
            self._wait(*self._pending.popleft())

    def drain(self) -> None:
        while self._pending:
            self._wait(*self._pending.popleft())

    def _wait(self, value, what):
        with self.watchdog.waiting(what):
            jax.block_until_ready(value)
