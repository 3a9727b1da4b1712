"""Logging that a flood of bad input cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """At most one line per key (say, an error status) every ``interval_s``; the next line of that key that
    gets through says how many were held back.

    One WARNING per bad request filled 17 MB of log in a 110k-request fuzz run: a hostile client must not
    be able to fill the disk or drown the lines that matter, and the kinds of trouble must stay visible.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._next[key] = now + self._interval
        if held:
            message += " (%d more like it held back)"
            args = (*args, held)
        self._logger.warning(message, *args)
