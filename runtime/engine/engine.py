"""The decoding engine: DEEPEN over a batch, KV-cached, with continuous batching.

One loop for one process and for many ranks (`Engine.run`), one step (`Engine.step`):
  1. plan: the scheduler admits waiting prompts into free slots (each member prefills them in
     its own pass); under the launcher rank 0 plans and the exchange shares the plan;
  2. fuse: the members' next-token logits -> one main-model token per row (the per-step
     protocol, deepen/protocol.py, in its three phases: `begin_step` runs the first, `end_step`
     the last; the exchange carries what crosses between member groups);
  3. commit: append the token to the row; its committed text grows by the token's text
     (engine/detokenize.py); finish rows on EOS, a stop string or max_new_tokens;
  4. advance: the main member appends its chosen id as it is; every assist re-encodes a window at
     the end of the committed text (engine/retokenize.py, engine/lane.py); then every member runs
     one batched forward pass over its new tokens.
The committed text is what the main member's ids decode to; every assist's tokens are its encode
of it. No per-step work on the host goes over a whole row: only the ends of rows change.
engine/pipeline.py interleaves the phases of several Engines (micro-batches) under the launcher.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..deepen.protocol import LOCAL
from .detokenize import Detokenizer
from .lane import Lane
from .roundtrips import maybe_counting
from .sampling import GREEDY, Sampler, note_logprobs, stable_seed
from .scheduler import Plan, Plans, Scheduler
from .sequence import Request, Result, Row
from .stops import completes_stop, stop_rule


@dataclass
class Pending:
    """A step between `begin_step` and `end_step`: its slots, their rows, the fused step's state."""
    active: list[int]
    rows: list[Row]
    fusion: object


