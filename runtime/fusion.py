"""One fused step: members' logits -> relative vectors -> aggregate -> inverse search -> tokens.

ALGORITHM.md sections 3-4. `exact` mode is the authors' math over full vocabularies;
`fast` mode restricts each member's distribution to the tokens that carry its mass (the
neglected mass goes to P's mean row, and is reported) and runs `search_fast`.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .search import SearchSettings, search_exact, search_fast


def relative_exact(logits: torch.Tensor, transfer) -> torch.Tensor:
    return transfer.left(torch.softmax(logits.float(), dim=-1))


def relative_fast(logits: torch.Tensor, transfer, mass_epsilon: float, max_support: int):
    """r = p @ P over the smallest top-k holding 1 - mass_epsilon of p (at most max_support);
    the remaining mass times P's mean row. Returns (r, neglected mass per row)."""
    logits = logits.float()
    k0 = min(max_support, logits.shape[1])
    top_logits, top_ids = logits.topk(k0, dim=-1)
    probs = torch.exp(top_logits - torch.logsumexp(logits, dim=-1, keepdim=True))
    cum = probs.cumsum(-1)
    k = ((cum < 1 - mass_epsilon).sum(-1) + 1).clamp(max=k0)
    live = torch.arange(k0)[None, :] < k[:, None]
    neglected = (1 - cum.gather(1, (k - 1)[:, None])).clamp_min(0).squeeze(1)
    uniq, inverse = torch.unique(top_ids[live], return_inverse=True)
    weights = torch.zeros(logits.shape[0], len(uniq))
    weights[live.nonzero(as_tuple=True)[0], inverse] = probs[live]
    r = weights @ transfer.rows(uniq) + neglected[:, None] * transfer.mean_row[None, :]
    return r, neglected


def aggregate(relatives: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(relatives[0])
    for w, r in zip(weights, relatives):
        out += w * r
    return out


@dataclass
class FastSettings:
    mass_epsilon: float = 1e-4
    max_support: int = 256


@dataclass
class StepResult:
    tokens: torch.Tensor              # chosen main-model token per row
    fused: torch.Tensor               # True where the search ran (not skipped)
    relative: torch.Tensor | None     # aggregated r (rows that were fused)
    final_logits: torch.Tensor | None = None  # exact mode only
    stats: dict = field(default_factory=dict)


class Fuser:
    """Holds the members' transfer objects and the settings; `step` fuses one decoding step.

    Member 0 of `transfers`/`weights` is the main model."""

    def __init__(self, transfers: list, weights: list[float], search: SearchSettings,
                 mode: str = "fast", fast: FastSettings | None = None, eos_token_id: int | None = None):
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        self.transfers = transfers
        self.weights = weights
        self.search = search
        self.mode = mode
        self.fast = fast or FastSettings()
        self.eos_token_id = eos_token_id
        self.seconds: dict[str, float] = defaultdict(float)  # relative transform, search

    def relative(self, member_logits: list[torch.Tensor]):
        if self.mode == "exact":
            rs = [relative_exact(l, t) for l, t in zip(member_logits, self.transfers)]
            return aggregate(rs, self.weights), {}
        rs, neglected = [], []
        for logits, transfer in zip(member_logits, self.transfers):
            r, lost = relative_fast(logits, transfer, self.fast.mass_epsilon, self.fast.max_support)
            rs.append(r)
            neglected.append(lost.tolist())
        return aggregate(rs, self.weights), {"neglected_mass": neglected}

    def step(self, member_logits: list[torch.Tensor], skip: torch.Tensor | None = None) -> StepResult:
        """member_logits[i]: (B, |V_i|) last-position logits of member i. `skip` marks rows whose
        step must not be fused (e.g. a stop string was just completed)."""
        main = member_logits[0].float()
        tokens = main.argmax(-1)
        fuse = torch.ones_like(tokens, dtype=torch.bool) if skip is None else ~skip
        if self.search.eta == 0:
            fuse[:] = False
        if self.eos_token_id is not None:
            fuse &= tokens != self.eos_token_id
        if not fuse.any():
            return StepResult(tokens, fuse, None, main if self.mode == "exact" else None)
        rows = fuse.nonzero(as_tuple=True)[0]
        t0 = time.perf_counter()
        r, stats = self.relative([l[rows] for l in member_logits])
        t1 = time.perf_counter()
        self.seconds["relative"] += t1 - t0
        if self.mode == "exact":
            final = main.clone()
            final[rows] = search_exact(main[rows], r, self.transfers[0], self.search)
            self.seconds["search"] += time.perf_counter() - t1
            tokens = final.argmax(-1)
            return StepResult(tokens, fuse, r, final, stats)
        chosen, search_stats = search_fast(main[rows], r, self.transfers[0], self.search,
                                           self.fast.mass_epsilon, self.fast.max_support)
        self.seconds["search"] += time.perf_counter() - t1
        tokens = tokens.clone()
        tokens[rows] = chosen
        stats.update(search_stats)
        return StepResult(tokens, fuse, r, None, stats)
