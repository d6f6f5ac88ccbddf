"""Windows of byte-level BPE tokenizers split and encoded in Python: an assist's resync without
the tokenizers library's per-call pipeline (most of a window's cost: ~5 us for ten characters).

A byte-level BPE tokenizer (GPT-2, SmolLM2, Llama-3, Qwen2) encodes a text so: added tokens are
cut out, a regex splits the rest into pre-tokens, each pre-token's UTF-8 bytes are mapped to
printable characters, and the BPE model encodes each mapped pre-token on its own. For a window
with no added token, `PlainWindows` does the same:

* `pieces`: the pre-tokenizer's own pattern, run by Python's `regex`. Both engines backtrack,
  leftmost-first, with the same alternation order and lookarounds; what a match depends on is,
  per character, whether it is in each class the pattern names (\\p{L}, \\p{N}, \\s...). So each
  character is admitted once (`known`) after both engines agree on it for every class in the
  pattern (`_admit`: the library's answer comes from a Split pre-tokenizer on that class). Where
  the pattern has a case-insensitive part, a character with a case-fold relation to ASCII (the
  Kelvin sign, the long s) is not admitted: that part might see it as a letter it names. Nor,
  under an NFC/NFKC normalizer, is anything outside ASCII (left unchanged only there). A window
  in which an added token occurs is left to the library (which cuts those out first).
* `tokens`: each distinct pre-token is encoded once by the BPE model itself (`model.tokenize`)
  and kept: ids, and character offsets as the library gives them (a token that starts or ends
  inside a character's bytes spans that whole character).

A window with a character not admitted (or an added token) gives None: the caller encodes it
through the library.
`plain_windows` also checks once that both ways agree on probes (ids, offsets, pre-token
indices); tests/test_tokens.py checks every windowed resync against the full encode.
"""
from __future__ import annotations

from ..deepen.vocab import byte_level_decoder

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CLASSES = r"\\[pP]\{[^}]*\}|\\[pP][A-Za-z]|\\[sSdDwWhHvV]|\[:\^?[a-z]+:\]"   # a pattern's character classes
NOT_PER_CHARACTER = ("\\X", "\\R", "\\b", "\\B", "\\G")   # what a character's classes alone do not decide
PROBES = ["I'm sure you'll've done it, they'RE 's", "a1b22c333 4444 !!?? ...\n\n\n  \n q", "   ", "\r\n\r\n",
          "Answer: 3 + 4 = 7.\nSo the total is $12.50 (tax incl.)", "\t\t x", "Ünïcödé  wörds\u00a0and 数字١٢٣ ½",
          "naïve café — «quotes» 🤖👍🏽 x\u3000y", "ǅ Ǆ ǆ ß ﬁ ſ K", "\x0b\x0c\x1c\x1d\x85 z", "a <b> x<y <| |>"]
MEMO_LIMIT = 1 << 17   # pre-tokens kept; the memo starts over past this


def _byte_chars() -> dict:
    """The byte-level alphabet (GPT-2's, deepen/vocab.py) as a str.translate table from latin-1
    characters (one per byte) to the characters that stand for those bytes."""
    return {b: ch for ch, b in byte_level_decoder().items()}


BYTE_CHARS = _byte_chars()


