"""Which request to acknowledge when a reply's PUBACK arrives.

A request is acked only once the broker has accepted its reply. The reply's packet id (mid) is known
only after ``publish`` returns, and its PUBACK can arrive in the network thread before that, so a PUBACK
may find no waiting entry yet ("early"). Packet ids wrap at 65535 and every QoS 1 publish of the client
uses them, so an early record of an *older* publish (a status message, a reply resent after a reconnect)
with the same id must never ack a new request. Each PUBACK is numbered; an early record counts only if
it arrived after the new publish started.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

Request = TypeVar("Request")


class AckLedger(Generic[Request]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[int, Request] = {}  # reply mid -> request to ack
        self._early: dict[int, int] = {}  # reply mid -> number of the PUBACK that came before registration
        self._pubacks = 0

    def before_publish(self) -> int:
        """Call before publishing a reply; pass the result to :meth:`after_publish`."""
        with self._cond:
            return self._pubacks

    def after_publish(self, mid: int, started: int, request: Request) -> bool:
        """Register ``request`` under its reply's ``mid``; True when the PUBACK already came (ack it now)."""
        with self._cond:
            early = self._early.pop(mid, None)
            if early is not None and early > started:
                return True
            self._waiting[mid] = request
            return False

    def puback(self, mid: int) -> Request | None:
        """A PUBACK for ``mid``: the request to ack now, or None (recorded as early)."""
        with self._cond:
            self._pubacks += 1
            request = self._waiting.pop(mid, None)
            if request is None:
                self._early[mid] = self._pubacks
            self._cond.notify_all()
            return request

    def reset(self) -> None:
        """The connection is gone: no PUBACK will come for what is waiting."""
        with self._cond:
            self._waiting.clear()
            self._early.clear()
            self._cond.notify_all()

    def wait_empty(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting, timeout_s)
