"""The one guard for the signals that stop a process which runs others (`emae launch`, `emae sweep`):
it records the first SIGINT / SIGTERM / SIGHUP, lets the caller stop what it started, and, once
armed, interrupts the wait in the main thread."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """Raised where the main thread waits when an armed SignalGuard gets a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalGuard:
    """While entered, SIGINT, SIGTERM and SIGHUP are trapped (in the main thread only: elsewhere
    they cannot be): `signum` holds the first one and `on_signal(signum)` runs once for it. After
    `arm()`, a signal (or one already recorded) raises :class:`Interrupted`, once: the clean-up that
    follows (cancelling a job) is not interrupted by a second signal."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self._on_signal = on_signal
        self._armed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def arm(self) -> None:
        self._armed = True
        if self.signum is not None:
            self._interrupt()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            if self._on_signal is not None:
                self._on_signal(signum)
        if self._armed:
            self._interrupt()

    def _interrupt(self) -> None:
        self._armed = False
        raise Interrupted(self.signum)  # type: ignore[arg-type]
