"""UniTE, "Determine-Then-Ensemble" (Yao et al., ICLR 2025; code starrYYxuan/UniTE, unite2.py):
for each fused row, the union of every member's top-k tokens, each member's probabilities over
that union, their weighted average, the argmax (docs/methods.md states it in full).

  top-k     member i's k largest logits (torch.topk); each id -> its union entry (union.py)
  union     the entries in order: the main member's top-k by rank, then each assist's, a repeated
            entry kept at its first place (special tokens other than EOS are no entry)
  scores    member i scores an entry at the logit of the id it has for it: its own top-k id where
            the entry is one of those, else the id spelling the same bytes, else the first token
            of its encoding of them. An id already claimed (its own top-k first, then the union
            in order) scores -inf, as does an entry it has no id for
  average   p = sum_i w_i softmax_i(scores over the union); the argmax, the first on ties
  token     the main member's id for that entry (as scored above): what it appends

Across ranks (protocol.py): each leader's top-k entries go to every leader (F x k int64), then
each member's probabilities over the union go to the main leader (F x members*k fp32).
"""
from __future__ import annotations

import torch

from .gate import Gate
from .protocol import Pending
from .tokenspace import TokenSpaceFuser


def union_rows(tops: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
    """(F, M) union entries per row from every member's (F, k) top-k entries (and `extra`, the
    entries a caller asks for: a choice's option letters): a repeated entry, and every -1, is -1."""
    e = torch.cat(tops + ([extra] if extra is not None else []), 1)
    m = e.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=e.device).tril(-1)   # [j, j']: j' < j
    repeated = ((e[:, :, None] == e[:, None, :]) & earlier).any(-1)
    return torch.where(repeated | (e < 0), -1, e)


def member_scores(entries: torch.Tensor, own_ids: torch.Tensor, own_entries: torch.Tensor,
                  ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Member i's scores over the rows' union (module doc) and the id it has for each entry.
    `ids`: its id for each entry from the union maps; `own_ids`/`own_entries`: its top-k."""
    k, m = own_ids.shape[1], entries.shape[1]
    match = (entries[:, :, None] == own_entries[:, None, :]) & (entries[:, :, None] >= 0)
    own = match.any(-1)
    first = match.to(torch.uint8).argmax(-1)                       # the first own rank that matches
    ids = torch.where(own, own_ids.gather(1, first), ids)
    rank = torch.where(own, first, k + torch.arange(m, device=entries.device))
    claimed = ((ids[:, :, None] == ids[:, None, :]) & (rank[:, None, :] < rank[:, :, None])).any(-1)
    ok = (entries >= 0) & (ids >= 0) & ~claimed
    scores = torch.where(ok, logits.float().gather(1, ids.clamp_min(0)), float("-inf"))
    return scores, ids


class UniTEFuser(TokenSpaceFuser):
    method = "unite"

    def __init__(self, maps, weights: list[float], k: int = 10, gate: Gate = Gate(), mode: str = "fast",
                 eos_token_id: int | None = None):
        super().__init__(maps, weights, gate, mode, eos_token_id)
        self.k = k

    def top(self, i: int, logits: torch.Tensor) -> torch.Tensor:
        """Member i's top-k ids (F, k), -1 padded where its vocabulary is smaller than k."""
        ids = logits.float().topk(min(self.k, logits.shape[1]), -1).indices
        return torch.cat([ids, ids.new_full((len(ids), self.k - ids.shape[1]), -1)], 1)

    def share(self, p: Pending) -> torch.Tensor:
        rows = p.fuse.nonzero(as_tuple=True)[0]
        with self.timed("relative"):
            own = {i: self.top(i, l[rows]) for i, l in p.logits.items()}
            p.local["own"] = own
            mine = {i: self.maps.entries(i, ids) for i, ids in own.items()}
        with self.timed("gather"):
            tops = p.exchange.share_all(mine)
        extra = None
        if p.include is not None:
            extra = self.maps.entries(0, p.include.to(rows.device))[None].expand(len(rows), -1)
        return union_rows([t.to(rows.device) for t in tops], extra)

    def member_part(self, i: int, logits: torch.Tensor, p: Pending) -> tuple:
        entries = p.shared.to(logits.device)
        own_ids = p.local["own"][i]
        scores, ids = member_scores(entries, own_ids, self.maps.entries(i, own_ids),
                                    self.maps.member_ids(i, entries), logits)
        if i == 0:
            p.local["ids0"] = torch.where(entries >= 0, ids, -1)
        return torch.softmax(scores, -1).nan_to_num(0.0), None

    def combine(self, parts: list, p: Pending):
        device = p.shared.device
        probs = sum(w * part[0].to(device) for w, part in zip(self.weights, parts))
        chosen = probs.argmax(-1)                                   # the first of equal maxima
        ids0 = p.local["ids0"]
        entry = p.shared.gather(1, chosen[:, None]).squeeze(1)
        exact = self.maps.exact[0][entry.clamp_min(0)] & (entry >= 0)
        self.partial_rows = self.partial_rows + (~exact).sum()
        return ids0.gather(1, chosen[:, None]).squeeze(1), (ids0, probs), {}