class Engine:
    """`lanes`: {member index: Lane} of the members this process runs (default: all of them);
    `exchange`: how a step reaches the members that run elsewhere (default: nowhere).
    `incremental=False`: the old host path (whole rows decoded and re-encoded every step), for
    comparisons; the tokens are the same."""

    def __init__(self, members, fuser, max_batch: int = 8, lanes: dict[int, Lane] | None = None,
                 exchange=LOCAL, incremental: bool = True):
        self.members = members
        self.fuser = fuser
        self.exchange = exchange
        self.scheduler = Scheduler(max_batch)
        resync = "window" if incremental else "full"
        self.lanes = lanes if lanes is not None else {i: Lane(m, resync) for i, m in enumerate(members)}
        for i, lane in self.lanes.items():
            lane.follows_text = i != 0
        self.clock = time.perf_counter   # bench --clock cpu: time.thread_time
        self.main = members[0].tokenizer
        self.detokenizer = Detokenizer(self.main, incremental) if self.main is not None else None
        self.eos = members[0].eos_token_id
        self.slots: list[Row | None] = []
        self.stopping = 0   # running rows with stop strings
        # where step time goes; the host's parts on every rank, whatever it runs
        self.seconds: dict[str, float] = defaultdict(float, {"append": 0.0, "resync": 0.0, "stops": 0.0})
        self.steps = 0
        self.stats = {"rows": 0, "fused_rows": 0}
        self._neglected = None   # per member: (sum, max) of the mass fast mode neglected
        self.plans = Plans(self.scheduler)

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    def breakdown(self) -> dict[str, float]:
        """Seconds per part: control, prefill:<member>, forward:<member>, stops (the stop rule),
        append (the main member's ids), resync (the assists' ids), and the fused step's rules,
        relative, gather, search, broadcast."""
        out = defaultdict(float, self.seconds)
        for k, v in getattr(self.fuser, "seconds", {}).items():
            out[k] += v
        return dict(out)

    def report(self, seconds: float, tokens: int) -> dict:
        """This process's figures for a run: steps, rows fused, neglected mass, where time went."""
        neglected = [acc.tolist() for acc in self._neglected] if self._neglected else None
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                "steps": self.steps, **self.stats, "decided_rows": int(getattr(self.fuser, "decided_rows", 0)),
                "agreeing_rows": int(getattr(self.fuser, "agreeing_rows", 0)),
                "rows_fused_here": int(getattr(self.fuser, "rows_fused_here", 0)),
                **{k: int(getattr(self.fuser, k)) for k in ("partial_rows", "undecided_rows") if hasattr(self.fuser, k)},
                "neglected_mass_sum": [n[0] for n in neglected] if neglected else None,
                "neglected_mass_max": [n[1] for n in neglected] if neglected else None,
                "resync": self.resync_counts(),
                **({"round_trips_per_step": self.stats["round_trips"] / max(self.steps, 1)}
                   if "round_trips" in self.stats else {}),
                "breakdown_s": self.breakdown()}

    def resync_counts(self) -> dict:
        """Per assist run here: rows synced from a window, rows encoded whole, windows refused
        (by reason: a short window refused may still succeed from further back)."""
        return {lane.member.name: lane.resync_counts() for i, lane in self.lanes.items() if i != 0}

    def _timed(self, key: str, fn, *args):
        t0 = self.clock()
        out = fn(*args)
        self.seconds[key] += self.clock() - t0
        return out

    # ---- the loop ------------------------------------------------------------------------

    def run(self, requests=(), on_result=None, source=None, tick=None) -> list[Result]:
        """Decode every request; `on_result` sees each result as soon as its row finishes. Under
        the launcher every rank calls this; only the root's `requests` (and `source`: more from
        a queue shared between replicas) count, and only the root gets results. `tick()` runs on
        the root before every step."""
        if self.exchange.is_root:
            self.scheduler.add(requests)
            self.scheduler.source = source
        self.plans.reset()
        results = []
        with maybe_counting() as counts:
            while True:
                if tick is not None and self.exchange.is_root:
                    tick()
                plan = self.next_plan()
                if plan.done:
                    break
                self.apply(plan)
                for result in self.step():
                    if self.exchange.is_root:
                        results.append(result)
                        if on_result is not None:
                            on_result(result)
        if counts is not None:
            self.stats["round_trips"] = self.stats.get("round_trips", 0) + counts["total"]
        return results

    def next_plan(self) -> Plan:
        """The root's plan for the next step (admissions, drops, the end), on every rank; nothing
        is sent where every rank can tell it is quiet (scheduler.Plans)."""
        return self.plans.next(self.slots, self.exchange, self._timed)

    def apply(self, plan: Plan):
        """Admit the plan's requests; drop free slots when nothing is waiting."""
        self.admit(plan.admit)
        if plan.drop:
            self.drop_free_slots()

    def admit(self, requests: list[Request]):
        """Place requests into free slots (new slots up to max_batch); every lane prefills them."""
        placed = []
        for request in requests:
            free = [i for i, r in enumerate(self.slots) if r is None]
            slot = free[0] if free else len(self.slots)
            if not free:
                self.slots.append(None)
            # jobs and the API give every sampled request its seed (jobs/files.expand_samples);
            # a bare Request without one draws from (0, its id), as a job with --seed 0 would
            own = request.sampling.seed
            self.slots[slot] = Row(request, seed=own if own is not None else stable_seed(0, request.id))
            self.stopping += bool(request.stop)
            placed.append((slot, request))
        if placed:
            for lane in self.lanes.values():
                self._timed(f"prefill:{lane.member.name}", lane.admit, [s for s, _ in placed],
                            [r.prompt for _, r in placed], [r.max_new_tokens for _, r in placed])

    def step(self) -> list[Result]:
        """One decoding step over every running row: fuse, commit, advance."""
        pending = self.begin_step()
        self.fuser.compute(pending.fusion)
        finished, keep_slots, texts, changed = self.end_step(pending)
        self.advance(keep_slots, texts, changed)
        return finished

    def begin_step(self) -> Pending:
        """The step's rows and the fused step's first phase (deepen/protocol.py)."""
        active = [i for i, r in enumerate(self.slots) if r is not None]
        rows = [self.slots[i] for i in active]
        every = len(active) == len(self.slots)   # every slot running: the lanes' logits as they are,
        logits = {i: lane.logits if every and len(lane.logits) == len(active) else lane.logits[active]
                  for i, lane in self.lanes.items()} if self.exchange.leads else {}   # no (B, |V|) copy
        skip = self._timed("stops", self.skip_mask, rows, logits[0]) if 0 in logits else None
        return Pending(active, rows, self.fuser.begin(logits, skip, exchange=self.exchange, batch=len(active),
                                                      sampler=self.sampler(rows)))

    def end_step(self, pending: Pending):
        """The fused step's last phase, then commit. Returns (finished results, slots still
        running, their committed texts, where each text changed): what `advance` takes."""
        result = self.fuser.finish(pending.fusion)
        self.steps += 1
        # the one transfer to the host per step: the chosen ids and whether each row was fused
        tokens, fused = torch.stack([result.tokens, result.fused.long()]).tolist()
        self.count(fused, result.stats.get("neglected_mass"))
        if result.logprobs is not None:
            note_logprobs(self.main, self.eos, pending.rows, tokens, result.logprobs)
        return self.commit(pending.active, tokens, fused)

    def sampler(self, rows: list[Row]) -> Sampler | None:
        """None while every row decodes greedily without log-probabilities (the fuser's tokens)."""
        if all(r.request.sampling is GREEDY or r.request.sampling == GREEDY for r in rows):
            return None
        return Sampler([r.request.sampling for r in rows], [r.seed for r in rows], [len(r.ids) for r in rows])

    def skip_mask(self, rows: list[Row], main_logits: torch.Tensor) -> torch.Tensor | None:
        """Rows where the main model's own token would complete a stop string: no fusion
        (engine/stops.py); None when nothing is fused or no row has a stop string."""
        if not self.stopping or getattr(getattr(self.fuser, "search", None), "eta", 1) == 0:
            return None
        return stop_rule(rows, main_logits, self.detokenizer)

    def count(self, fused: list[int], neglected: list[torch.Tensor] | None):
        """Rows, fused rows and (fast mode) the neglected mass per member, over the run; the
        mass stays on the device until `report`."""
        self.stats["rows"] += len(fused)
        self.stats["fused_rows"] += sum(fused)
        if neglected:
            if self._neglected is None:
                self._neglected = [torch.zeros(2, device=n.device) for n in neglected]
            for acc, per_row in zip(self._neglected, neglected):
                acc[0] += per_row.sum()
                acc[1] = torch.maximum(acc[1], per_row.max())

    def commit(self, active: list[int], tokens: list[int], fused: list[bool]):
        """Append each row's token; its text grows by the token's text (only the window at its
        end is decoded); finish rows on EOS, a stop string or max_new_tokens. Returns (finished
        results, slots still running, their committed texts, each text's first changed character
        or None where it did not change)."""
        grown = []
        for slot, token in zip(active, tokens):
            if token != self.eos:
                grown.append(self.slots[slot])
                grown[-1].ids.append(token)
        before = [len(r.text) for r in grown]
        changed = iter(self.detokenizer.update([r.decoded for r in grown], [r.ids for r in grown]))
        lengths = iter(before)
        finished, keep_slots, texts, where = [], [], [], []
        for slot, token, was_fused in zip(active, tokens, fused):
            row = self.slots[slot]
            row.fused_steps += int(was_fused)
            if row.first_token is None:
                row.first_token = time.perf_counter()
            finish, c = None, None
            if token == self.eos:
                finish, c = "eos", len(row.text)
            else:
                row.text, c, old = row.decoded.text, next(changed), next(lengths)
                cut = completes_stop(row.text, row.request.stop, c)
                if cut is not None:
                    row.text, finish, c = cut, "stop", min(c, len(cut))
                elif len(row.ids) >= row.request.max_new_tokens:
                    finish = "length"
                elif c == len(row.text) == old:
                    c = None   # the text did not change (a character's bytes still incomplete)
            if finish:
                finished.append(self._result(slot, row, finish, c))
                self.slots[slot] = None
                self.stopping -= bool(row.request.stop)
            else:
                keep_slots.append(slot)
                texts.append(row.text)
                where.append(c)
        return finished, keep_slots, texts, where

    def advance(self, slots: list[int], texts: list[str], changed: list[int | None]):
        """Every lane takes the step's tokens and runs one forward pass over what is new: the
        main member appends its chosen ids as they are; assists resync from the text, one after
        another (each tokenizer's tables stay in the host's caches), then run their passes.

        On a device the main member's pass goes first: it runs there while the host resyncs. On
        the CPU a pass holds the host and nothing overlaps: the resyncs go first, while the rows
        the commit just touched are still in the host's caches (after a pass they are not)."""
        main = self.lanes.get(0)
        overlap = main is not None and main.device.type != "cpu"
        if overlap:
            self._advance_main(main, slots)
        assists = [(lane, self._timed("resync", lane.sync, slots, texts, changed))
                   for i, lane in self.lanes.items() if i != 0]
        if main is not None and not overlap:
            self._advance_main(main, slots)
        for lane, pending in assists:
            if slots:
                self._timed(f"forward:{lane.member.name}", lane.forward, slots, pending)

    def _advance_main(self, lane, slots: list[int]):
        pending = self._timed("append", lane.append, slots, [self.slots[s].ids[-1] for s in slots])
        if slots:
            self._timed(f"forward:{lane.member.name}", lane.forward, slots, pending)

    def _result(self, slot: int, row: Row, finish: str, changed: int | None) -> Result:
        counts = {}
        if self.exchange.is_root:  # the completion's length in each member's own tokens
            for i, m in enumerate(self.members):
                lane = self.lanes.get(i)
                if lane is not None and changed is not None:
                    counts[m.name] = lane.completion_tokens(slot, row.text, changed)
                else:
                    prefix = m.render(row.request.prompt)
                    full, head = m.tokenizer([prefix + row.text, prefix])["input_ids"]
                    counts[m.name] = len(full) - len(head)
        return Result(row.request, row.text, row.ids, finish, counts, row.fused_steps,
                      row.first_token - row.admitted,
                      row.logprobs if row.request.sampling.logprobs is not None else None)

    def drop_free_slots(self):
        """No prompt is waiting: free slots would only compute padding. Drop them: the running
        rows past the new end move into the free slots before it (the caches copy those alone)."""
        live = [i for i, r in enumerate(self.slots) if r is not None]
        n = len(live)
        if n == len(self.slots):
            return
        moves = list(zip([i for i in live if i >= n], [i for i in range(n) if self.slots[i] is None]))
        for lane in self.lanes.values():
            lane.compact_slots(moves, n)
        for a, b in moves:
            self.slots[b] = self.slots[a]
        del self.slots[n:]
