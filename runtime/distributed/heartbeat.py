"""Liveness of the ranks, so that a rank that dies is named by every other rank."""
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
    watches a few more seconds to name the rank that stopped beating."""

    def __init__(self, world, every: float = 0.25, stale: float = 10.0, on_dead=None):
        self.world, self.every, self.stale = world, every, stale
        self.on_dead = on_dead
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
                dead = self.quiet(self.stale)
            except Exception:  # the store's host, rank 0, is gone
                dead = f"{self.world.layout.describe(0)} is unreachable (it hosts the job's store)"
            if dead and self.on_dead is not None and not self.stop.is_set():
                self.on_dead(dead)
                return
            self.stop.wait(self.every)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5 * self.every + 1)

    def quiet(self, stale: float) -> str:
        with self.lock:
            now = time.monotonic()
            names = []
            for rank in range(self.world.layout.world_size):
                key = f"deepen/beat/{rank}"
                if rank == self.world.rank or not self.store.check([key]):
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
