"""One fused step, written once: members' logits -> relative vectors -> aggregate -> search.

ALGORITHM.md sections 3-4. `exact` mode is the authors' math over full vocabularies; `fast`
mode restricts each member's distribution to the tokens that carry its mass (the rest enters
per embedding cluster and is reported as neglected mass) and runs `search_fast`.

`Fuser.step` runs the per-step protocol (protocol.py: rules, rows, relative vectors, gather,
search, tokens, in three phases); where the members are is an exchange's business. The Fuser
holds what the protocol computes with: the transfers, the weights, the search settings, the
rules and the search on the main member (`decide`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from .gate import Gate
from .protocol import LOCAL, Pending, Phases, StepResult, begin, compute, finish
from .search import SearchSettings, candidate_margin, search_exact, search_fast
from .summary import relative_from, summarize


def relative_exact(logits: torch.Tensor, transfer) -> torch.Tensor:
    return transfer.left(torch.softmax(logits.float(), dim=-1))


def relative_fast(logits: torch.Tensor, transfer, mass_epsilon: float, max_support: int):
    """Fast mode's relative vectors and neglected mass per row, from (F, |V|) logits (summary.py)."""
    return relative_from(summarize(logits, transfer, max_support), transfer, mass_epsilon)


@dataclass
class FastSettings:
    mass_epsilon: float = 1e-4
    max_support: int = 256
    skip_decided: bool = True   # a row whose top logit leads by more than the search can move: no fusion
    skip_agreeing: bool = False  # a row where every member's argmax is the same token: no fusion (not exact)
    split_fusion: bool = False   # several leaders (the launcher): each fuses a share of the rows (split.py)


