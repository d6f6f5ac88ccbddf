"""The fused step with its rows shared out between the member groups' leaders (`split_fusion`).

In the plain step (fusion.py) a leader computes its own member's relative vectors for every
fused row and the main leader runs every row's search: the main leader does the most of each
phase and the other leaders wait for it. Here the forward passes still run member by member,
but fusion runs row by row: each fused row has one owner among the leaders, which computes every
member's relative vector for it and runs its search. What crosses is each member's summary of
its fused rows (summary.py: a few kilobytes per row instead of a 4 x |A|-byte relative vector),
so every leader holds every member's transfer (the memory this trades for time).

    rules      the main leader picks the rows to fuse, as in the plain step
    owners     each fused row's owner, from the main leader to every leader; with fewer fused
               rows than leaders, none: the plain step's relative vectors, computed member by
               member in parallel, are faster than one leader computing all of them
    summaries  each leader's member's summaries of the fused rows, to every leader
    fuse       each leader, for the rows it owns: every member's r_i, r = sum_i w_i r_i, search
    merge      each owner's tokens (and neglected mass) summed onto the main leader
    tokens     the chosen tokens reach everyone who decodes, as in the plain step

A row's fusion reads the same numbers through the same operations wherever it runs, so the
tokens are the plain step's (tests/test_distributed.py runs both).
"""
from __future__ import annotations

import torch

from .search import search_from
from .summary import aggregate, relative_from, summarize


def shares_rows(mode: str, split_fusion: bool, leaders: int) -> bool:
    """Whether a run shares its fused rows out (then every leader loads every member's transfer):
    fast mode, the knob on, several leaders."""
    return mode == "fast" and split_fusion and leaders > 1


def splits(fuser, exchange, sampler, include) -> bool:
    """Whether this step shares its rows out: a run that does (shares_rows), and greedy rows (a
    sampler wants every row's final logits on the main leader)."""
    return (shares_rows(fuser.mode, fuser.fast.split_fusion, getattr(exchange, "leaders", 1))
            and sampler is None and include is None)


NOT_FUSED, PLAIN = -1, -2   # owner codes: a row not fused; a row fused by the plain step


def owners(fuse: torch.Tensor, leaders: int) -> tuple[torch.Tensor, bool]:
    """(B,) int64: each fused row's owner (a leader's position, in member order), NOT_FUSED for
    the other rows; PLAIN for every fused row when there are fewer of them than leaders; and
    whether any row has an owner (known here, read nowhere else on this process).
    A row's home is fixed by its place in the batch, so a sequence is fused where its previous
    steps were and finds their rows of P in that leader's row stores; then rows move from the
    leaders holding more than their share to those holding less. When the rows do not divide
    evenly the main leader, whose forward pass is usually the longest, takes the fewest."""
    owner = torch.full(fuse.shape, NOT_FUSED, dtype=torch.long)
    rows = fuse.nonzero(as_tuple=True)[0].tolist()
    if len(rows) < leaders:
        owner[rows] = PLAIN
        return owner.to(fuse.device), False
    share = [len(rows) // leaders + (p >= leaders - len(rows) % leaders) for p in range(leaders)]
    mine = [[] for _ in range(leaders)]
    for row in rows:
        mine[leaders - 1 - row % leaders].append(row)
    spare = [row for p in range(leaders) for row in mine[p][share[p]:]]
    for p in range(leaders):
        del mine[p][share[p]:]
        while len(mine[p]) < share[p]:
            mine[p].append(spare.pop())
    for p, taken in enumerate(mine):
        owner[taken] = p
    return owner.to(fuse.device), True


def share_summaries(fuser, logits: dict, owner: torch.Tensor, exchange) -> tuple:
    """The fused rows and every member's summaries of them, on every leader (the step's begin)."""
    rows = (owner >= 0).nonzero(as_tuple=True)[0]
    ms = fuser.fast.max_support
    with fuser.timed("relative"):
        mine = {i: summarize(l[rows], fuser.transfers[i], ms, search=i == 0) for i, l in logits.items()}
    with fuser.timed("gather"):
        return rows, exchange.share_summaries(mine, fuser.transfers, ms)


def fuse_owned(fuser, rows: torch.Tensor, summaries: list, owner: torch.Tensor, position: int,
               batch: int) -> torch.Tensor:
    """The rows this leader owns, fused from every member's summaries (the step's compute): a
    (B, 1 + members) tensor of (token, neglected mass per member), zero elsewhere."""
    ours = (owner[rows] == position).nonzero(as_tuple=True)[0]
    fuser.rows_fused_here += len(ours)
    merged = torch.zeros(batch, 1 + len(summaries), device=rows.device)
    if len(ours):
        with fuser.timed("relative"):
            parts = [relative_from(s.select(ours), t, fuser.fast.mass_epsilon)
                     for s, t in zip(summaries, fuser.transfers)]
            r = aggregate([p[0] for p in parts], fuser.weights)
        with fuser.timed("search"):
            chosen, _ = search_from(summaries[0].select(ours), r, fuser.transfers[0], fuser.search,
                                    fuser.fast.mass_epsilon)
        # tokens travel as fp32 (exact below 2**24, summary.py); one owner per row, so the sum
        # over the leaders adds only zeros to each value
        merged[rows[ours]] = torch.cat([chosen.float()[:, None], torch.stack([p[1] for p in parts], 1)], 1)
    return merged


def merge_owned(fuser, merged: torch.Tensor, rows: torch.Tensor, main: torch.Tensor | None, exchange):
    """Every owner's rows summed onto the main leader (the step's finish). Returns there (B,)
    tokens (the main model's own argmax where not fused) and the stats; None elsewhere."""
    with fuser.timed("gather"):
        merged = exchange.merge_rows(merged)
    if main is None:
        return None
    tokens = main.float().argmax(-1)
    tokens[rows] = merged[rows, 0].long()
    return tokens, {"neglected_mass": [merged[rows, 1 + i] for i in range(merged.shape[1] - 1)]}
