"""The paper's baselines (ALGORITHM.md section 7), besides "each member alone":

- MinED: map every assist token to the main-vocabulary token at the smallest edit distance (the
  same token where the bytes match), then average the members' distributions in the main
  vocabulary. `MinEDFuser` plugs into the engine like a `Fuser`.
- Voting (multiple choice, GSM8K) and MBR (QA) combine final answers; they are functions over
  per-question answers, run after the members' (and DEEPEN's) answers exist.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..deepen.protocol import LOCAL, StepResult, WholeStep
from ..deepen.vocab import byte_fallback_ids, ids_by_bytes, token_bytes
from ..jobs.progress import Progress


def _as_text(b: bytes) -> str:
    return b.decode("latin-1")  # one character per byte: edit distance over bytes


def min_edit_map(assist_bytes: list[bytes | None], main_bytes: list[bytes | None],
                 assist_eos: int | None, main_eos: int | None, size: int, progress: bool = False,
                 main_fallback: frozenset = frozenset()) -> torch.Tensor:
    """For each assist id (size of its logits), the main id it maps to, or -1 (special tokens,
    padding ids: their probability is dropped). Ties go to the lower (more frequent) main id. The
    chosen id is fed to the main model as it is: a byte-fallback piece (`main_fallback`) is used
    only for bytes no real piece spells."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein
    exact = ids_by_bytes(main_bytes, main_fallback)
    choices = {i: _as_text(b) for i, b in enumerate(main_bytes) if b and exact.get(b) == i}
    mapping = torch.full((size,), -1, dtype=torch.long)
    missing = []
    for i, b in enumerate(assist_bytes[:size]):
        if not b:
            continue
        if b in exact:
            mapping[i] = exact[b]
        else:
            missing.append(i)
    bar = Progress(len(missing), "minED map", "tokens") if progress else None
    for i in missing:
        _, _, main_id = process.extractOne(_as_text(assist_bytes[i]), choices, scorer=Levenshtein.distance)
        mapping[i] = main_id
        if bar:
            bar.update()
    if bar:
        bar.close()
    if assist_eos is not None and main_eos is not None and assist_eos < size:
        mapping[assist_eos] = main_eos
    return mapping


def cached_min_edit_map(main, assist, size: int, home: Path, progress: bool = True) -> torch.Tensor:
    """min_edit_map, cached under $DEEPEN_HOME/mined by the two members' fingerprints."""
    key = hashlib.sha256(f"{main.fingerprint}:{assist.fingerprint}:{size}:v2".encode()).hexdigest()[:16]
    path = home / "mined" / f"{key}.safetensors"
    if path.exists():
        return load_file(path)["map"]
    mapping = min_edit_map(token_bytes(assist.tokenizer), token_bytes(main.tokenizer),
                           assist.eos_token_id, main.eos_token_id, size, progress,
                           frozenset(byte_fallback_ids(main.tokenizer)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"map": mapping}, tmp)
    tmp.replace(path)
    return mapping


class MinEDFuser(WholeStep):
    """Averages distributions in the main vocabulary through the minED maps (maps[0] is None:
    the main member maps to itself). Same `step` contract as `Fuser`."""

    def __init__(self, maps: list[torch.Tensor | None], weights: list[float]):
        self.maps = maps
        self.weights = weights
        self.seconds = {"relative": 0.0}

    def probs(self, member_logits: list[torch.Tensor]) -> torch.Tensor:
        main = member_logits[0].float()
        out = self.weights[0] * torch.softmax(main, dim=-1)
        for w, mapping, logits in zip(self.weights[1:], self.maps[1:], member_logits[1:]):
            p = torch.softmax(logits.float(), dim=-1).to(out.device)
            mapping = mapping.to(out.device)
            n = min(p.shape[1], mapping.shape[0])
            valid = mapping[:n] >= 0
            out.index_add_(1, mapping[:n][valid], w * p[:, :n][:, valid])
        return out

    def step(self, member_logits, skip=None, include=None, exchange=LOCAL, memo=None, batch=None,
             sampler=None) -> StepResult:
        """`Fuser.step`'s contract, in one process only (every member's logits here); a sampler
        draws from minED's combined distribution."""
        if exchange is not LOCAL:
            raise ValueError("minED runs in one process: it needs every member's full distribution")
        if isinstance(member_logits, dict):  # the engine's {member index: logits}
            member_logits = [member_logits[i] for i in sorted(member_logits)]
        fuse = torch.ones(member_logits[0].shape[0], dtype=torch.bool, device=member_logits[0].device) \
            if skip is None else ~skip
        log_p = self.probs(member_logits).clamp_min(1e-30).log()
        # a row whose main-model token completes a stop string keeps it, as in DEEPEN
        log_p[~fuse] = member_logits[0][~fuse].float()
        result = StepResult(log_p.argmax(-1), fuse, None, log_p, {},
                            None if include is None else log_p[:, include])
        if sampler is not None and sampler.needs_logits:
            result.tokens, result.logprobs = sampler(log_p, member_logits[0], result.tokens)
        return result


# ---- answer-level combiners --------------------------------------------------------------------

def vote(answers: list[str | None], tie_order: list[int]) -> str | None:
    """Majority over answers (None = no answer, never wins). A tie goes to the earliest voter in
    `tie_order` among the tied answers."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    tied = {a for a, c in counts.items() if c == top}
    for i in tie_order:
        if answers[i] in tied:
            return answers[i]
    return None


def mbr(candidates: list[str], similarity, tie_order: list[int]) -> str:
    """The candidate with the highest total similarity to the others; ties by `tie_order`."""
    totals = [sum(similarity(c, o) for j, o in enumerate(candidates) if j != i)
              for i, c in enumerate(candidates)]
    best = max(totals)
    for i in tie_order:
        if totals[i] == best:
            return candidates[i]
    return candidates[0]