class Fuser(Phases):
    """Holds the members' transfer objects and the settings; `step` fuses one decoding step.

    Member 0 of `transfers`/`weights` is the main model. In the distributed runtime a rank
    holds only its own member's transfer (the others are None)."""

    def __init__(self, transfers: list, weights: list[float], search: SearchSettings,
                 mode: str = "fast", fast: FastSettings | None = None, eos_token_id: int | None = None,
                 gate: Gate = Gate()):
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        self.transfers = transfers
        self.weights = weights
        self.search = search
        self.mode = mode
        self.fast = fast or FastSettings()
        self.eos_token_id = eos_token_id
        self.gate = gate   # GaC's gate (gate.py): fuse only where the gate member is unsure
        # seconds per part: rules, relative, gather, search, broadcast
        self.seconds: dict[str, float] = defaultdict(float)
        self.decided_rows = 0   # rows skipped because their token was decided (fast mode)
        self.agreeing_rows = 0  # rows skipped because every member's argmax agreed (skip_agreeing)
        self.rows_fused_here = 0   # rows whose search ran in this process (split.py shares them out)
        self._anchor_column: dict[int, torch.Tensor] = {}

    def reset_counts(self):
        """Zero the time per part and the row counters: a bench run reports its own."""
        self.seconds.clear()
        self.decided_rows = self.agreeing_rows = self.rows_fused_here = 0

    def forget_rows(self):
        """Empty the members' row stores: a bench repetition starts as a new job would."""
        for transfer in self.transfers:
            if hasattr(transfer, "forget_rows"):
                transfer.forget_rows()

    def member_relative(self, i: int, logits: torch.Tensor):
        """Member i's relative vectors (B x |A|) and the probability mass fast mode neglected
        (None in exact mode)."""
        if self.mode == "exact":
            return relative_exact(logits, self.transfers[i]), None
        return relative_fast(logits, self.transfers[i], self.fast.mass_epsilon, self.fast.max_support)

    def argmax_anchor(self, i: int, logits: torch.Tensor) -> torch.Tensor:
        """Member i's argmax per row as an anchor column (-1 where it is no anchor): two members'
        argmaxes are the same token exactly when they are the same anchor column."""
        t = self.transfers[i]
        if i not in self._anchor_column:
            column = torch.full((t.num_tokens,), -1, dtype=torch.long, device=t.device)
            column[t.anchor_ids] = torch.arange(len(t.anchor_ids), device=t.device)
            self._anchor_column[i] = column
        ids = logits.argmax(-1).to(t.device)
        return torch.where(ids < t.num_tokens, self._anchor_column[i][ids.clamp(max=t.num_tokens - 1)], -1)

    def members_agree(self, logits: dict, exchange, batch: int) -> torch.Tensor | None:
        """The optional agreement skip (the authors' advice, DeePEn issue #6): on the main
        member, True for rows where every member's own argmax is the same token; not exact,
        since fusion could still move a row where all agree. Fast mode only; None when off."""
        if not (self.mode == "fast" and self.fast.skip_agreeing and exchange.leads and len(self.transfers) > 1):
            return None
        keys = exchange.collect_keys({i: self.argmax_anchor(i, l) for i, l in logits.items()}, batch)
        if keys is None:
            return None
        keys = torch.stack([k.to(keys[0].device) for k in keys])
        return (keys[0] >= 0) & keys.eq(keys[0]).all(0)

    def rows_to_fuse(self, main_logits: torch.Tensor, skip: torch.Tensor | None,
                     agree: torch.Tensor | None = None, greedy: torch.Tensor | None = None,
                     gated: torch.Tensor | None = None) -> torch.Tensor:
        """The fusion rules: not when eta is 0, not where the main model's own argmax is EOS,
        not where the caller says so (a stop string was just completed), not where the gate
        member is sure (`gated`, gate.py: every row, sampled or not). Fast mode also skips a
        row whose outcome is decided: its top logit leads the second by more than the search can
        move two logits apart (`candidate_margin`), so whatever the members say, the search
        returns the main model's own argmax. Exact mode runs the authors' search on every row.
        Both skips are about the argmax: a row that samples or reports log-probabilities
        (`greedy` False) is always fused."""
        main_argmax = main_logits.argmax(-1)
        fuse = torch.ones_like(main_argmax, dtype=torch.bool) if skip is None else ~skip
        if self.search.eta == 0:
            fuse[:] = False
        if self.eos_token_id is not None:
            fuse &= main_argmax != self.eos_token_id
        if gated is not None:
            fuse &= ~gated
        if self.mode == "fast" and self.fast.skip_decided and main_logits.shape[-1] > 1:
            top = main_logits.float().topk(2, dim=-1).values
            decided = fuse & (top[:, 0] - top[:, 1] > candidate_margin(self.search))
            decided = decided if greedy is None else decided & greedy
            self.decided_rows = self.decided_rows + decided.sum()   # a tensor: no host sync
            fuse &= ~decided
        if agree is not None:
            agreeing = fuse & agree if greedy is None else fuse & agree & greedy
            self.agreeing_rows = self.agreeing_rows + agreeing.sum()
            fuse &= ~agreeing
        return fuse

    def begin(self, member_logits, skip=None, include=None, exchange=LOCAL, memo=None, batch=None,
              sampler=None) -> Pending:
        """`step`'s first phase (protocol.py): rules, rows and what crosses before the work."""
        return begin(self, member_logits, skip, include, exchange, memo, batch, sampler)

    def compute(self, pending: Pending):
        """`step`'s second phase: this process's share of the work, no communication."""
        compute(self, pending)

    def finish(self, pending: Pending) -> StepResult:
        """`step`'s last phase, after `compute`: gather or merge, search, the tokens."""
        return finish(self, pending)

    def relative_rows(self, i: int, logits: torch.Tensor, rows: torch.Tensor, memo: dict | None):
        if memo is None:
            return self.member_relative(i, logits[rows])
        key = (i, id(logits), tuple(rows.tolist()), id(self.transfers[i]), self.mode,
               self.fast.mass_epsilon, self.fast.max_support)
        if key not in memo:
            memo[key] = self.member_relative(i, logits[rows])
        return memo[key]

    def decide(self, main_logits: torch.Tensor, r: torch.Tensor | None, fuse: torch.Tensor,
               stats: dict | None = None, include: torch.Tensor | None = None, sampler=None) -> StepResult:
        """The inverse search on the main model for the rows in `fuse` (r: their aggregated
        relative vectors, in row order); every other row takes the main model's own argmax.
        With a sampler that needs them, the final logits of every row (fast mode: the searched
        support, the main model's logits elsewhere) go to it."""
        main = main_logits.float()
        tokens = main.argmax(-1)
        stats = stats or {}
        include = None if include is None else include.to(main.device)
        picked = None if include is None else main[:, include].clone()
        final = None
        if r is None:
            final = main if self.mode == "exact" else None
            result = StepResult(tokens, fuse, None, final, stats, picked)
        elif self.mode == "exact":
            rows = fuse.nonzero(as_tuple=True)[0]
            final = main.clone()
            final[rows] = search_exact(main[rows], r, self.transfers[0], self.search)
            result = StepResult(final.argmax(-1), fuse, r, final, stats,
                                None if include is None else final[:, include])
        else:
            rows = fuse.nonzero(as_tuple=True)[0]
            keep = sampler is not None and sampler.needs_logits
            chosen, search_stats = search_fast(main[rows], r, self.transfers[0], self.search,
                                               self.fast.mass_epsilon, self.fast.max_support, include, keep)
            tokens[rows] = chosen
            if include is not None:
                picked[rows] = search_stats.pop("include_logits")
            if keep:
                ids, z = search_stats.pop("searched")
                final = main.clone()
                final[rows] = final[rows].scatter(1, ids, z)
            stats.update(search_stats)
            result = StepResult(tokens, fuse, r, None, stats, picked)
        if sampler is not None and sampler.needs_logits:
            result.tokens, result.logprobs = sampler(main if final is None else final, main, result.tokens)
        return result
