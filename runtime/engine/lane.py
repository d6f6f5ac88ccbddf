"""One member's side of a decoding batch: per-slot token ids and one KV cache (engine/kvcache.py).

A slot's cache holds exactly the member's tokenisation of its template + committed text, in order
from column 0 (`lengths[s]` tokens).

- `sync` (assists) brings slots' ids up to date with changed committed text: the Retokenizer
  (engine/retokenize.py) re-encodes a window at the end of each row and gives the full encode's
  ids; the ids after the first changed one are cropped (the slot's length goes down) and returned
  as the tokens to prefill. The common case is one token appended: nothing is cropped.
  `resync="full"` re-encodes whole rows (the old path, for comparisons).
- `append` (the main member) appends its chosen ids as they are.
- `forward` runs one batched forward pass over every slot's pending tokens, each written right
  after the slot's own tokens, with masks built from positions (exact sliding windows).
- `admit` prefills new prompts in their own forward pass and writes them into free slots, so one
  long prompt never makes every other row compute padding.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from .kvcache import SlotCache, attention_masks, layer_windows, packed
from .retokenize import Retokenizer, Row

PREFILL_MASK_ELEMENTS = 2 ** 28   # admissions are prefilled in groups whose (rows x width^2) stays below


def cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.24 on (the old
    name, past_key_values, goes in 5.40), past_key_values before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def without_padding(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits of ids past the tokenizer's last token set to -inf: a model whose embedding is
    padded (Qwen2.5: 151,665 tokens in 152,064 rows) must never choose, or give probability to,
    an id no tokenizer can decode."""
    if logits.shape[-1] > vocab:
        logits[..., vocab:] = float("-inf")
    return logits


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class Lane:
    """`follows_text`: an assist (its ids follow the committed text); the engine sets it.
    `resync="full"`: re-encode whole rows every step (the old path, for comparisons)."""

    def __init__(self, member, resync: str = "window"):
        if resync not in ("window", "full"):
            raise ValueError(f"resync must be 'window' or 'full', got {resync!r}")
        self.member = member
        self.model = member.model
        self.tokenizer = member.tokenizer
        self.device = torch.device(getattr(member, "device", None) or "cpu")  # where the model runs
        self.cache = SlotCache()
        self.cache_arg = cache_keyword(self.model) if self.model is not None else "cache"
        self.vocab = len(self.tokenizer)     # ids past it (a padded embedding) never win
        self.resync = resync
        self.follows_text = False
        self.lengths: list[int] = []         # per slot: tokens in its cache
        self.ids: list[list[int]] = []       # per slot: its token ids (an assist's: its track's)
        self.tracks: list = []               # per slot: the Retokenizer's Track (prompt + text)
        self.prefix: list[str] = []          # per slot: the member's rendered prompt
        self.prompt_tokens: list[int] = []   # per slot: tokens of the rendered prompt alone
        self.logits = torch.zeros(0, 0, device=self.device)  # per slot: fp32 next-token logits
        self._retokenizer = None
        self.windows = self.additive = None
        self.configs = []
        if self.model is not None:
            self.windows = layer_windows(self.model.config)
            kind = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
            if kind not in ("sdpa", "eager"):
                raise ValueError(f"member {member.name!r}: attention implementation {kind!r}; the engine's "
                                 "KV cache takes 'sdpa' or 'eager'")
            self.additive = self.model.dtype if kind == "eager" else None
            self.configs = list({id(m.config): m.config for m in self.model.modules()
                                 if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}.values())

    @property
    def retokenizer(self) -> Retokenizer:
        if self._retokenizer is None:
            self._retokenizer = Retokenizer(self.tokenizer, windows=self.resync == "window")
        return self._retokenizer

    def resync_counts(self) -> dict:
        r = self.retokenizer
        return {"windows": r.windows, "in_python": r.split_in_python, "full": r.fallbacks, "refused": dict(r.refusals)}

    @property
    def windowed(self) -> bool:
        return self.retokenizer.policy.mode is not None

    # ---- tokens -------------------------------------------------------------------------

    def sync(self, slots: list[int], texts: list[str], changed: list[int | None]) -> list[list[int]]:
        """Each slot's committed text changed from character `changed[i]` on (None: it did not
        change) -> the tokens it still has to prefill (its cache is cropped to the ids that did
        not change)."""
        pending: list[list[int]] = [[] for _ in slots]
        todo = [i for i, c in enumerate(changed) if c is not None]
        if not todo:
            return pending
        rows = [slots[i] for i in todo]
        if self.windowed:
            prefix = self.prefix
            keep = self.retokenizer.sync([self.tracks[s] for s in rows],
                                         [Row(prefix[s], texts[i]) for s, i in zip(rows, todo)],
                                         [len(prefix[s]) + changed[i] for s, i in zip(rows, todo)])
        else:   # the old path: whole rows re-encoded
            fresh = self.tokenizer([self.prefix[s] + texts[i] for s, i in zip(rows, todo)])["input_ids"]
            keep = [common_prefix(self.ids[s], ids) for s, ids in zip(rows, fresh)]
            for s, ids in zip(rows, fresh):
                self.ids[s] = ids
            self.retokenizer.fallbacks += len(rows)
        all_ids, lengths = self.ids, self.lengths
        for s, i, k in zip(rows, todo, keep):
            ids, cached = all_ids[s], lengths[s]
            if k == len(ids) < cached:
                k -= 1  # the text now ends inside the old ids: recompute its last token's logits
            if k < cached:
                lengths[s] = cached = k
            pending[i] = ids[cached:]
        return pending

    def append(self, slots: list[int], tokens: list[int]) -> list[list[int]]:
        """The main member: each slot's chosen token, one of its own ids, appended as it is (never
        re-encoded: a tokenizer may encode the same text differently, and the model would then be
        fed a context it never produced). Returns the tokens each slot has to prefill."""
        for s, t in zip(slots, tokens):
            self.ids[s].append(t)
        return [[t] for t in tokens]

    def completion_tokens(self, slot: int, text: str, changed: int) -> int:
        """The length of `text`, the slot's committed text, in this member's own tokens: the
        encode of prompt + text less the prompt's. An assist's track encodes prompt + a text equal
        to this one before character `changed`; the main member's, the prompt alone."""
        if not self.windowed:
            full, head = self.tokenizer([self.prefix[slot] + text, self.prefix[slot]])["input_ids"]
            return len(full) - len(head)
        c = len(self.prefix[slot]) + (changed if self.follows_text else 0)
        return self.retokenizer.count(self.tracks[slot], Row(self.prefix[slot], text), c) - self.prompt_tokens[slot]

    def crop(self, slot: int, keep: int):
        self.lengths[slot] = min(self.lengths[slot], keep)

    def compact_slots(self, moves: list[tuple[int, int]], slots: int):
        """Slot `source` moves to `target` for each (source, target) of `moves`, then only the
        first `slots` slots are kept (finished rows dropped when no prompt is waiting): the
        cache copies the moved slots alone."""
        source = torch.tensor([m[0] for m in moves], dtype=torch.long).to(self.device, non_blocking=True)
        target = torch.tensor([m[1] for m in moves], dtype=torch.long).to(self.device, non_blocking=True)
        self.cache.compact(source, target, max([self.lengths[m[0]] for m in moves], default=0), slots)
        if moves:
            self.logits.index_copy_(0, target, self.logits.index_select(0, source))
        self.logits = self.logits[:slots]
        for name in ("lengths", "ids", "tracks", "prefix", "prompt_tokens"):
            values = getattr(self, name)
            for a, b in moves:
                values[b] = values[a]
            del values[slots:]

    # ---- forward passes -----------------------------------------------------------------

    def forward(self, slots: list[int], pending: list[list[int]]):
        """Prefill each listed slot's pending tokens, right after its cached ones (every other
        slot computes padding, written past its length)."""
        n = [0] * len(self.lengths)
        for s, p in zip(slots, pending):
            n[s] = len(p)
        width = max(n)
        if width == 0:  # no new tokens anywhere (the text did not change): logits still hold
            return
        tokens = [[0] * width for _ in n]
        for s, p in zip(slots, pending):
            tokens[s][:len(p)] = p
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        lengths = torch.tensor(self.lengths, dtype=torch.long).to(self.device, non_blocking=True)
        positions = lengths[:, None] + torch.arange(width, device=self.device)[None, :]
        columns = max(self.lengths) + width
        self.cache.reserve(len(n), columns)
        self.cache.write, self.cache.width = positions, columns
        masks = attention_masks(self.windows, positions, columns, self.additive)
        with packed(self.configs):
            logits, _ = self._run(ids, positions, masks, self.cache, n)
        moved = [s for s, p in zip(slots, pending) if p]
        index = torch.tensor(moved, dtype=torch.long).to(self.device, non_blocking=True)
        self.logits.index_copy_(0, index, logits.index_select(0, index))
        for s in moved:
            self.lengths[s] += n[s]

    def _run(self, ids, positions, mask, cache, count: list[int]):
        """One forward pass; the logits after each row's last real token (`count[i]` tokens,
        right-padded): only those positions go through the output layer (chosen on the host from
        the counts, nothing read back). Returns (logits, output)."""
        width = ids.shape[1]
        if width == 1:
            keep = pick = 1
        else:
            last = [max(c, 1) - 1 for c in count]
            columns = sorted(set(last))
            keep = torch.tensor(columns, dtype=torch.long).to(self.device, non_blocking=True)
            pick = torch.tensor([columns.index(c) for c in last], dtype=torch.long).to(self.device, non_blocking=True)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=keep, **{self.cache_arg: cache})
        logits = out.logits[:, -1] if width == 1 else \
            out.logits[torch.arange(len(count), device=self.device), pick]
        return without_padding(logits.float(), self.vocab), out

    def admit(self, slots: list[int], prompts: list[str], budgets: list[int] | None = None):
        """Prefill new prompts (own forward passes, fresh caches) and write them into `slots`:
        free slots or new ones past the end. `budgets`: each prompt's max_new_tokens, so the cache
        makes room for them now (twice as many for an assist, whose tokens for the same text may
        be more) instead of doubling mid-decode."""
        prefixes = [self.member.render(p) for p in prompts]
        if self.windowed:
            tracks = self.retokenizer.encode(prefixes)
            ids = [t.ids if self.follows_text else list(t.ids) for t in tracks]
        else:
            ids = self.tokenizer(prefixes)["input_ids"]
            tracks = [None] * len(ids)
        for prompt, i in zip(prompts, ids):
            if not i:
                raise ValueError(f"member {self.member.name!r}: the prompt {prompt[:40]!r} has no tokens")
        self._grow(max(max(slots) + 1, len(self.lengths)))
        room = [2 * b if self.follows_text else b for b in (budgets or [0] * len(ids))]
        self.cache.reserve(len(self.lengths), max(len(i) + r for i, r in zip(ids, room)))
        for group in _groups([len(i) for i in ids]):
            self._prefill([slots[j] for j in group], [ids[j] for j in group])
        for j, s in enumerate(slots):
            self.lengths[s], self.ids[s], self.tracks[s], self.prefix[s] = len(ids[j]), ids[j], tracks[j], prefixes[j]
            self.prompt_tokens[s] = len(ids[j])

    def _prefill(self, slots: list[int], ids: list[list[int]]):
        """Right-padded prompts with transformers' own masks (no holes: columns are positions)."""
        width = max(len(i) for i in ids)
        tokens = torch.tensor([i + [0] * (width - len(i)) for i in ids], dtype=torch.long, device=self.device)
        count = [len(i) for i in ids]
        mask = torch.tensor([[1] * c + [0] * (width - c) for c in count], dtype=torch.long, device=self.device)
        positions = torch.arange(width, device=self.device)[None, :].expand(len(ids), -1)
        logits, out = self._run(tokens, positions, mask, DynamicCache(), count)
        layers = [layer for layer in _cache_of(out).layers if getattr(layer, "is_initialized", False)]
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.cache.put(index, [layer.keys for layer in layers], [layer.values for layer in layers], width)
        if self.logits.shape[1] != logits.shape[1]:
            self.logits = torch.zeros(len(self.lengths), logits.shape[1], device=self.device)
        self.logits.index_copy_(0, index, logits)

    def _grow(self, rows: int):
        """At least `rows` slots (new ones empty)."""
        extra = rows - len(self.lengths)
        if extra <= 0:
            return
        self.lengths += [0] * extra
        self.ids += [[] for _ in range(extra)]
        self.tracks += [None] * extra
        self.prefix += [""] * extra
        self.prompt_tokens += [0] * extra
        if self.logits.numel():
            self.logits = torch.cat([self.logits, self.logits.new_zeros(extra, self.logits.shape[1])])


def _groups(lengths: list[int]) -> list[list[int]]:
    """Admitted prompts in groups whose prefill masks stay below PREFILL_MASK_ELEMENTS."""
    groups, current, width = [], [], 0
    for j in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        w = max(width, lengths[j])
        if current and (len(current) + 1) * w * w > PREFILL_MASK_ELEMENTS:
            groups.append(current)
            current, w = [], lengths[j]
        current.append(j)
        width = w
    return groups + [current] if current else groups
