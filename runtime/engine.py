"""The decoding engine: DEEPEN over a batch, KV-cached, with continuous batching.

One step, in one place (`Engine.step`):
  1. admit waiting prompts into free slots (each member prefills them in its own pass);
  2. fuse: members' next-token logits -> one main-model token per row (runtime/fusion.py);
  3. commit: append the token's text to the row's committed text; finish rows on EOS, a stop
     string or max_new_tokens;
  4. resync + forward: every member re-encodes the new text, keeps the longest common prefix with
     its ids (cropping its KV cache there) and prefills only the new tokens (runtime/lanes.py).
The committed text is the truth; a row's tokens in every member decode to exactly it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .lanes import Lane
from .reference import completes_stop


@dataclass
class Request:
    id: object
    prompt: str
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


@dataclass
class Row:
    request: Request
    ids: list[int] = field(default_factory=list)
    text: str = ""
    fused_steps: int = 0
    admitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


@dataclass
class Result:
    request: Request
    text: str
    ids: list[int]
    finish: str
    member_tokens: dict[str, int]
    fused_steps: int
    first_token_s: float | None = None  # from admission to the first committed token

    def record(self) -> dict:
        return {**self.request.extra, "id": self.request.id, "completion": self.text,
                "tokens": len(self.ids), "finish_reason": self.finish,
                "member_tokens": self.member_tokens, "fused_steps": self.fused_steps}


class Engine:
    def __init__(self, members, fuser, max_batch: int = 8, lanes: list[Lane] | None = None):
        self.members = members
        self.fuser = fuser
        self.max_batch = max_batch
        self.lanes = lanes if lanes is not None else [Lane(m) for m in members]
        self.main = members[0].tokenizer
        self.eos = members[0].eos_token_id
        self.slots: list[Row | None] = []
        self.seconds: dict[str, float] = defaultdict(float)  # where step time goes
        self.steps = 0

    def breakdown(self) -> dict[str, float]:
        """Seconds per part: forward:<member>, prefill:<member>, resync, relative, search, and
        fusion_other (skip rules, bookkeeping)."""
        out = {k: v for k, v in self.seconds.items() if k != "fusion"}
        inner = getattr(self.fuser, "seconds", {})
        out.update(inner)
        out["fusion_other"] = self.seconds.get("fusion", 0.0) - sum(inner.values())
        return out

    def _timed(self, key: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[key] += time.perf_counter() - t0
        return out

    def admit(self, waiting: list[Request]):
        """Move waiting requests into free slots (new slots up to max_batch)."""
        placed = []
        while waiting:
            free = [i for i, r in enumerate(self.slots) if r is None]
            if free:
                slot = free[0]
            elif len(self.slots) < self.max_batch:
                slot = len(self.slots)
                self.slots.append(None)
            else:
                break
            request = waiting.pop(0)
            self.slots[slot] = Row(request)
            placed.append((slot, request))
        if placed:
            for lane in self.lanes:
                self._timed(f"prefill:{lane.member.name}", lane.admit,
                            [s for s, _ in placed], [r.prompt for _, r in placed])

    def step(self) -> list[Result]:
        active = [i for i, r in enumerate(self.slots) if r is not None]
        rows = [self.slots[i] for i in active]
        logits = [lane.logits[active] for lane in self.lanes]
        skip = self.skip_mask(rows, logits[0])
        result = self._timed("fusion", self.fuser.step, logits, skip)
        self.steps += 1

        finished, keep_slots, texts = self.commit(active, result.tokens.tolist(), result.fused.tolist())
        kept = [self.slots[s].ids[-1] for s in keep_slots]
        for k, lane in enumerate(self.lanes):
            if k == 0:  # the main member keeps its own ids; only assists resync from the text
                pending = self._timed("resync", lane.append, keep_slots, kept)
            else:
                pending = self._timed("resync", lane.sync, keep_slots, texts)
            if keep_slots:
                self._timed(f"forward:{lane.member.name}", lane.forward, keep_slots, pending)
        return finished

    def skip_mask(self, rows: list[Row], main_logits: torch.Tensor) -> torch.Tensor:
        """Rows where the main model's own token would complete a stop string: no fusion."""
        own = main_logits.argmax(-1).tolist()
        return torch.tensor([completes_stop(self.main.decode(r.ids + [t]), r.request.stop) is not None
                             for r, t in zip(rows, own)], dtype=torch.bool)

    def commit(self, active: list[int], tokens: list[int], fused: list[bool]):
        """Append each row's token; finish rows on EOS, a stop string or max_new_tokens.
        Returns (finished results, slots still running, their committed texts)."""
        finished, keep_slots, texts = [], [], []
        for slot, token, was_fused in zip(active, tokens, fused):
            row = self.slots[slot]
            row.fused_steps += int(was_fused)
            if row.first_token is None:
                row.first_token = time.perf_counter()
            finish = None
            if token == self.eos:
                finish = "eos"
            else:
                row.ids.append(token)
                row.text = self.main.decode(row.ids)
                cut = completes_stop(row.text, row.request.stop)
                if cut is not None:
                    row.text, finish = cut, "stop"
                elif len(row.ids) >= row.request.max_new_tokens:
                    finish = "length"
            if finish:
                finished.append(self._result(slot, row, finish))
                self.slots[slot] = None
            else:
                keep_slots.append(slot)
                texts.append(row.text)
        return finished, keep_slots, texts

    def _result(self, slot: int, row: Row, finish: str) -> Result:
        counts = {}
        for m in self.members:  # the completion's length in each member's own tokens
            prefix = m.render(row.request.prompt)
            full, head = m.tokenizer([prefix + row.text, prefix])["input_ids"]
            counts[m.name] = len(full) - len(head)
        return Result(row.request, row.text, row.ids, finish, counts, row.fused_steps,
                      row.first_token - row.admitted)

    def drop_free_slots(self):
        """No prompt is waiting: free slots would only compute padding. Drop them."""
        keep = [i for i, r in enumerate(self.slots) if r is not None]
        if len(keep) == len(self.slots):
            return
        for lane in self.lanes:
            lane.keep_slots(keep)
        self.slots = [self.slots[i] for i in keep]

    def run(self, requests, on_result=None) -> list[Result]:
        """Decode every request; `on_result` sees each result as soon as its row finishes."""
        waiting = list(requests)
        results = []
        while waiting or any(r is not None for r in self.slots):
            self.admit(waiting)
            if not waiting:
                self.drop_free_slots()
            for result in self.step():
                results.append(result)
                if on_result is not None:
                    on_result(result)
        return results
