"""GaC, "Breaking the Ceiling of the LLM Community by Treating Token Generation as a
Classification for Ensembling" (Yu et al., EMNLP 2024 findings; code yaoching0/GaC,
utils/gac_gen_utils.py): every member's next-token distribution mapped onto the union
vocabulary, the weighted sum, the argmax (docs/methods.md states it in full).

  map       member i's probability of each id goes to the id's union entry (union.py): ids that
            spell the same bytes add up; special tokens other than EOS are dropped
  sum       P(u) = sum_i w_i P_i(u); the argmax, the lowest entry on ties (the main member's
            tokens come first in the union)
  token     the main member's id for the entry (union.py's from_union)

exact: the whole distributions. fast (the default): each member sends only its top tokens, the
smallest top-k that holds 1 - mass_epsilon of its probability (at most max_support), as union
entries and probabilities, plus a bound on any token it left out (the next probability, and the
mass left out). The argmax over what arrived is exact unless another entry's upper bound (what
arrived plus every missing member's bound) reaches the winner's value: such a row is counted
(`undecided_rows`); fast mode's agreement with exact is measured (docs/methods.md).

Across ranks: each member's part goes to the main leader: F x (2k + 1) fp32 (k = max_support;
ids travel as fp32, exact below 2**24) and the mass it left out; exact: F x |U| fp32.
"""
from __future__ import annotations

import torch

from .gate import Gate
from .protocol import Pending
from .summary import EXACT_IDS
from .tokenspace import TokenSpaceFuser


def top_part(probs: torch.Tensor, entries_of, width: int, mass_epsilon: float):
    """A member's fast part from (F, V) probabilities: (F, width) entries (-1 where not sent),
    (F, width) probabilities, (F,) bound on any token not sent, (F,) mass not sent."""
    k0 = min(width, probs.shape[1])
    top, ids = probs.topk(k0, -1)
    cum = top.cumsum(-1)
    k = ((cum < 1 - mass_epsilon).sum(-1) + 1).clamp(max=k0)
    live = torch.arange(k0, device=probs.device)[None, :] < k[:, None]
    sent = cum.gather(1, (k - 1)[:, None]).squeeze(1)
    left = (1 - sent).clamp_min(0)
    bound = torch.minimum(top.gather(1, k.clamp(max=k0 - 1)[:, None]).squeeze(1), left)
    entries = torch.where(live, entries_of(ids), -1)
    top = torch.where(entries >= 0, top, 0.0)
    pad = width - k0
    if pad:
        entries = torch.cat([entries, entries.new_full((len(entries), pad), -1)], 1)
        top = torch.cat([top, top.new_zeros(len(top), pad)], 1)
    return entries, top, bound, left


def merge_parts(entries: list[torch.Tensor], probs: list[torch.Tensor], bounds: list[torch.Tensor],
                weights: list[float], size: int):
    """The weighted sum over what arrived, per row: (chosen entry (F,), undecided (F,) bool,
    (row of each summed entry, entry, value))."""
    f = len(entries[0])
    e = torch.cat(entries, 1)
    v = torch.cat([w * p for w, p in zip(weights, probs)], 1)
    member = torch.cat([torch.full_like(x, i) for i, x in enumerate(entries)], 1)
    row = torch.arange(f, device=e.device)[:, None].expand_as(e)
    ok = e >= 0
    keys, inverse = torch.unique(row[ok] * (size + 1) + e[ok], return_inverse=True)
    value = torch.zeros(len(keys), device=v.device).index_add_(0, inverse, v[ok])
    key_row, key_entry = keys // (size + 1), keys % (size + 1)
    best = torch.full((f,), -1.0, device=v.device).scatter_reduce(0, key_row, value, "amax")
    top = value == best[key_row]
    first = torch.full((f,), size + 1, device=e.device).scatter_reduce(
        0, key_row, torch.where(top, key_entry, size + 1), "amin")          # the lowest entry on ties
    # upper bounds: what arrived, plus each member that did not send the entry at its bound
    bound = torch.stack([w * b for w, b in zip(weights, bounds)], 1)          # (F, members)
    got = torch.zeros(len(keys), len(entries), dtype=torch.bool, device=e.device)
    got[inverse, member[ok]] = True
    upper = value + (bound[key_row] * ~got).sum(1)
    rival = torch.where(key_entry == first[key_row], -1.0, upper)
    rival = torch.full((f,), -1.0, device=v.device).scatter_reduce(0, key_row, rival, "amax")
    rival = torch.maximum(rival, bound.sum(1))                                # an entry nobody sent
    undecided = rival >= best
    return first, undecided, (key_row, key_entry, value)


