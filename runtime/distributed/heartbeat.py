"""Liveness and progress of the ranks: a rank that dies, or lives but is stuck inside a step, is
named by every other rank, and the job stops."""
from __future__ import annotations

import threading
import time

import torch.distributed as dist


class Heartbeat:
    """Liveness of the ranks, through the job's rendezvous store (hosted by rank 0).

    A thread on every rank bumps its own counter every `every` seconds and watches the others'
    counters (counters, not timestamps: hosts' clocks differ). A rank whose counter has not moved
    for `stale` seconds is declared dead: `on_dead` is called (the runner prints who and exits),
    even when the main thread is stuck in a collective. When a collective fails, `identify`
    watches a few more seconds to name the rank that stopped beating.

    Progress: the main thread posts where it is as it enters each of a step's collectives
    (`enter`). A rank that has waited longer than `step_timeout` looks at the others' positions:
    the rank furthest behind is alive (it beats) but stuck inside a step, and is named; if all
    are at the same collective, it stalled. A rank that has posted nothing yet is still starting
    (loading, sharding): the start-up timeout governs it."""

    def __init__(self, world, every: float = 0.25, stale: float = 10.0, on_dead=None,
                 step_timeout: float | None = None):
        self.world, self.every, self.stale = world, every, stale
        self.on_dead = on_dead
        self.step_timeout = step_timeout
        self.step: int | None = None    # the step this rank is in (None: still starting)
        self.position = 0                # len(PHASES) x step + the collective it last entered, and when
        self.step_since = 0.0
        self.store = dist.distributed_c10d._get_default_store()
        self.seen: dict[int, tuple[int, float]] = {}   # rank -> (last counter, when it changed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        count = 0
        while not self.stop.is_set():
            try:
                count += 1
                self.store.set(f"deepen/beat/{self.world.rank}", str(count))
                dead = self.quiet(self.stale) or self.stuck()
            except Exception:  # the store's host, rank 0, is gone
                dead = f"{self.world.layout.describe(0)} is unreachable (it hosts the job's store)"
            if dead and self.on_dead is not None and not self.stop.is_set():
                self.on_dead(dead)
                return
            self.stop.wait(self.every)

    PHASES = ("plan", "keys", "rows", "gather", "tokens")  # a step's collectives, in order

    def enter(self, phase: str):
        """The main thread enters one of a step's collectives (a wait for other ranks). Steps are
        counted over the whole job: every rank runs the same steps in lock-step."""
        if phase == "plan":
            self.step = 0 if self.step is None else self.step + 1
        position = len(self.PHASES) * (self.step or 0) + self.PHASES.index(phase)
        with self.lock:
            self.store.set(f"deepen/at/{self.world.rank}", str(position))
        self.position, self.step_since = position, time.monotonic()

    def stuck(self) -> str:
        """After waiting longer than the step timeout: the rank that is furthest behind (alive
        but stuck inside a step: it never reached the collective the others wait in), or, if
        every rank is at the same collective, that the collective stalled."""
        if self.step_timeout is None or self.step is None:
            return ""
        if time.monotonic() - self.step_since <= self.step_timeout:
            return ""
        with self.lock:
            at = {self.world.rank: self.position}
            layout = self.world.layout   # this replica's ranks: replicas step independently
            for rank in range(layout.root, layout.root + layout.size):
                key = f"deepen/at/{rank}"
                if rank != self.world.rank and self.store.check([key]):
                    at[rank] = int(self.store.get(key))
        low = min(at.values())
        limit = f"the step timeout ({self.step_timeout:g} s)"
        if all(p == low for p in at.values()):
            return f"no rank has passed '{self.PHASES[low % len(self.PHASES)]}' of step {low // len(self.PHASES)} within {limit}: a stalled collective"
        names = "; ".join("this rank" if r == self.world.rank else self.world.layout.describe(r)
                          for r, p in sorted(at.items()) if p == low)
        return (f"{names} has not finished step {low // len(self.PHASES)} within {limit}: alive but stuck after "
                f"'{self.PHASES[low % len(self.PHASES)]}'")

    def close(self):
        """This rank is done (not dead: a replica that drained the queue stops beating while
        the others finish their rows)."""
        with self.lock:
            self.store.set(f"deepen/done/{self.world.rank}", "1")
        self.stop.set()
        self.thread.join(timeout=5 * self.every + 1)

    def quiet(self, stale: float) -> str:
        with self.lock:
            now = time.monotonic()
            names = []
            for rank in range(self.world.layout.world_size):
                key = f"deepen/beat/{rank}"
                if rank == self.world.rank or not self.store.check([key]) or self.store.check([f"deepen/done/{rank}"]):
                    continue
                value = int(self.store.get(key))
                last, since = self.seen.get(rank, (None, now))
                if value != last:
                    self.seen[rank] = (value, now)
                elif now - since > stale:
                    names.append(self.world.layout.describe(rank))
            return ("no heartbeat from " + "; ".join(names)) if names else ""

    def identify(self, wait: float = 4.0, stale: float = 1.5) -> str:
        """After a failed collective: who stopped beating (watching up to `wait` seconds)."""
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                found = self.quiet(stale)
                if found:
                    return found
                time.sleep(self.every)
            return "every other rank is still beating (a stalled or failed collective?)"
        except Exception:
            return f"{self.world.layout.describe(0)} is unreachable (it hosts the job's store)"
