"""Data-parallel replicas of the ensemble. A world of k x (the ensemble's ranks) runs k
independent replicas, each with its own member groups (world.py). They share one queue of prompts
and one output file through the job's rendezvous store, hosted by rank 0:

  queue     rank 0 publishes the job's pending requests (msgpack, never pickle; 256 to a store
            value) before anyone loads a model; a replica's root claims the next ones (an atomic
            counter) whenever its slots free up, so replicas stay busy however long their prompts
            run
  results   a replica's root posts each finished record (numbered per sender); rank 0 appends
            them to --output as they arrive, with its own replica's, one whole line at a time

A replica that dies stops every rank (the heartbeat); what rank 0 wrote stays, and `--resume`
finishes the rest."""
from __future__ import annotations

import json

import msgpack

from ..engine.sequence import Request

QUEUE, RESULTS = "deepen/queue", "deepen/results"
CHUNK = 256   # requests per store value: a large input is a few hundred store calls, not one per prompt


class SharedQueue:
    """Requests in the store, claimed in order by the replicas' roots. `lock`: the heartbeat's,
    which serialises this process's use of the store; it is taken for one store call at a time,
    so the heartbeat thread beats on while rank 0 publishes a large input."""

    def __init__(self, store, lock):
        self.store, self.lock = store, lock
        self.chunks: dict[int, list] = {}

    def publish(self, requests: list[Request]):
        for start in range(0, len(requests), CHUNK):
            chunk = msgpack.packb([r.pack() for r in requests[start:start + CHUNK]], use_bin_type=True)
            with self.lock:
                self.store.set(f"{QUEUE}/{start // CHUNK}", chunk)
        with self.lock:
            self.store.set(f"{QUEUE}/total", str(len(requests)))

    def _request(self, i: int) -> Request:
        if i // CHUNK not in self.chunks:
            with self.lock:
                self.chunks[i // CHUNK] = msgpack.unpackb(self.store.get(f"{QUEUE}/{i // CHUNK}"), raw=False)
        return Request.unpack(self.chunks[i // CHUNK][i % CHUNK])

    def take(self, n: int) -> list[Request]:
        with self.lock:
            total = int(self.store.get(f"{QUEUE}/total"))
            end = self.store.add(f"{QUEUE}/next", n)
        return [self._request(i) for i in range(end - n, min(end, total))]


class ResultRelay:
    """Finished records from the replicas' roots to rank 0. Each sender numbers its own records
    and writes record k before it counts it, so a sender that dies between the two leaves no gap
    that would hold back anyone's later records."""

    def __init__(self, store, lock, sender: int = 0, senders: list[int] = ()):
        self.store, self.lock = store, lock
        self.sender, self.senders = sender, list(senders)
        self.sent = 0
        self.next = {s: 0 for s in self.senders}

    def send(self, record: dict):
        with self.lock:
            self.store.set(f"{RESULTS}/{self.sender}/{self.sent}", json.dumps(record, ensure_ascii=False))
            self.store.add(f"{RESULTS}/{self.sender}/posted", 1)
        self.sent += 1

    def receive(self) -> list[dict]:
        """Every record counted since the last call, sender by sender (rank 0)."""
        out = []
        for sender in self.senders:
            with self.lock:
                posted = self.store.add(f"{RESULTS}/{sender}/posted", 0)
            while self.next[sender] < posted:
                key = f"{RESULTS}/{sender}/{self.next[sender]}"
                with self.lock:
                    out.append(json.loads(self.store.get(key)))
                    self.store.delete_key(key)
                self.next[sender] += 1
        return out
