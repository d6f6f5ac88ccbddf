"""An assist's token ids for a growing text, re-encoding only a window at its end.

An assist keeps, per row, the ids of its own encoding of `template(prompt) + committed text`. When
the text changes from character c on (usually: a few characters appended), re-encoding the whole
row costs time in proportion to the row. `Retokenizer` re-encodes only `text[b:]`, from a token
boundary b before c, keeps the ids before b, and gives exactly the ids of a full encode, or falls
back to one (counted) where it cannot show that. docs/design.md ("Assists follow the committed
text") states why the window is exact; in short, for the start b of old token k:

* Nothing before b can change. The tokenizer's steps each look only a bounded way ahead: added
  tokens (matched first) at most their longest length, so b is `margin` characters before c,
  unless no added token can start between `margin` characters before b and c (none of their first
  characters is there: then none can cross b or be changed by what follows c), then 1;
  normalizers character by character (Replace of one character; the NFC/NFKC family before an
  ASCII character, which never composes with what precedes it); a regex pre-tokenizer's split
  before a piece is decided within the next piece, so in "word" mode b starts a pre-token and one
  whole pre-token lies between b and the margin.
* Nothing after b depends on what is before it. In "word" mode b is a pre-token boundary and the
  model (BPE, WordPiece, Unigram...) runs per pre-token. In "segment" mode (BPE over whole segments
  with no splitting pre-tokenizer: Gemma, SentencePiece BPE) b may fall inside a segment: BPE
  merges pairs by rank, lowest first, and whether a merge ever crosses b depends only on the two
  tokens next to b (the evolution of each token's span is that of BPE on its own text). The old
  encoding had no merge across b; the window's first token equals the old token at b, so the pair
  at b is the old pair and the new encoding has no merge across b either.
* Position effects are removed from the window's tokenizer: no special tokens, no prefix space or
  `Prepend` (they belong to the start of the whole text).

The window's first pre-token (word mode) or first token (segment mode) must come out as before,
or the row falls back to the full encode. Anything not recognised (another normalizer, added
tokens that strip whitespace, a post-processor that appends tokens, BPE dropout) uses the full
encode every time; `Policy.reason` says why.
"""
from __future__ import annotations

import os

from .windows import Policy, policy_for


class Track:
    """One row's tokens: ids, each token's [start, end) in the row's string (-1 for special tokens
    the template added) and its pre-token (word) index. Edited in place, at its end only.
    `heads`: the first tokens of its last two pre-tokens, where a window split in Python left
    them known (else None): the window for a change in the last pre-token starts there."""
    __slots__ = ("ids", "starts", "ends", "words", "heads")

    def __init__(self, encoding=None):
        self.heads: tuple[int, int] | None = None
        self.ids: list[int] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.words: list[int] = []
        if encoding is not None:   # a full encode: the template's special tokens are no boundaries
            self.extend(encoding.ids, encoding.offsets, encoding.word_ids, 0, 0)
            for i, (special, w) in enumerate(zip(encoding.special_tokens_mask, encoding.word_ids)):
                if special and w is None and self.starts[i] == self.ends[i] == 0:
                    self.starts[i] = self.ends[i] = -1

    def extend(self, ids: list[int], offsets: list, words: list, shift: int, word_shift: int):
        self.ids.extend(ids)
        self.starts.extend([a + shift for a, _ in offsets])
        self.ends.extend([b + shift for _, b in offsets])
        self.words.extend([-1 if w is None else w + word_shift for w in words])


class Row:
    """A row's string, prefix + text, read in pieces without building it."""
    __slots__ = ("prefix", "text")

    def __init__(self, prefix: str, text: str):
        self.prefix, self.text = prefix, text

    def tail(self, j: int) -> str:
        n = len(self.prefix)
        return self.text[j - n:] if j >= n else self.prefix[j:] + self.text

    def slice(self, a: int, b: int) -> str:
        """The string's characters [max(a, 0), b)."""
        n, a = len(self.prefix), max(a, 0)
        if a >= n:
            return self.text[a - n:b - n]
        return self.prefix[a:b] + (self.text[:b - n] if b > n else "")

    def char(self, j: int) -> str:
        n = len(self.prefix)
        return self.text[j - n] if j >= n else self.prefix[j]


