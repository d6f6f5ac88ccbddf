"""The rows of P that decoding keeps needing, kept in one slab on the transfer's device.

A fast-mode step asks for the same rows several times: the main member's relative vectors, then
its search (whose support holds theirs), then the next step (consecutive steps share much of
their supports). Each computed row is written once into a persistent slab and read from there
by every consumer, so a row is copied at most once more (into the gather a matmul needs), and no
step allocates (and page-faults) |A|-wide buffers afresh.

The slab holds at least `keep` rows (the `row_cache` knob, a memory-for-time trade) and grows to
hold the rows of the largest single request: least recently used rows are replaced first, never
one the current request needs. The search's per-row gather goes into a buffer the store keeps
(as large as the largest such gather). All bookkeeping is in tensors (no Python per-token state), so it
runs where the slab lives, CPU or GPU.
"""
from __future__ import annotations

import torch


class RowStore:
    def __init__(self, compute, num_tokens: int, num_anchors: int, device, keep: int = 512):
        self.compute = compute          # ids -> fresh (n, |A|) fp32 rows
        self.keep = max(int(keep), 0)
        self.num_anchors = num_anchors
        self.slab = torch.empty(0, num_anchors, device=device)
        self.slot_of = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        self.token_in = torch.empty(0, dtype=torch.long, device=device)   # -1: a free slot
        self.used = torch.empty(0, dtype=torch.long, device=device)       # last request that read a slot
        self.tick = 0
        self.counts = torch.zeros(2, dtype=torch.long, device=device)     # hits, misses
        self.chunk = max(1, (24 << 20) // (4 * num_anchors))   # rows computed at once: under 24 MB
        self.scratch = torch.empty(0, device=device)          # gathered(): reused, never re-faulted

    @property
    def capacity(self) -> int:
        return self.slab.shape[0]

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The slab row of each of `ids` (distinct), computing the rows not held."""
        self.tick += 1
        slots = self.slot_of[ids]
        held = slots >= 0
        self.counts[0] += held.sum()
        self.used[slots[held]] = self.tick          # in use by this request: not a victim
        new = ids[~held]
        if len(new):
            self.counts[1] += len(new)
            self._room_for(len(ids))
            victims = torch.topk(self.used, len(new), largest=False).indices
            old = self.token_in[victims]
            self.slot_of[old[old >= 0]] = -1
            for lo in range(0, len(new), self.chunk):   # chunks the allocator recycles (no page faults)
                self.slab.index_copy_(0, victims[lo:lo + self.chunk], self.compute(new[lo:lo + self.chunk]))
            self.token_in[victims] = new
            self.slot_of[new] = victims
            self.used[victims] = self.tick
            slots = self.slot_of[ids]
        return slots

    def _room_for(self, rows: int):
        """Grow the slab to hold `rows` at once (and `keep`), with a quarter to spare so that a
        slightly larger request does not grow it again. Growing keeps the rows held."""
        if rows <= self.capacity:
            return
        size = max(self.keep, rows + rows // 4)
        slab = torch.zeros(size, self.num_anchors, device=self.slab.device)  # free rows: finite (weighted)
        slab[:self.capacity] = self.slab
        grow = size - self.capacity
        self.token_in = torch.cat([self.token_in, self.token_in.new_full((grow,), -1)])
        self.used = torch.cat([self.used, self.used.new_zeros(grow)])
        self.slab = slab

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of `ids` (distinct): one gather from the slab."""
        slots = self.slots(ids)   # first: it may grow (replace) the slab
        return self.slab[slots]

    def gathered(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows of ids[index] (index: positions into the distinct ids, any shape), in a
        buffer the store reuses: valid until the next call. A fresh buffer that large costs a
        page fault per 4 KB on CPUs, more than the copy."""
        slots = self.slots(ids)[index]
        size = slots.numel() * self.num_anchors
        if self.scratch.numel() < size:
            self.scratch = torch.empty(size, device=self.slab.device)
        out = self.scratch[:size].view(slots.numel(), self.num_anchors)
        torch.index_select(self.slab, 0, slots.reshape(-1), out=out)
        return out.view(*slots.shape, self.num_anchors)

    def weighted(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights @ rows(ids) (weights: B x len(ids)). When the request covers a quarter of the
        slab or more, the slab itself is the operand (weights spread over its rows; nothing
        gathered). A quarter was chosen from runs on the real pair at batch 8
        (docs/performance.md, "The row store")."""
        slots = self.slots(ids)
        if 4 * len(ids) >= self.capacity:
            spread = weights.new_zeros(weights.shape[0], self.capacity)
            spread[:, slots] = weights
            return spread @ self.slab
        return weights @ self.slab[slots]
