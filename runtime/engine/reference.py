"""The authors' decoding loop, kept as the reference every faster path is checked against.

Every step, every member runs a full forward pass with no KV cache: the main member on its prompt's
tokens followed by the ids it emitted (as the authors' loop does), every assist on a fresh
tokenisation of its own template + the committed text. Rows are independent; they advance in lock-step
only so that one step's fusion is a single batched call (batching never changes a row's result).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lane import without_padding
from .stops import completes_stop


@dataclass
class Row:
    prompt: str
    ids: list[int] = field(default_factory=list)  # main-model tokens emitted so far
    text: str = ""                                 # the committed text (main's decode of ids)
    finish: str | None = None                      # "eos" | "stop" | "length"


def last_logits(member, text: str, own: list[int] | None = None) -> torch.Tensor:
    """Next-token logits after `text` in the member's own tokenisation; for the main member,
    `own` are its chosen ids, appended to the prompt's tokens as they are (not re-encoded)."""
    ids = member.tokenizer(text, return_tensors="pt").input_ids
    if own:
        ids = torch.cat([ids, torch.tensor([own])], dim=1)
    ids = ids.to(getattr(member, "device", "cpu"))
    with torch.no_grad():
        return without_padding(member.model(ids).logits[0, -1].float(), len(member.tokenizer))


def reference_decode(members, fuser, prompts: list[str], max_new_tokens: int,
                     stop: tuple[str, ...] = (), observe=None) -> list[Row]:
    """Greedy DEEPEN decoding. `observe(step, rows, member_logits, result)` sees every step."""
    main = members[0]
    rows = [Row(p) for p in prompts]
    for step in range(max_new_tokens):
        active = [r for r in rows if r.finish is None]
        if not active:
            break
        logits = [torch.stack([last_logits(main, main.render(r.prompt), r.ids) for r in active])]
        logits += [torch.stack([last_logits(m, m.render(r.prompt) + r.text) for r in active])
                   for m in members[1:]]
        # the stop rule: no fusion where the main model's own token completes a stop string
        own = logits[0].argmax(-1).tolist()
        skip = torch.tensor([completes_stop(main.tokenizer.decode(r.ids + [t]), stop) is not None
                             for r, t in zip(active, own)], device=logits[0].device)
        result = fuser.step(logits, skip)
        if observe is not None:
            observe(step, active, logits, result)
        for r, token in zip(active, result.tokens.tolist()):
            if token == main.eos_token_id:
                r.finish = "eos"
                continue
            r.ids.append(token)
            r.text = main.tokenizer.decode(r.ids)
            cut = completes_stop(r.text, stop)
            if cut is not None:
                r.text, r.finish = cut, "stop"
            elif len(r.ids) >= max_new_tokens:
                r.finish = "length"
    return rows
