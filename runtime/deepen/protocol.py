"""The per-step protocol, written once: members' logits -> relative vectors -> aggregate -> search.

Where the members are is an `exchange`'s business (`LocalExchange` here: every member in this
process; `runtime.distributed.exchange.GroupExchange`: member groups over torch.distributed).
A step runs in three phases, so that a pipelined run (engine/pipeline.py) can put another
micro-batch's work between them; `Fuser.step` runs them back to back.

  begin     rules     the main member picks the rows to fuse (eta > 0, its own argmax is not
                      EOS, the caller's skip mask, fast mode's decided rows, the agreement skip)
            rows      the fused rows reach every leader: the fuse mask, or (split_fusion,
                      split.py) each fused row's owner among the leaders
            gather    (rows shared out) every member's summary of every fused row, on every leader
  compute   relative  plain: this process's members' r_i = p_i @ P_i for the fused rows (+ the
                      mass fast mode neglected); shared out: for the rows this leader owns,
                      every member's r_i, r = sum_i w_i r_i and the search
            (no communication: only this phase's work may overlap another micro-batch's)
  finish    gather    plain: the main member receives every member's r_i; shared out: each
                      owner's tokens summed onto the main leader (merge)
            search    plain: r = sum_i w_i r_i and the inverse search on the main member
            tokens    the chosen tokens and fused flags reach everyone who decodes

The token-space methods (UniTE, GaC: tokenspace.py, unite.py, gac.py) run the same phases over
the members' union vocabulary (union.py) instead of relative space:

  begin     rules     the gate (gate.py) and the caller's skip mask pick the rows to fuse
            rows      the fuse mask reaches every leader
            share     (UniTE) every member's top-k union entries of the fused rows, on every
                      leader (an all-gather of F x k int64 per member)
  compute   part      each leader: its member's share of the fused rows (UniTE: probabilities
                      over the row's union of top-k; GaC: its top probabilities as union entries)
  finish    gather    the parts reach the main member
            combine   the weighted sum over the union, the argmax, the main member's id for it
            tokens    as above
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .gate import gated_rows
from .split import NOT_FUSED, fuse_owned, merge_owned, owners, share_summaries, splits
from .summary import aggregate


@dataclass
class StepResult:
    tokens: torch.Tensor              # chosen main-model token per row
    fused: torch.Tensor               # True where the search ran (not skipped)
    relative: torch.Tensor | None     # aggregated r (rows that were fused)
    final_logits: torch.Tensor | None = None  # exact mode only
    stats: dict = field(default_factory=dict)  # neglected_mass: per member, (fused rows,) (fast)
    include_logits: torch.Tensor | None = None  # final logits of the ids asked for (every row)
    logprobs: list | None = None      # per row: a sampler's log-probability record, or None


class LocalExchange:
    """Every member's logits are in this process: nothing crosses a process boundary."""
    is_root = True   # owns the queue of requests and the results
    leads = True     # computes relative vectors (for every member here)

    def share_plan(self, plan):
        return plan

    def foreseen_plan(self):
        pass

    def share_rows(self, fuse, batch: int):
        return fuse

    def collect(self, parts: dict) -> list:
        return [parts[i] for i in sorted(parts)]

    def collect_keys(self, keys: dict, batch: int) -> list:
        return [keys[i] for i in sorted(keys)]

    def share_all(self, parts: dict) -> list:
        return [parts[i] for i in sorted(parts)]

    def share_tokens(self, result: StepResult | None, batch: int) -> StepResult:
        return result


LOCAL = LocalExchange()


class Phases:
    """What every fuser shares (DEEPEN's `fusion.Fuser`, UniTE's and GaC's `tokenspace.py`): `step`
    runs its three phases back to back, and `timed` adds a part's time to `self.seconds`, measured
    with `self.clock` (the bench may set CPU time)."""
    clock = staticmethod(time.perf_counter)

    def step(self, member_logits, skip=None, include=None, exchange=None, memo=None, batch=None,
             sampler=None) -> StepResult:
        """The per-step protocol (module doc). member_logits: a list (every member, main first)
        or {member index: (B, |V_i|) last-position logits} of the members this process fuses
        for. `skip` marks rows that must not be fused. `include`: main-model ids whose final
        logits the caller wants (a choice-constrained answer). `memo`: a dict shared by fusers
        with the same transfers, so their relative vectors are computed once (the caller
        clears it when the logits change). `batch`: the number of rows, for a process that
        holds no logits (a tensor-parallel rank that is no member's leader). `sampler`
        (engine/sampling.py): draws sampled rows' tokens from the final logits and reports
        log-probabilities, where the tokens are decided (the main leader)."""
        pending = self.begin(member_logits, skip, include, exchange or LOCAL, memo, batch, sampler)
        self.compute(pending)
        return self.finish(pending)

    @contextmanager
    def timed(self, part: str):
        t0 = self.clock()
        try:
            yield
        finally:
            self.seconds[part] += self.clock() - t0


class WholeStep:
    """A one-process fuser that defines only `step` (minED, the bench's comparing fuser) gets
    the three phases the engine calls: the whole step runs in `finish`."""

    def begin(self, member_logits, skip=None, include=None, exchange=LOCAL, memo=None, batch=None, sampler=None):
        return member_logits, skip, {"include": include, "exchange": exchange, "sampler": sampler}

    def compute(self, pending):
        pass

    def finish(self, pending) -> StepResult:
        member_logits, skip, kw = pending
        return self.step(member_logits, skip, **kw)


