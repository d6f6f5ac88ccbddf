"""Data-parallel replicas of the ensemble. A world of k x (the ensemble's ranks) runs k
independent replicas, each with its own member groups (world.py). They share one queue of prompts
and one output file through the job's rendezvous store, hosted by rank 0:

  queue     rank 0 publishes the job's pending requests (msgpack, never pickle) before anyone
            loads a model; a replica's root claims the next ones (an atomic counter) whenever
            its slots free up, so replicas stay busy however long their prompts run
  results   a replica's root posts each finished record; rank 0 appends them to --output as they
            arrive, with its own replica's, one whole line at a time

A replica that dies stops every rank (the heartbeat); what rank 0 wrote stays, and `--resume`
finishes the rest."""
from __future__ import annotations

import json

import msgpack

from ..engine.sequence import Request

QUEUE, RESULTS = "deepen/queue", "deepen/results"


class SharedQueue:
    """Requests in the store, claimed in order by the replicas' roots. `lock`: the heartbeat's,
    which serialises this process's use of the store."""

    def __init__(self, store, lock):
        self.store, self.lock = store, lock

    def publish(self, requests: list[Request]):
        with self.lock:
            for i, r in enumerate(requests):
                self.store.set(f"{QUEUE}/{i}", msgpack.packb(r.pack(), use_bin_type=True))
            self.store.set(f"{QUEUE}/total", str(len(requests)))

    def take(self, n: int) -> list[Request]:
        with self.lock:
            total = int(self.store.get(f"{QUEUE}/total"))
            end = self.store.add(f"{QUEUE}/next", n)
            claimed = range(end - n, min(end, total))
            return [Request.unpack(msgpack.unpackb(self.store.get(f"{QUEUE}/{i}"), raw=False)) for i in claimed]


class ResultRelay:
    """Finished records from the replicas' roots to rank 0, in the order they were posted."""

    def __init__(self, store, lock):
        self.store, self.lock = store, lock
        self.next = 0

    def send(self, record: dict):
        with self.lock:
            j = self.store.add(f"{RESULTS}/posted", 1) - 1
            self.store.set(f"{RESULTS}/{j}", json.dumps(record, ensure_ascii=False))

    def receive(self) -> list[dict]:
        """Every record posted and written since the last call (rank 0)."""
        out = []
        with self.lock:
            posted = self.store.add(f"{RESULTS}/posted", 0)
            while self.next < posted:
                key = f"{RESULTS}/{self.next}"
                if not self.store.check([key]):   # announced, not written yet: next time
                    break
                out.append(json.loads(self.store.get(key)))
                self.store.delete_key(key)
                self.next += 1
        return out
