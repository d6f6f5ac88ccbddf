"""Stop strings: where a completion ends, and the stop strings people type on a shell."""
from __future__ import annotations

import re

# the escapes a shell user means when typing --stop '\n': backslash + one of these, or \xHH,
# \uHHHH, \UHHHHHHHH. Every other character, non-ASCII included, stands for itself.
_ESCAPE = re.compile(r"\\(?:([\\'\"abfnrtv0])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
_SIMPLE = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
           "t": "\t", "v": "\v", "0": "\0"}


def parse_stop(text: str) -> str:
    """A stop string from the command line: backslash escapes (`\\n`, `\\t`, `\\u3002`) become
    the characters they name; any other character (`。`, `é`, an emoji) is kept as it is."""
    def replace(m: re.Match) -> str:
        simple, *codes = m.groups()
        if simple is not None:
            return _SIMPLE[simple]
        return chr(int(next(c for c in codes if c is not None), 16))
    return _ESCAPE.sub(replace, text)


def completes_stop(text: str, stop: tuple[str, ...], changed: int = 0) -> str | None:
    """The text up to the first stop string it contains, or None if it contains none. `changed`:
    the text before this index was checked before (it held no stop string), so only stop strings
    ending after it are looked for."""
    if not stop:
        return None
    start = max(0, changed - max(map(len, stop)) + 1)
    cut = [i for i in (text.find(s, start) for s in stop if s) if i >= 0]
    return text[:min(cut)] if cut else None


def stop_rule(rows: list, main_logits, detokenizer):
    """The fusion rule for stop strings: a bool tensor, True for rows where the main model's own
    token would complete one of the row's stop strings (then the row is not fused), or None when
    no row has a stop string (then nothing is read back from the device). Only the end of each
    row's text is decoded (engine/detokenize.py)."""
    import torch
    stopping = [i for i, r in enumerate(rows) if r.request.stop]
    if not stopping:
        return None
    own = main_logits.argmax(-1).tolist()
    picked = [rows[i] for i in stopping]
    peeks = detokenizer.peek([r.decoded for r in picked], [r.ids for r in picked], [own[i] for i in stopping])
    skip = [False] * len(rows)
    for i, r, (text, changed) in zip(stopping, picked, peeks):
        skip[i] = completes_stop(text, r.request.stop, changed) is not None
    return torch.tensor(skip, dtype=torch.bool, device=main_logits.device)
