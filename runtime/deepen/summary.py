"""A member's next-token distribution, as much of it as fast mode reads: a few kilobytes per row.

Fast mode never reads a member's whole distribution after the first pass over it. The relative
vector needs its top tokens (ids and probabilities, up to `max_support`) and its probability mass
per embedding cluster (the tail); the main member's search needs its top logits (ids, logits
and probabilities) and its log-normaliser. `summarize` takes exactly those from the logits;
`relative_from` and search.py's `search_from` compute from them what they computed from the
logits before, with the same operations, so a row fused from its summary is the row fused from
its logits, to the bit.

That makes a row's fusion movable: under the launcher (`split_fusion`) each leader sends the
summaries of its member's fused rows (about 3 KB per row, 6 KB for the main member, where a
relative vector is 4 x |A| bytes) and every leader fuses a share of the rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_IDS = 2 ** 24   # token ids travel as fp32, which holds every integer below this exactly


@dataclass
class Summary:
    ids: torch.Tensor              # (F, k) int64: the member's top tokens by probability
    probs: torch.Tensor            # (F, k) fp32: their probabilities
    mass: torch.Tensor             # (F, C) fp32: probability per embedding cluster, whole vocabulary
    z_ids: torch.Tensor | None = None    # main member: top tokens by logit (F, k)
    z: torch.Tensor | None = None        # their logits
    z_probs: torch.Tensor | None = None  # their probabilities
    lse: torch.Tensor | None = None      # (F, 1) log-normaliser of the logits

    @property
    def for_search(self) -> bool:
        return self.z is not None

    def select(self, rows: torch.Tensor) -> "Summary":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Summary(*(pick(getattr(self, f)) for f in FIELDS))

    def pack(self) -> torch.Tensor:
        """One (F, width) fp32 tensor (the wire form): ids, probs, mass[, z_ids, z, z_probs, lse]."""
        parts = [self.ids.float(), self.probs, self.mass]
        if self.for_search:
            parts += [self.z_ids.float(), self.z, self.z_probs, self.lse]
        return torch.cat(parts, 1)

    @staticmethod
    def unpack(t: torch.Tensor, k: int, clusters: int, for_search: bool) -> "Summary":
        ids, probs, mass = t[:, :k].long(), t[:, k:2 * k], t[:, 2 * k:2 * k + clusters]
        if not for_search:
            return Summary(ids, probs, mass)
        o = 2 * k + clusters
        return Summary(ids, probs, mass, t[:, o:o + k].long(), t[:, o + k:o + 2 * k],
                       t[:, o + 2 * k:o + 3 * k], t[:, o + 3 * k:o + 3 * k + 1])

    @staticmethod
    def width(k: int, clusters: int, for_search: bool) -> int:
        return 2 * k + clusters + (3 * k + 1 if for_search else 0)


FIELDS = ("ids", "probs", "mass", "z_ids", "z", "z_probs", "lse")


def support_size(max_support: int, transfer) -> int:
    return min(max_support, transfer.num_tokens)


def summarize(logits: torch.Tensor, transfer, max_support: int, relative: bool = True,
              search: bool = False) -> Summary:
    """What fast mode reads of (F, |V|) logits (module doc): for a relative vector and (`search`,
    the main member) for the search."""
    z0 = logits.float()
    probs = torch.softmax(z0, dim=-1)
    k0 = support_size(max_support, transfer)
    mass = probs.new_zeros(probs.shape[0], transfer.cluster_rows.shape[0]).index_add_(1, transfer.cluster_of, probs)
    top_probs, top_ids = probs.topk(k0, dim=-1) if relative else (None, None)
    if not search:
        return Summary(top_ids, top_probs, mass)
    top_z, z_ids = z0.topk(k0, dim=-1)
    lse = torch.logsumexp(z0, dim=-1, keepdim=True)
    return Summary(top_ids, top_probs, mass, z_ids, top_z, probs.gather(1, z_ids), lse)


def tail_of(mass: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, live: torch.Tensor,
            cluster_of: torch.Tensor) -> torch.Tensor:
    """(F, C): the probability outside each row's support (`ids` where `live`), per cluster."""
    taken = torch.where(live, probs, probs.new_zeros(()))
    return mass.clone().scatter_add_(1, cluster_of[ids], -taken).clamp_min_(0)


def relative_from(s: Summary, transfer, mass_epsilon: float):
    """r = p @ P over the smallest top-k holding 1 - mass_epsilon of p (at most max_support);
    the rest of p enters cluster by cluster, each cluster's mass times its mean row of P.
    Returns (r, neglected mass per row: what was not computed row by row)."""
    k0 = s.ids.shape[1]
    cum = s.probs.cumsum(-1)
    k = ((cum < 1 - mass_epsilon).sum(-1) + 1).clamp(max=k0)
    live = torch.arange(k0, device=s.probs.device)[None, :] < k[:, None]
    neglected = (1 - cum.gather(1, (k - 1)[:, None])).clamp_min(0).squeeze(1)
    uniq, inverse = torch.unique(s.ids[live], return_inverse=True)
    weights = s.probs.new_zeros(s.probs.shape[0], len(uniq))
    weights[live.nonzero(as_tuple=True)[0], inverse] = s.probs[live]
    tail = tail_of(s.mass, s.ids, s.probs, live, transfer.cluster_of)
    r = transfer.weighted(uniq, weights) + tail @ transfer.cluster_rows
    return r, neglected


def aggregate(relatives: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """r = sum_i w_i r_i."""
    out = torch.zeros_like(relatives[0])
    for w, r in zip(weights, relatives):
        out += w * r
    return out