class GaCFuser(TokenSpaceFuser):
    method = "gac"

    def __init__(self, maps, weights: list[float], gate: Gate = Gate(), mode: str = "fast",
                 eos_token_id: int | None = None, mass_epsilon: float = 1e-4, max_support: int = 256):
        super().__init__(maps, weights, gate, mode, eos_token_id)
        if mode == "fast" and maps.size >= EXACT_IDS:
            raise ValueError(f"GaC fast mode: a union of {maps.size} entries does not travel as fp32 ids")
        self.mass_epsilon, self.max_support = mass_epsilon, max_support
        self.undecided_rows = 0

    def reset_counts(self):
        super().reset_counts()
        self.undecided_rows = 0

    def whole(self, p: Pending) -> bool:
        """Whole distributions: exact mode, and a caller that wants chosen ids' values (one process)."""
        return self.mode == "exact" or p.include is not None

    def member_part(self, i: int, logits: torch.Tensor, p: Pending) -> tuple:
        probs = torch.softmax(logits.float(), -1)
        if self.whole(p):
            table = self.maps.to_union[i]
            n = min(len(table), probs.shape[1])
            ok = table[:n] >= 0
            mapped = probs.new_zeros(len(probs), self.maps.size).index_add_(1, table[:n][ok], probs[:, :n][:, ok])
            return mapped, None
        entries, top, bound, left = top_part(probs, lambda ids: self.maps.entries(i, ids), self.max_support,
                                             self.mass_epsilon)
        return torch.cat([entries.float(), top, bound[:, None]], 1), left

    def combine(self, parts: list, p: Pending):
        device = p.fuse.device
        if self.whole(p):
            merged = sum(w * part[0].to(device) for w, part in zip(self.weights, parts))
            chosen = merged.argmax(-1)                              # the first (lowest) entry on ties
            ids = self.maps.from_union[0].to(device)[None].expand_as(merged)
            return self.emitted(chosen), (ids, merged), {}
        k = self.max_support
        split = [part[0].to(device) for part in parts]
        chosen, undecided, (row, entry, value) = merge_parts(
            [t[:, :k].long() for t in split], [t[:, k:2 * k] for t in split], [t[:, 2 * k] for t in split],
            self.weights, self.maps.size)
        self.undecided_rows = self.undecided_rows + undecided.sum()
        ids = torch.full((len(chosen), 1), -1, dtype=torch.long, device=device)
        probs = torch.zeros(len(chosen), 1, device=device)
        if p.sampler is not None and p.sampler.needs_logits:   # the fused distribution, as it arrived
            counts = torch.bincount(row, minlength=len(chosen))
            col = torch.arange(len(row), device=device) - (counts.cumsum(0) - counts)[row]
            ids = torch.full((len(chosen), int(counts.max())), -1, dtype=torch.long, device=device)
            probs = torch.zeros(ids.shape, device=device)
            ids[row, col] = self.maps.member_ids(0, entry)
            probs[row, col] = value
        return self.emitted(chosen), (ids, probs), {"neglected_mass": [part[1].to(device) for part in parts],
                                                    "undecided": undecided}
