"""What the token-space methods (UniTE: unite.py, GaC: gac.py) share: the union maps (union.py),
the weights, the gate (gate.py), the rules, the timing and counters the engine reads, and the
step's result from the members' union probabilities (docs/methods.md).

A fused row's token is an entry of the union; the main member emits its own id for it: the id
that spells exactly those bytes, or, for a string it has no token for, the first token of its
own encoding of the string (the rest of the string is left to the next steps). Every assist
re-encodes the committed text (the engine). Sampled rows and log-probabilities read the fused
distribution carried over to the main member's ids the same way (each entry's probability goes
to the id the main member would emit for it); a row not fused reads the main member's own.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .gate import Gate
from .protocol import LOCAL, Pending, Phases, StepResult, begin_union, compute_union, finish_union


class TokenSpaceFuser(Phases):
    method = ""
    transfers = ()   # no relative transfers (the launcher checks a DEEPEN fuser's)

    def __init__(self, maps, weights: list[float], gate: Gate = Gate(), mode: str = "fast",
                 eos_token_id: int | None = None):
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        self.maps, self.weights, self.gate, self.mode = maps, weights, gate, mode
        self.eos_token_id = eos_token_id
        self.seconds: dict[str, float] = defaultdict(float)
        self.decided_rows = self.agreeing_rows = 0   # DEEPEN's skips: none here (engine reports)
        self.rows_fused_here = 0
        self.partial_rows = 0   # fused rows whose chosen string is no main-member token (first token emitted)

    def reset_counts(self):
        self.seconds.clear()
        self.rows_fused_here = self.partial_rows = 0

    def forget_rows(self):
        pass

    def rows_to_fuse(self, main_logits: torch.Tensor, skip: torch.Tensor | None,
                     gated: torch.Tensor | None) -> torch.Tensor:
        """Every row, except where the caller says not (a stop string just completed) and where the
        gate member is sure. No EOS rule: the authors fuse every step, EOS included."""
        fuse = torch.ones(main_logits.shape[0], dtype=torch.bool, device=main_logits.device) if skip is None \
            else ~skip.to(main_logits.device)
        return fuse if gated is None else fuse & ~gated

    # ---- the three phases (protocol.py) -----------------------------------------------------------

    def begin(self, member_logits, skip=None, include=None, exchange=LOCAL, memo=None, batch=None,
              sampler=None) -> Pending:
        return begin_union(self, member_logits, skip, include, exchange, memo, batch, sampler)

    def compute(self, pending: Pending):
        compute_union(self, pending)

    def finish(self, pending: Pending) -> StepResult:
        return finish_union(self, pending)

    # ---- what a method defines ------------------------------------------------------------------

    def share(self, p: Pending):
        """What every leader needs before its part (begin); None: nothing."""
        return None

    def member_part(self, i: int, logits: torch.Tensor, p: Pending) -> tuple:
        """Member i's part of the fused rows: (F, W) fp32 and the mass it leaves out (or None)."""
        raise NotImplementedError

    def combine(self, parts: list, p: Pending):
        """On the main member: (emitted main ids (F,), -1 for none; the fused distribution as
        (main ids (F, E), probabilities (F, E)); stats)."""
        raise NotImplementedError

    # ---- the result --------------------------------------------------------------------------------

    def decide(self, main: torch.Tensor, parts: list | None, p: Pending) -> StepResult:
        main_f = main.float()
        tokens = main_f.argmax(-1)
        stats, fused = {}, None
        rows = p.fuse.nonzero(as_tuple=True)[0]
        if parts is not None:
            emitted, fused, stats = self.combine(parts, p)
            self.rows_fused_here += len(rows)
            tokens[rows] = torch.where(emitted >= 0, emitted, tokens[rows])
        wants = p.sampler is not None and p.sampler.needs_logits
        final = None
        if wants or p.include is not None:
            final = main_f.clone()
            if fused is not None:
                final[rows] = carried_over(*fused, main_f.shape[1])
        result = StepResult(tokens, p.fuse, None, None, stats,
                            None if p.include is None else final[:, p.include.to(final.device)])
        if wants:
            result.tokens, result.logprobs = p.sampler(final, main, result.tokens)
        return result

    def emitted(self, entries: torch.Tensor) -> torch.Tensor:
        """The main member's id for chosen union entries (-1: it has none); counts the rows whose
        string it has no token for."""
        ids = self.maps.member_ids(0, entries)
        exact = self.maps.exact[0][entries.clamp_min(0)] & (entries >= 0)
        self.partial_rows = self.partial_rows + (~exact).sum()   # a tensor: no host sync
        return ids


def carried_over(ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """(F, vocab) log-probabilities over the main member's ids: each entry's probability added to
    the id it reaches (ids -1: dropped); -inf where none arrives."""
    out = torch.zeros(ids.shape[0], vocab, device=probs.device)
    ok = ids >= 0
    out.scatter_add_(1, ids.clamp_min(0), torch.where(ok, probs, 0.0))
    return out.log()
