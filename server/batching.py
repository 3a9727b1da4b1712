"""Per-model request queues feeding the worker pool: a worker takes up to ``max_batch`` requests of
one model, waiting at most ``max_wait_ms`` after the oldest one arrived for more to join.

Each model's queue holds at most ``max_queue`` requests; ``put`` refuses more (QueueFull) and the server
answers UNAVAILABLE, so a flood of requests costs replies, not memory. With QoS 1 requests the broker
never sends more than the server's MQTT 5 Receive Maximum unacknowledged, and a request stays
unacknowledged until answered: a queue larger than that window never fills from QoS 1 traffic alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One decoded request waiting for the forward pass."""

    model_key: bytes
    payload: Any
    context: Any  # whatever the transport needs to reply (topic, correlation, mid)
    arrived: float = field(default_factory=time.monotonic)


class QueueFull(Exception):
    """The model's queue already holds ``max_queue`` requests."""


class Batcher:
    def __init__(self, max_batch: int = 32, max_wait_ms: float = 0.0, max_queue: int = 1024) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._queues: dict[bytes, deque[Job]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._pending = 0

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            queue = self._queues.setdefault(job.model_key, deque())
            if len(queue) >= self.max_queue:
                raise QueueFull(job.model_key)
            queue.append(job)
            self._pending += 1
            self._cond.notify()

    def put_many(self, jobs: list[Job]) -> list[Job]:
        """:meth:`put` for each job under one lock and one wake-up; returns those their full queue refused."""
        refused = []
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            for job in jobs:
                queue = self._queues.setdefault(job.model_key, deque())
                if len(queue) >= self.max_queue:
                    refused.append(job)
                    continue
                queue.append(job)
                self._pending += 1
            if len(refused) < len(jobs):
                self._cond.notify()
        return refused

    def close(self) -> None:
        """No new jobs; workers drain what is queued (without waiting for stragglers) and then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def next_batch(self) -> list[Job] | None:
        """Block until a batch is ready; None once closed and drained."""
        with self._cond:
            while True:
                oldest_key, oldest = None, None
                for key, queue in self._queues.items():
                    if queue and (oldest is None or queue[0].arrived < oldest.arrived):
                        oldest_key, oldest = key, queue[0]
                if oldest is None:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                queue = self._queues[oldest_key]
                wait_left = oldest.arrived + self.max_wait - time.monotonic()
                if len(queue) >= self.max_batch or wait_left <= 0 or self._closed:
                    batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                    self._pending -= len(batch)
                    if any(self._queues.values()):
                        self._cond.notify()  # more work for another worker
                    return batch
                self._cond.wait(wait_left)
