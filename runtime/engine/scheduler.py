"""Continuous batching: which waiting requests enter which slots, one plan per step.

The root process (rank 0 under the launcher) makes the plan; the engine's exchange shares it so
every rank admits the same requests into the same slots."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Request


@dataclass
class Plan:
    admit: list[Request]   # into the free slots, in slot order
    drop: bool             # nothing is waiting: free slots are dropped instead of computing padding
    done: bool             # nothing is waiting and nothing is running


class Scheduler:
    """`source(n)`: up to n more requests from a queue shared with other replicas, asked only
    when slots are free (an empty answer means the queue is drained)."""

    def __init__(self, max_batch: int, source=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.source = source

    def add(self, requests):
        self.waiting.extend(requests)

    def plan(self, slots: list) -> Plan:
        free = sum(r is None for r in slots) + self.max_batch - len(slots)
        if self.source is not None and len(self.waiting) < free:
            self.waiting.extend(self.source(free - len(self.waiting)))
        take = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        running = any(r is not None for r in slots)
        free_after = free - len(take) > self.max_batch - len(slots)  # a slot that exists stays free
        return Plan(take, drop=not self.waiting and free_after, done=not take and not running)
