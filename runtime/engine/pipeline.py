"""Pipelined micro-batches (under the launcher, `--micro-batches 2`): the running batch is split
in two, each half with its own slots and KV caches (an `Engine` each, sharing the fuser and the
exchange), and each rank works on one half while the other half's collectives are pending.

A step's communication happens in its first and last phases (deepen/protocol.py); between them
(`compute`) a leader fuses the rows it owns, with no communication. The pipeline puts the other
half's forward pass into that gap, so the work between two collectives is one half's forward
pass plus a share of the other half's fusion on every rank:

    window   compute(Y): this leader's share of Y's fusion;  advance(X): X's resync and forward
             pass, then the admissions its plan asked for
    sync     begin(X): X's rules, owners and summaries;  finish(Y): Y's merge and tokens;
             commit Y;  plan Y (the root's admissions for Y, on every rank)
    then X and Y move on: with more than two micro-batches they go round in a ring, X being the
    one after Y.

Without split fusion's shared rows a leader's compute is its own member's relative vectors,
and the main leader's search stays in finish. Every row goes through the same operations as in
the unpipelined loop, in the same order (rules, fusion, commit, advance, admit), so the tokens
are the same (tests/test_distributed.py). A half whose rows are done and finds nothing waiting
leaves; the other runs on alone, unpipelined.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .engine import Engine
from .lane import Lane
from .roundtrips import maybe_counting
from .sequence import Result


class Pipeline:
    """`parts` micro-batches of `max_batch` rows in all; `lanes()` makes one micro-batch's lanes
    (the members this process runs, each with a fresh KV cache)."""

    def __init__(self, members, fuser, max_batch: int, lanes, exchange, parts: int = 2):
        if parts < 1:
            raise ValueError(f"micro-batches must be at least 1, got {parts}")
        sizes = [max_batch // parts + (i < max_batch % parts) for i in range(parts)]
        self.parts = [Engine(members, fuser, size, lanes(), exchange) for size in sizes if size > 0]
        for e in self.parts[1:]:   # one queue: a free slot in either half takes the next request
            e.scheduler.waiting = self.parts[0].scheduler.waiting
        self.members, self.fuser, self.exchange = members, fuser, exchange
        self.lanes = self.parts[0].lanes
        self.max_batch = max_batch

    @property
    def steps(self) -> int:
        """Rounds: each advances every running half by one token."""
        return max(e.steps for e in self.parts)

    def run(self, requests=(), on_result=None, source=None, tick=None) -> list[Result]:
        """`Engine.run`'s contract, with the halves interleaved (module doc)."""
        root = self.exchange.is_root
        if root:
            self.parts[0].scheduler.add(requests)
            for e in self.parts:
                e.scheduler.source = source
        results: list[Result] = []
        live = []
        for e in self.parts:
            e.plans.reset()
            if tick is not None and root:
                tick()
            plan = e.next_plan()
            if not plan.done:
                e.apply(plan)
                live.append(e)
        pending, staged = {}, {}
        with maybe_counting() as counts:
            self._interleave(live, pending, staged, results, on_result, tick)
        if counts is not None:
            self.parts[0].stats["round_trips"] = self.parts[0].stats.get("round_trips", 0) + counts["total"]
        return results

    def _interleave(self, live, pending, staged, results, on_result, tick):
        root = self.exchange.is_root
        if live:
            pending[live[0]] = live[0].begin_step()
        while live:
            y, x = live[0], live[1] if len(live) > 1 else None
            self.fuser.compute(pending[y].fusion)
            if x is not None:
                if x in staged:
                    self._resume(x, *staged.pop(x))
                pending[x] = x.begin_step()
            finished, keep, texts, changed = y.end_step(pending.pop(y))
            if root:
                results += finished
                for result in finished if on_result is not None else ():
                    on_result(result)
                if tick is not None:
                    tick()
            plan = y.next_plan()
            if plan.done:       # y's rows are done and nothing is waiting
                live.remove(y)
            elif x is None:     # y runs alone
                self._resume(y, keep, texts, changed, plan)
                pending[y] = y.begin_step()
            else:               # to the back of the ring: its forward pass runs in a later window
                staged[y] = (keep, texts, changed, plan)
                live = live[1:] + [y]

    @staticmethod
    def _resume(e: Engine, keep: list[int], texts: list[str], changed: list, plan):
        """A half's forward pass over its committed tokens, then its plan's admissions."""
        e.advance(keep, texts, changed)
        e.apply(plan)

    def breakdown(self) -> dict[str, float]:
        out = defaultdict(float)
        for e in self.parts:
            for k, v in e.seconds.items():
                out[k] += v
        for k, v in getattr(self.fuser, "seconds", {}).items():
            out[k] += v
        return dict(out)

    def report(self, seconds: float, tokens: int) -> dict:
        """`Engine.report` over both halves: rows and neglected mass summed, rounds as steps."""
        parts = [e.report(seconds, tokens) for e in self.parts]
        out = dict(parts[0], steps=self.steps, breakdown_s=self.breakdown())
        if "round_trips" in self.parts[0].stats:
            out["round_trips_per_step"] = self.parts[0].stats["round_trips"] / max(self.steps, 1)
        for key in ("rows", "fused_rows"):
            out[key] = sum(p[key] for p in parts)
        mass = [p for p in parts if p["neglected_mass_sum"] is not None]
        if mass:
            out["neglected_mass_sum"] = torch.tensor([p["neglected_mass_sum"] for p in mass]).sum(0).tolist()
            out["neglected_mass_max"] = torch.tensor([p["neglected_mass_max"] for p in mass]).amax(0).tolist()
        return out


def micro_batches_for(max_batch: int, micro_batches: int) -> int:
    """How many micro-batches a batch of `max_batch` rows runs in: at most one per row."""
    return max(1, min(micro_batches, max_batch))


def make_engine(members, fuser, max_batch: int, lanes: dict[int, Lane], exchange, micro_batches: int = 1):
    """An Engine, or with micro_batches > 1 (and as many rows) a Pipeline of that many micro-
    batches, each with its own lanes."""
    parts = micro_batches_for(max_batch, micro_batches)
    if parts == 1:
        return Engine(members, fuser, max_batch, lanes, exchange)
    return Pipeline(members, fuser, max_batch, lambda: {i: Lane(lane.member, lane.resync) for i, lane in lanes.items()},
                    exchange, parts)
