"""Continuous batching: which waiting requests enter which slots, one plan per step.

The root process (rank 0 under the launcher) makes the plan; the engine's exchange shares it so
every rank admits the same requests into the same slots. A plan that changes nothing is "quiet";
`Plan.closes` tells every rank, once, that no request will come any more; `Plans` then knows on
every rank that many plans are quiet without being told."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Request


@dataclass
class Plan:
    admit: list[Request]   # into the free slots, in slot order
    drop: bool             # nothing is waiting: free slots are dropped instead of computing padding
    done: bool             # nothing is waiting and nothing is running
    closes: bool = False   # no request can come any more, and no plan sent has said so yet

    @property
    def quiet(self) -> bool:
        return not (self.admit or self.drop or self.done or self.closes)


class Scheduler:
    """`source(n)`: up to n more requests from a queue shared with other replicas, asked only
    when slots are free (an empty answer means the queue is drained)."""

    def __init__(self, max_batch: int, source=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.source = source
        self.drained = False   # the source gave nothing: it has no more
        self.told = False      # a plan that was sent to every rank said the queue is closed

    def add(self, requests):
        self.waiting.extend(requests)
        self.told = self.drained = False

    def plan(self, slots: list) -> Plan:
        free = sum(r is None for r in slots) + self.max_batch - len(slots)
        if self.source is not None and len(self.waiting) < free:
            more = self.source(free - len(self.waiting))
            self.drained |= not more
            self.waiting.extend(more)
        take = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        running = any(r is not None for r in slots)
        free_after = free - len(take) > self.max_batch - len(slots)  # a slot that exists stays free
        closes = not self.told and not self.waiting and (self.source is None or self.drained)
        return Plan(take, drop=not self.waiting and free_after, done=not take and not running, closes=closes)


class Plans:
    """Each step's plan on every rank: the root's scheduler makes it and the exchange shares it,
    except where every rank can tell it is quiet (`quiet_foreseen`): then nothing is sent, and the
    root checks its scheduler agrees."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.closed = False   # a plan every rank saw said no request will come any more

    def reset(self):
        """A run starts: what every rank knows of the plans to come is forgotten."""
        self.closed = False

    def quiet_foreseen(self, slots: list) -> bool:
        """Whether every rank knows, from what they all saw, that the next plan is quiet: no slot
        is free (a row that finished left its slot free) and none can be added (max_batch slots,
        or a plan said the queue is closed). Most steps of a long job are such; their plan costs
        no collective and no read of a flag."""
        return (bool(slots) and all(r is not None for r in slots)
                and (len(slots) == self.scheduler.max_batch or self.closed))

    def next(self, slots: list, exchange, timed) -> Plan:
        """The plan for the next step, on every rank; `timed(key, fn, *args)` times the sharing."""
        plan = self.scheduler.plan(slots) if exchange.is_root else None
        if self.quiet_foreseen(slots):
            if plan is not None and (plan.admit or plan.drop or plan.done):
                raise RuntimeError(f"the scheduler planned {plan} where every rank foresaw a quiet step")
            exchange.foreseen_plan()
            return Plan([], False, False)   # `closes` waits for a plan that is sent
        plan = timed("control", exchange.share_plan, plan)
        self.closed |= plan.closes
        if exchange.is_root:
            self.scheduler.told |= plan.closes
        return plan