class Retokenizer:
    """Brings rows' Tracks up to date with changed text (module doc). `windows` and `fallbacks`
    count the rows synced each way (`split_in_python`: windows that never reached the tokenizers
    library); `refusals` counts windows refused, by reason."""

    WALK = 256   # tokens a window may reach back before the row falls back

    def __init__(self, tokenizer, windows: bool = True):
        self.tokenizer = tokenizer
        self.policy = policy_for(tokenizer) if windows else Policy(None, reason="windows off")
        self.windows = self.fallbacks = 0
        self.split_in_python = 0   # of the windows, those split and encoded in Python (plainwindows.py)
        self.refusals: dict[str, int] = {}
        # windows are short: a batch of them takes less time on this thread than waking the
        # tokenizers' thread pool does (one by one: 15% less time per window on 2 cores); an
        # explicit TOKENIZERS_PARALLELISM=true encodes them in the pool
        self.pooled = os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("1", "true", "t", "on", "yes", "y")

    def encode(self, strings: list[str]) -> list[Track]:
        """Full encodes (with the template's special tokens)."""
        return [Track(e) for e in self.policy.full.encode_batch(strings)]

    def window_start(self, track: Track, c: int, row: Row) -> tuple[int, int] | None:
        """(k, k2): re-encode from token k; in word mode k2 is the next pre-token's first token
        (tokens k..k2-1 must come out as before). None where no window is safe. The start is
        searched 1 character before c, and `margin` before it where an added token could start."""
        p = self.policy
        if p.first is not None:
            heads = track.heads   # a change in the last pre-token: the window starts at the one before
            at = heads if heads is not None and c > track.starts[heads[1]] else self._start(track, c - 1, row)
            if at is None:
                return None
            near = row.slice(track.starts[at[0]] - p.margin, c)
            if (p.first not in near) if len(p.first) == 1 else not any(ch in near for ch in p.first):
                return at
        return self._start(track, c - p.margin, row)

    def _start(self, track: Track, limit: int, row: Row) -> tuple[int, int] | None:
        starts, ends, words = track.starts, track.ends, track.words
        k = len(starts) - 1
        floor = max(1, k - self.WALK)
        while k >= floor and starts[k] > limit:
            k -= 1
        segment, ascii_start, found = self.policy.mode == "segment", self.policy.ascii_start, None
        for i in range(k, floor - 1, -1):
            # a clean start: token i begins a character of its own, after a token that ends before it
            a = starts[i]
            if a < 0 or ends[i - 1] > a or (ascii_start and row.char(a) >= "\x80"):
                continue
            if segment:
                return i, i
            if words[i] != words[i - 1]:
                if found is not None:
                    return i, found
                found = i
        return None

    def sync(self, tracks: list[Track], rows: list[Row], changed: list[int]) -> list[int]:
        """Re-encode each row whose string changed from character `changed[i]` on. Returns each
        row's number of leading ids that did not change (the KV cache keeps those). A refused
        short window is tried once more from `margin` characters back, then the row is encoded
        whole. Only with a window policy: without one a lane re-encodes whole rows itself."""
        if self.policy.mode is None:
            raise RuntimeError(f"no windows for this tokenizer: {self.policy.reason}")
        keep, plain, whole, plans, refused = [0] * len(tracks), self.policy.plain, [], [], []
        firsts = []   # each row's window start
        for i, (track, row, c) in enumerate(zip(tracks, rows, changed)):
            at = self.window_start(track, c, row)
            firsts.append(at)
            if at is None:
                whole.append(i)
                continue
            kept = self._splice_pieces(track, *at, row.tail(track.starts[at[0]])) if plain is not None else None
            if kept is None:   # through the tokenizers library
                plans.append((i, at))
            elif kept < 0:
                refused.append(i)
            else:
                keep[i] = kept
                self.windows += 1
                self.split_in_python += 1
        self._refuse("no safe window start", len(whole))
        refused += self._windows(tracks, rows, plans, keep)
        if refused and self.policy.first is not None:   # short windows refused: once more from the margin
            again = [(i, self._start(tracks[i], changed[i] - self.policy.margin, rows[i])) for i in refused]
            whole += [i for i, at in again if at is None or at == firsts[i]]
            whole += self._windows(tracks, rows, [(i, at) for i, at in again if at is not None and at != firsts[i]], keep)
        else:
            whole += refused
        if whole:
            for i, enc in zip(whole, self.policy.full.encode_batch([rows[i].tail(0) for i in whole])):
                fresh, track = Track(enc), tracks[i]
                keep[i], track.heads = _common(track.ids, fresh.ids, 0), None
                track.ids[:], track.starts[:], track.ends[:], track.words[:] = \
                    fresh.ids, fresh.starts, fresh.ends, fresh.words
            self.fallbacks += len(whole)
        return keep

    def _windows(self, tracks: list[Track], rows: list[Row], plans: list, keep: list[int]) -> list[int]:
        """Encode the planned windows ((row, (k, k2)) each) through the tokenizers library, one
        by one (`pooled`: in one batch), and splice them in; the rows refused."""
        if not plans:
            return []
        window, refused = self.policy.window, []
        texts = [rows[i].tail(tracks[i].starts[k]) for i, (k, _) in plans]
        if self.pooled:
            encodings = window.encode_batch(texts, add_special_tokens=False)
        else:
            encodings = (window.encode(t, add_special_tokens=False) for t in texts)
        for (i, (k, k2)), enc in zip(plans, encodings):
            kept = self._splice(tracks[i], k, k2, enc.ids, enc.offsets, enc.word_ids)
            if kept is None:
                refused.append(i)
            else:
                keep[i] = kept
        self.windows += len(plans) - len(refused)
        return refused

    def _splice_pieces(self, track: Track, k: int, k2: int, text: str) -> int | None:
        """Word mode, a window split in Python (plainwindows.py): its pre-tokens up to token k2
        must give tokens k..k2-1 as before; the ones after replace the rest. Returns the ids
        kept, -1 (refused) or None (the window has a character not admitted)."""
        plain = self.policy.plain
        pieces = plain.pieces(text)
        if pieces is None:
            return None
        try:
            memo, tokenize = plain.memo, plain.tokenize
            at, end, j, same = track.starts[k], track.starts[k2], 0, []
            heads = [k]   # each pre-token's first token
            while at < end:
                same += (memo.get(pieces[j]) or tokenize(pieces[j]))[0]
                at += len(pieces[j])
                j += 1
                heads.append(k + len(same))
            if at != end or same != track.ids[k:k2]:
                self._refuse("the window's first pre-token differs")
                return -1
            ids, starts, ends, words, w = [], [], [], [], track.words[k2 - 1] + 1
            for piece in pieces[j:]:
                pid, a, e = memo.get(piece) or tokenize(piece)
                if len(pid) == 1:
                    ids.append(pid[0])
                    starts.append(at + a[0])
                    ends.append(at + e[0])
                    words.append(w)
                else:
                    ids += pid
                    starts += [at + x for x in a]
                    ends += [at + x for x in e]
                    words += [w] * len(pid)
                at += len(piece)
                w += 1
                heads.append(k2 + len(ids))
        except KeyError:   # the BPE model split a pre-token inside a mapped character: never seen,
            return None    # but then the library encodes the window (the track is not touched yet)
        kept = _common(track.ids, ids, k2)
        track.ids[k2:], track.starts[k2:], track.ends[k2:], track.words[k2:] = ids, starts, ends, words
        track.heads = (heads[-3], heads[-2]) if len(heads) > 2 and heads[-3] >= 1 else None
        return kept

    def _fits(self, track: Track, k: int, k2: int, ids: list, offsets: list, words: list) -> bool:
        """Does a window's encoding start as the old tokens did (its first token; in word mode its
        first pre-token's ids and the pre-token boundary after them: the same tokens of the same
        text from the same place, so at the same offsets)?"""
        n = k2 - k
        if len(ids) <= n or ids[0] != track.ids[k] or offsets[0][0] != 0:
            self._refuse("the window's first token differs")
            return False
        if n and (words[n] == words[n - 1] or ids[:n] != track.ids[k:k2]):
            self._refuse("the window's first pre-token differs")
            return False
        return True

    def _splice(self, track: Track, k: int, k2: int, ids: list, offsets: list, words: list) -> int | None:
        """Put a window's encoding in place of tokens k.. Returns the ids kept, or None (refused)."""
        if not self._fits(track, k, k2, ids, offsets, words):
            return None
        kept, track.heads = _common(track.ids, ids, k), None
        b, w0 = track.starts[k], words[0]
        shift = track.words[k] - (w0 if w0 is not None else -1)
        track.ids[k:] = ids
        track.starts[k:] = [a + b for a, _ in offsets]
        track.ends[k:] = [e + b for _, e in offsets]
        track.words[k:] = [w + shift for w in words] if None not in words else \
            [-1 if w is None else w + shift for w in words]
        return kept

    def count(self, track: Track, row: Row, c: int) -> int:
        """The number of tokens of the row's full encode, where `track` encodes a string equal to
        the row's up to character c; the track is not changed."""
        at = self.window_start(track, c, row) if self.policy.mode else None
        if at is not None:
            enc = self.policy.window.encode(row.tail(track.starts[at[0]]), add_special_tokens=False)
            if self._fits(track, *at, enc.ids, enc.offsets, enc.word_ids):
                return at[0] + len(enc.ids)
        if self.policy.full is None:
            return len(self.tokenizer(row.tail(0))["input_ids"])
        return len(self.policy.full.encode(row.tail(0)).ids)

    def _refuse(self, why: str, rows: int = 1):
        self.refusals[why] = self.refusals.get(why, 0) + rows


def _common(old: list[int], new: list[int], start: int) -> int:
    """Length of the common prefix of `old` and `old[:start] + new`."""
    n = min(len(old), start + len(new))
    if old[start:n] == new[:n - start]:   # the usual case: the window kept every old id
        return n
    i = start
    while old[i] == new[i - start]:
        i += 1
    return i
