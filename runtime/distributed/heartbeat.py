"""Liveness and progress of the ranks: a rank that dies, or lives but is stuck inside a step, is
named by every other rank, and the job stops."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch.distributed as dist


FAILED = "deepen/failed"


class Heartbeat:
    """Liveness of the ranks, through the job's rendezvous store (hosted by rank 0).

    A thread on every rank bumps its own counter every `every` seconds and watches the others'
    counters (counters, not timestamps: hosts' clocks differ). A rank whose counter has not moved
    for `stale` seconds is declared dead: `on_dead` is called (the runner prints who and exits),
    even when the main thread is stuck in a collective. When a collective fails, `identify`
    watches a few more seconds to name the rank that stopped beating.

    Progress: the main thread notes, in memory, as it enters and leaves each of a step's
    collectives (`phase`); the beat thread posts it with the counter (the hot path makes no store
    round-trip). A rank that has sat in one place longer than `step_timeout` looks at the others'
    positions: the rank furthest behind is alive (it beats) but stuck inside a step, and is
    named; if all are inside the same collective, it stalled; if all left it and none has reached
    the next, every rank is slower than the timeout. The first step (warm-up: first kernels,
    allocations) and the start-up before it fall under the start-up timeout instead; with
    micro-batches, the first 2 x m steps (each micro-batch's first step and first forward pass).
    A rank that has finished stepping (`rest`: rank 0 waiting for the other replicas' last rows)
    has no step to be stuck in, and ranks that said they are done are left out.

    The lock serialises this process's use of the store (the beat thread, the replicas' queue,
    the main thread). It is re-entrant, and `identify` (which the SIGTERM handler calls, in the
    main thread, wherever that was interrupted) never waits on it for long."""

    PHASES = ("plan", "keys", "rows", "gather", "merge", "tokens")  # a step's collectives, in order
    GRACE = 3.0   # seconds a stuck rank waits past the step timeout before it names itself

    def __init__(self, world, every: float = 0.25, stale: float = 10.0, on_dead=None,
                 step_timeout: float | None = None, store=None):
        self.world, self.every, self.stale = world, every, stale
        self.on_dead = on_dead
        self.step_timeout = step_timeout
        self.step: int | None = None    # the step this rank is in (None: still starting)
        # 2 x (len(PHASES) x step + the collective) + 1 once it has left it; and since when
        self.position, self.since = 0, time.monotonic()
        self.posted = None
        self.warmup = 1          # steps under the start-up timeout (2 x micro-batches when pipelined)
        self.resting = False     # stepping is over for this rank (it may still wait for results)
        self.announced = False   # this rank told the others why the job stops
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.seen: dict[int, tuple[int, float]] = {}   # rank -> (last counter, when it changed)
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def unreachable(self) -> str:
        return f"{self.world.layout.describe(0)} is unreachable (it hosts the job's store)"

    def failure(self, error: Exception) -> str:
        """What an exception in the beat thread means: a store that cannot be reached (its host,
        rank 0, is gone), or a failure of the heartbeat itself, named as it is."""
        if isinstance(error, (dist.DistError, ConnectionError, TimeoutError)):
            return self.unreachable()
        return f"the heartbeat of {self.world.describe} failed: {type(error).__name__}: {error}"

    def _beat(self):
        count = 0
        while not self.stop.is_set():
            try:
                count += 1
                position = self.position
                with self.lock:
                    self.store.set(f"deepen/beat/{self.world.rank}", str(count))
                    if position != self.posted:
                        self.store.set(f"deepen/at/{self.world.rank}", str(position))
                        self.posted = position
                    told = "" if self.announced or not self.store.check([FAILED]) else self.store.get(FAILED).decode()
                dead = told or self.quiet(self.stale) or self.stuck()
            except Exception as e:  # noqa: BLE001 - whatever it is, the job must stop, named
                dead = self.failure(e)
            if dead and self.on_dead is not None and not self.stop.is_set():
                self.on_dead(dead)
                return
            self.stop.wait(self.every)

    @contextmanager
    def phase(self, name: str):
        """The main thread waits in one of a step's collectives. Steps are counted over the whole
        job: every rank of a replica runs the same steps in lock-step."""
        if name == "plan":
            self.step = 0 if self.step is None else self.step + 1
        at = 2 * (len(self.PHASES) * (self.step or 0) + self.PHASES.index(name))
        self.position, self.since = at, time.monotonic()
        yield
        self.position, self.since = at + 1, time.monotonic()

    def where(self, position: int) -> tuple[int, str, bool]:
        """(step, collective, left it) of a posted position."""
        at, left = divmod(position, 2)
        return at // len(self.PHASES), self.PHASES[at % len(self.PHASES)], bool(left)

    def stuck(self) -> str:
        """After sitting in one place longer than the step timeout: the rank furthest behind
        (alive but stuck inside a step: it never reached the collective the others wait in), or
        that every rank sits in the same place."""
        if self.step_timeout is None or self.step is None or self.step < self.warmup or self.resting:
            return ""   # starting, warming up, or done stepping
        waited = time.monotonic() - self.since
        if waited <= self.step_timeout:
            return ""
        at = {self.world.rank: self.position}
        layout = self.world.layout   # this replica's ranks: replicas step independently
        with self.lock:
            for rank in range(layout.root, layout.root + layout.size):
                key = f"deepen/at/{rank}"
                if rank != self.world.rank and self.store.check([key]) and not self.store.check([f"deepen/done/{rank}"]):
                    at[rank] = int(self.store.get(key))
        if len(at) == 1 and layout.size > 1:
            return ""   # every other rank of the replica is done: nobody waits on this one
        low = min(at.values())
        step, name, left = self.where(low)
        limit = f"the step timeout ({self.step_timeout:g} s)"
        if all(p == low for p in at.values()):
            if left:
                return (f"every rank is still working after '{name}' of step {step} past {limit}: "
                        f"steps this slow need a longer --step-timeout")
            return f"no rank has passed '{name}' of step {step} within {limit}: a stalled collective"
        behind = [r for r, p in sorted(at.items()) if p == low]
        if self.world.rank in behind and waited <= self.step_timeout + self.GRACE:
            return ""   # the stuck rank lets the ranks waiting on it speak first (they see the whole picture)
        names = "; ".join(layout.describe(r) for r in behind)   # the same words on every rank
        return f"{names} has not finished step {step} within {limit}: alive but stuck after '{name}'"

    def announce(self, why: str):
        """This rank found out why the job stops: tell every rank, through the store. Those
        blocked in a collective with it (where no signal handler runs) say the same, at once."""
        self.announced = True
        try:
            if self.lock.acquire(timeout=1.0):
                try:
                    self.store.set(FAILED, f"{why} (seen by {self.world.describe})")
                finally:
                    self.lock.release()
        except Exception:  # noqa: BLE001 - the store's host may be gone: the others find out anyway
            pass

    def rest(self):
        """This rank's stepping is over (it may still wait, e.g. rank 0 for the other replicas'
        last results): it beats on, but has no step to be stuck in."""
        self.resting = True

    def close(self):
        """This rank is done (not dead: a replica that drained the queue stops beating while
        the others finish their rows)."""
        with self.lock:
            self.store.set(f"deepen/done/{self.world.rank}", "1")
        self.stop.set()
        self.thread.join(timeout=5 * self.every + 1)

    def quiet(self, stale: float, lock_timeout: float = -1) -> str:
        """Who has not beaten for `stale` seconds. `lock_timeout` >= 0: give up ("") if the store
        is busy that long."""
        if not self.lock.acquire(timeout=lock_timeout):
            return ""
        try:
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
        finally:
            self.lock.release()

    def identify(self, wait: float = 4.0, stale: float = 1.5) -> str:
        """After a failed collective: who stopped beating (watching up to `wait` seconds). Called
        from the SIGTERM handler too, so it never waits long for the store's lock."""
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                found = self.quiet(stale, lock_timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                if found:
                    return found
                time.sleep(self.every)
            return "every other rank is still beating (a stalled or failed collective?)"
        except Exception as e:  # noqa: BLE001 - naming the failure must not fail
            return self.failure(e)