@dataclass
class Pending:
    """One step between its phases."""
    logits: dict                      # {member index: (B, |V_i|)} of the members fused here
    batch: int
    exchange: object
    include: torch.Tensor | None
    memo: dict | None
    sampler: object
    fuse: torch.Tensor | None = None  # rows to fuse (every leader, after begin)
    owner: torch.Tensor | None = None  # rows shared out: each row's owner (split.py's codes)
    shared: tuple | None = None       # rows shared out: (fused rows, every member's summaries)
    mine: dict | None = None          # plain: this process's (r_i, neglected) for the fused rows
    merged: torch.Tensor | None = None  # rows shared out: this owner's (token, neglected) rows
    local: dict = field(default_factory=dict)  # token-space methods: what stays in this process


def _pending(member_logits, batch, exchange, include, memo, sampler) -> Pending:
    """A step's state: the members' logits as {member index: logits} (a list: every member, main
    first) and the number of rows."""
    logits = dict(enumerate(member_logits)) if isinstance(member_logits, (list, tuple)) else member_logits
    batch = batch if batch is not None else len(next(iter(logits.values())))
    return Pending(logits, batch, exchange, include, memo, sampler)


def begin(fuser, member_logits, skip=None, include=None, exchange=LOCAL, memo=None, batch=None,
          sampler=None) -> Pending:
    """Rules, rows and (rows shared out) the summaries: the phase's collectives, in order."""
    p = _pending(member_logits, batch, exchange, include, memo, sampler)
    logits, batch, main = p.logits, p.batch, p.logits.get(0)
    with fuser.timed("rules"):
        agree = fuser.members_agree(logits, exchange, batch)
        gated = gated_rows(fuser.gate, logits, exchange, batch)
        if main is not None:
            greedy = sampler.argmax_only(main.device) if sampler is not None else None
            p.fuse = fuser.rows_to_fuse(main, skip, agree, greedy, gated)
    if not exchange.leads:
        return p
    owned = None   # whether any row has an owner, where this process knows it without a read
    with fuser.timed("gather"):
        if splits(fuser, exchange, sampler, include):   # the rows shared out between leaders (split.py)
            mine = None if p.fuse is None else owners(p.fuse, exchange.leaders)
            owned = None if mine is None else mine[1]
            p.owner = exchange.share_owners(None if mine is None else mine[0], batch)
            p.fuse = p.owner != NOT_FUSED
        else:
            p.fuse = exchange.share_rows(p.fuse, batch)
    if p.owner is not None and (owned if owned is not None else bool((p.owner >= 0).any())):
        p.shared = share_summaries(fuser, logits, p.owner, exchange)
    return p


def compute(fuser, p: Pending):
    """This process's share of the fusion work; no communication."""
    if p.shared is not None:
        p.merged = fuse_owned(fuser, *p.shared, p.owner, p.exchange.position, p.batch)
    elif p.exchange.leads and p.fuse.any():
        rows = p.fuse.nonzero(as_tuple=True)[0]
        with fuser.timed("relative"):
            p.mine = {i: fuser.relative_rows(i, l, rows, p.memo) for i, l in p.logits.items()}


def finish(fuser, p: Pending) -> StepResult:
    """Gather or merge, search (plain), and the tokens to everyone who decodes."""
    exchange, main, result = p.exchange, p.logits.get(0), None
    if p.shared is not None:
        done = merge_owned(fuser, p.merged, p.shared[0], main, exchange)
        if done is not None:
            result = StepResult(done[0], p.fuse, None, None, done[1])
    else:
        parts = None
        if p.mine is not None:
            with fuser.timed("gather"):
                parts = exchange.collect(p.mine)
        if main is not None:
            r, stats = None, {}
            if parts is not None:
                with fuser.timed("relative"):   # as in split.py: r = sum_i w_i r_i is the math's
                    r = aggregate([part[0] for part in parts], fuser.weights)
                if fuser.mode == "fast":
                    stats["neglected_mass"] = [part[1] for part in parts]  # tensors: no host transfer
            with fuser.timed("search"):
                result = fuser.decide(main, r, p.fuse, stats, p.include, p.sampler)
            fuser.rows_fused_here += 0 if r is None else len(r)
    with fuser.timed("broadcast"):
        return exchange.share_tokens(result, p.batch)


# ---- the token-space methods (module doc) -------------------------------------------------------

def begin_union(fuser, member_logits, skip=None, include=None, exchange=LOCAL, memo=None, batch=None,
                sampler=None) -> Pending:
    """Rules, rows and (UniTE) every member's top-k entries, on every leader."""
    p = _pending(member_logits, batch, exchange, include, memo, sampler)
    logits, batch, main = p.logits, p.batch, p.logits.get(0)
    with fuser.timed("rules"):
        gated = gated_rows(fuser.gate, logits, exchange, batch)
        if main is not None:
            p.fuse = fuser.rows_to_fuse(main, skip, gated)
    if not exchange.leads:
        return p
    with fuser.timed("gather"):
        p.fuse = exchange.share_rows(p.fuse, batch)
    if p.fuse.any():
        p.shared = fuser.share(p)   # times its own parts
    return p


def compute_union(fuser, p: Pending):
    """Each member's part of the fused rows, from its own logits; no communication."""
    if p.exchange.leads and p.fuse.any():
        rows = p.fuse.nonzero(as_tuple=True)[0]
        with fuser.timed("relative"):
            p.mine = {i: fuser.member_part(i, l[rows], p) for i, l in p.logits.items()}


def finish_union(fuser, p: Pending) -> StepResult:
    """The parts gathered on the main member, combined; the tokens to everyone who decodes."""
    exchange, main, result, parts = p.exchange, p.logits.get(0), None, None
    if p.mine is not None:
        with fuser.timed("gather"):
            parts = exchange.collect(p.mine)
    if main is not None:
        with fuser.timed("search"):
            result = fuser.decide(main, parts, p)
    with fuser.timed("broadcast"):
        return exchange.share_tokens(result, p.batch)
