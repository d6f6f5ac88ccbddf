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


def tail_by_cluster(probs: torch.Tensor, top_ids: torch.Tensor, live: torch.Tensor,
                    cluster_of: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """(B, C): the probability of the tokens outside each row's support, summed per cluster."""
    mass = torch.zeros(probs.shape[0], n_clusters).index_add_(1, cluster_of, probs)
    taken = torch.where(live, probs.gather(1, top_ids), torch.zeros(()))
    return mass.scatter_add_(1, cluster_of[top_ids], -taken).clamp_min_(0)


def relative_fast(logits: torch.Tensor, transfer, mass_epsilon: float, max_support: int):
    """r = p @ P over the smallest top-k holding 1 - mass_epsilon of p (at most max_support);
    the rest of p enters cluster by cluster, each cluster's mass times its mean row of P.
    Returns (r, neglected mass per row: what was not computed row by row)."""
    probs = torch.softmax(logits.float(), dim=-1)
    k0 = min(max_support, probs.shape[1])
    top_probs, top_ids = probs.topk(k0, dim=-1)
    cum = top_probs.cumsum(-1)
    k = ((cum < 1 - mass_epsilon).sum(-1) + 1).clamp(max=k0)
    live = torch.arange(k0)[None, :] < k[:, None]
    neglected = (1 - cum.gather(1, (k - 1)[:, None])).clamp_min(0).squeeze(1)
    uniq, inverse = torch.unique(top_ids[live], return_inverse=True)
    weights = torch.zeros(probs.shape[0], len(uniq))
    weights[live.nonzero(as_tuple=True)[0], inverse] = top_probs[live]
    tail = tail_by_cluster(probs, top_ids, live, transfer.cluster_of, transfer.cluster_rows.shape[0])
    r = weights @ transfer.rows(uniq) + tail @ transfer.cluster_rows
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
    include_logits: torch.Tensor | None = None  # final logits of the ids asked for (every row)


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

    def member_relative(self, i: int, logits: torch.Tensor):
        """Member i's relative vectors (B x |A|) and the probability mass fast mode neglected
        (None in exact mode). In the distributed runtime this runs on member i's leader."""
        if self.mode == "exact":
            return relative_exact(logits, self.transfers[i]), None
        return relative_fast(logits, self.transfers[i], self.fast.mass_epsilon, self.fast.max_support)

    def relative(self, member_logits: list[torch.Tensor]):
        """Aggregated relative vectors of all members (one process)."""
        parts = [self.member_relative(i, l) for i, l in enumerate(member_logits)]
        stats = {} if self.mode == "exact" else {"neglected_mass": [lost.tolist() for _, lost in parts]}
        return aggregate([r for r, _ in parts], self.weights), stats

    def rows_to_fuse(self, main_logits: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """The fusion rules: not when eta is 0, not where the main model's own argmax is EOS,
        not where the caller says so (a stop string was just completed)."""
        main_argmax = main_logits.argmax(-1)
        fuse = torch.ones_like(main_argmax, dtype=torch.bool) if skip is None else ~skip
        if self.search.eta == 0:
            fuse[:] = False
        if self.eos_token_id is not None:
            fuse &= main_argmax != self.eos_token_id
        return fuse

    def step(self, member_logits: list[torch.Tensor], skip: torch.Tensor | None = None,
             include: torch.Tensor | None = None) -> StepResult:
        """member_logits[i]: (B, |V_i|) last-position logits of member i. `skip` marks rows whose
        step must not be fused (e.g. a stop string was just completed). `include`: main-model
        token ids whose final logits the caller wants (a choice-constrained answer)."""
        fuse = self.rows_to_fuse(member_logits[0], skip)
        if not fuse.any():
            return self.decide(member_logits[0], None, fuse, include=include)
        rows = fuse.nonzero(as_tuple=True)[0]
        t0 = time.perf_counter()
        r, stats = self.relative([l[rows] for l in member_logits])
        self.seconds["relative"] += time.perf_counter() - t0
        return self.decide(member_logits[0], r, fuse, stats, include)

    def decide(self, main_logits: torch.Tensor, r: torch.Tensor | None, fuse: torch.Tensor,
               stats: dict | None = None, include: torch.Tensor | None = None) -> StepResult:
        """The inverse search on the main model for the rows in `fuse` (r: their aggregated
        relative vectors, in row order); every other row takes the main model's own argmax."""
        main = main_logits.float()
        tokens = main.argmax(-1)
        stats = stats or {}
        picked = None if include is None else main[:, include].clone()
        if r is None:
            return StepResult(tokens, fuse, None, main if self.mode == "exact" else None, stats, picked)
        rows = fuse.nonzero(as_tuple=True)[0]
        t0 = time.perf_counter()
        if self.mode == "exact":
            final = main.clone()
            final[rows] = search_exact(main[rows], r, self.transfers[0], self.search)
            self.seconds["search"] += time.perf_counter() - t0
            return StepResult(final.argmax(-1), fuse, r, final, stats,
                              None if include is None else final[:, include])
        chosen, search_stats = search_fast(main[rows], r, self.transfers[0], self.search,
                                           self.fast.mass_epsilon, self.fast.max_support, include)
        self.seconds["search"] += time.perf_counter() - t0
        tokens[rows] = chosen
        if include is not None:
            picked[rows] = search_stats.pop("include_logits")
        stats.update(search_stats)
        return StepResult(tokens, fuse, r, None, stats, picked)
