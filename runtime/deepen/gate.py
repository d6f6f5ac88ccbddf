"""GaC's gate, for every method (docs/methods.md): a row is fused only where the gate member (the
main member unless the config names another, GaC's `priority: primary`) is unsure, its top
probability at most `threshold`; elsewhere the main member's own token is taken. threshold 1
fuses every row (p <= 1 always: GaC's default, no gate); 0 fuses none."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gate:
    threshold: float = 1.0
    member: int = 0            # index in main-first member order

    @property
    def open(self) -> bool:
        """Every row is fused (nothing to compute)."""
        return self.threshold >= 1.0


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B,) the largest softmax probability of each row, in fp32."""
    z = logits.float()
    return torch.exp(z.amax(-1) - torch.logsumexp(z, -1))


def gated_rows(gate: Gate, logits: dict, exchange, batch: int) -> torch.Tensor | None:
    """(B,) True where the gate member is sure (top probability > threshold: no fusion), on the
    process that holds the main member's logits; None where the gate is open or elsewhere. A gate
    member other than the main member sends its flags to the main leader (B int64, the same
    gather as the agreement keys)."""
    if gate.open:
        return None
    if gate.member == 0:
        return top_probability(logits[0]) > gate.threshold if 0 in logits else None
    if not exchange.leads:
        return None
    flags = {i: (top_probability(l) > gate.threshold).long() if i == gate.member
             else torch.zeros(batch, dtype=torch.long, device=l.device) for i, l in logits.items()}
    keys = exchange.collect_keys(flags, batch)
    if keys is None or 0 not in logits:
        return None
    return keys[gate.member].to(logits[0].device).bool()