class PlainWindows:
    """Splits and encodes windows as the window tokenizer would (module doc), or says None."""

    def __init__(self, pattern: str, model, added: list[str], ascii_only: bool):
        import regex
        self.regex = regex
        compiled = regex.compile(pattern)
        if compiled.groups:   # findall would give the groups, not the matches
            raise ValueError("a pattern with capturing groups")
        self.split = compiled.findall
        self.classes = sorted(set(regex.findall(CLASSES, pattern)))
        self.caseless = "(?i" in pattern
        self.probes = None   # per class: (Python's pattern, the library's Split that removes it)
        self.model = model
        self.ascii_only = ascii_only
        self.first = {a[0] for a in added if a}   # a window with one of these may hold an added token
        self.added = regex.compile("|".join(regex.escape(a) for a in sorted(added, key=len, reverse=True) if a)).search
        self.known: set[str] = set()      # characters admitted
        self.refused: set[str] = set()    # characters not admitted
        self.memo: dict[str, tuple] = {}  # pre-token -> (ids, starts, ends)
        self.used = 0                     # windows split here

    def pieces(self, text: str) -> list[str] | None:
        """The window's pre-tokens, or None where a character is not admitted."""
        if not self.known.issuperset(text) and not self._admit(text):
            return None
        if not self.first.isdisjoint(text) and self.added(text):   # the library cuts added tokens out first
            return None
        pieces = self.split(text)
        if sum(map(len, pieces)) != len(text):   # matches that do not tile the window
            return None
        self.used += 1
        return pieces

    def encode(self, text: str) -> tuple[list, list, list] | None:
        """(ids, offsets, pre-token index per token) of a whole window, as the library's
        Encoding gives them; None where this cannot say."""
        pieces = self.pieces(text)
        if pieces is None:
            return None
        ids, offsets, words, at = [], [], [], 0
        for w, piece in enumerate(pieces):
            pid, starts, ends = self.memo.get(piece) or self.tokenize(piece)
            ids += pid
            offsets += [(a + at, b + at) for a, b in zip(starts, ends)]
            words += [w] * len(pid)
            at += len(piece)
        return ids, offsets, words

    def _admit(self, text: str) -> bool:
        new = set(text) - self.known
        if new & self.refused:
            return False
        for ch in new:
            (self.known if self._agrees(ch) else self.refused).add(ch)
        return not (new & self.refused)

    def _agrees(self, ch: str) -> bool:
        """Both engines put `ch` in the same classes of the pattern, and nothing else about it can
        differ (module doc)."""
        if self.ascii_only and not ch.isascii():
            return False
        if self.caseless and not ch.isascii() and any(c.isascii() for c in ch.lower() + ch.upper() + ch.casefold()):
            return False
        if self.probes is None:
            from tokenizers import Regex, pre_tokenizers
            self.probes = [(self.regex.compile(f"[{c}]" if c.startswith("[:") else c),
                            pre_tokenizers.Split(Regex(f"[{c}]" if c.startswith("[:") else c), behavior="removed"))
                           for c in self.classes]
        return all((python.fullmatch(ch) is not None) == (library.pre_tokenize_str(ch) == [])
                   for python, library in self.probes)

    def tokenize(self, piece: str) -> tuple:
        """A pre-token's (ids, starts, ends), offsets in characters from its start, from the
        BPE model (whose offsets count the mapped pre-token's UTF-8 bytes), kept in `memo`."""
        raw = piece.encode()
        mapped = raw.decode("latin-1").translate(BYTE_CHARS)
        char_of = [i for i, ch in enumerate(piece) for _ in range(len(ch.encode()))]   # byte -> character
        byte_at, n = {}, 0   # UTF-8 offset in the mapped pre-token -> byte of the original
        for j, ch in enumerate(mapped):
            byte_at[n] = j
            n += len(ch.encode())
        byte_at[n] = len(raw)
        tokens = self.model.tokenize(mapped)
        spans = [(byte_at[a], byte_at[b]) for a, b in (t.offsets for t in tokens)]
        if len(self.memo) >= MEMO_LIMIT:
            self.memo.clear()
        # tuples: each entry in as few objects (and cache lines) as can be
        hit = self.memo[piece] = (tuple(t.id for t in tokens), tuple(char_of[a] for a, _ in spans),
                                  tuple(char_of[b - 1] + 1 for _, b in spans))
        return hit


def plain_windows(backend, window, normalizer: dict | None, pre: dict | None, added: list[str] | None,
                  probes: list[str]) -> PlainWindows | None:
    """A PlainWindows for this tokenizer (its parts as JSON, as `windows.analyse` read them), or
    None where the module doc's conditions do not hold or a probe comes out otherwise than
    through `window`."""
    if type(backend.model).__name__ != "BPE" or added is None:
        return None
    parts = (normalizer or {}).get("normalizers", []) if (normalizer or {}).get("type") == "Sequence" else \
        [normalizer] if normalizer else []
    if any(n.get("type") not in ("NFC", "NFKC") for n in parts):
        return None
    pattern = _pattern(pre)
    if pattern is None or any(x in pattern for x in NOT_PER_CHARACTER):
        return None
    try:
        plain = PlainWindows(pattern, backend.model, added, ascii_only=bool(parts))
        for text in probes + PROBES:
            want = window.encode(text, add_special_tokens=False)
            got = plain.encode(text)
            if got is not None and got != (want.ids, want.offsets, want.word_ids):
                return None
    except Exception:   # a pattern Python's regex reads otherwise, a model that cannot tokenize
        return None
    plain.used = 0
    return plain


def _pattern(pre: dict | None) -> str | None:
    """The pre-token regex of ByteLevel(use_regex) alone, or of Split(regex, Isolated) before a
    ByteLevel that does not split; None for anything else."""
    if pre is None:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(p["type"] == "ByteLevel" and p.get("add_prefix_space") for p in steps):
        return None
    if len(steps) == 1 and steps[0]["type"] == "ByteLevel" and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if len(steps) == 2 and steps[0]["type"] == "Split" and steps[1]["type"] == "ByteLevel" \
            and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"] \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return steps[0]["pattern"]["Regex"]
    return None
