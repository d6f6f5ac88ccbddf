"""One member's side of a decoding batch: per-row token ids and one batched KV cache.

The cache is a transformers DynamicCache of width W (columns) for B slots, with a (B, W) mask of
live columns. A slot's live columns, in order, hold exactly the member's tokenisation of its
template + committed text; everything else is a hole (masked, never attended to).

- `sync` brings a slot's ids up to date with new committed text: re-encode, keep the longest
  common prefix with the current ids, crop the rest (its columns become holes), return the tokens
  still to prefill. The common case is one token appended: nothing is cropped.
- `forward` runs one batched forward over every slot's pending tokens. Blocks are right-padded,
  so a slot's new tokens sit directly after its old ones and no query ever sees a hole inside its
  own sequence (that keeps sliding-window attention exact); any hole made this step is squeezed
  out right after by `compact`, which right-aligns every slot's live columns (left padding).
- `admit` prefills new prompts in their own forward pass and writes them into free slots, so one
  long prompt never makes every other row compute padding.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


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


class Lane:
    def __init__(self, member):
        self.member = member
        self.model = member.model
        self.tokenizer = member.tokenizer
        self.device = torch.device(getattr(member, "device", None) or "cpu")  # where the model runs
        self.cache = DynamicCache()
        self.cache_arg = cache_keyword(self.model) if self.model is not None else "cache"
        self.vocab = len(self.tokenizer)     # ids past it (a padded embedding) never win
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.ids: list[list[int]] = []       # per slot: the live token ids, in order
        self.prefix: list[str] = []          # per slot: the member's rendered prompt
        self.logits = torch.zeros(0, 0, device=self.device)  # per slot: fp32 next-token logits
        self.dirty = False                   # a hole was made: compact after the forward

    # ---- tokens -------------------------------------------------------------------------

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"] if texts else []

    def sync(self, slots: list[int], texts: list[str]) -> list[list[int]]:
        """New committed text per slot -> the tokens each slot still has to prefill."""
        fresh = self.encode([self.prefix[s] + t for s, t in zip(slots, texts)])
        pending = []
        for s, ids in zip(slots, fresh):
            keep = common_prefix(self.ids[s], ids)
            if keep == len(ids) < len(self.ids[s]):
                keep -= 1  # the text now ends inside the old ids: recompute its last token
            if keep < len(self.ids[s]):
                self.crop(s, keep)
            pending.append(ids[keep:])
            self.ids[s] = ids
        return pending

    def append(self, slots: list[int], tokens: list[int]) -> list[list[int]]:
        """The main member: each slot's chosen token, one of its own ids, appended as it is (never
        re-encoded: a tokenizer may encode the same text differently, and the model would then be
        fed a context it never produced). Returns the tokens each slot has to prefill."""
        for s, t in zip(slots, tokens):
            self.ids[s].append(t)
        return [[t] for t in tokens]

    def crop(self, slot: int, keep: int):
        live = self.mask[slot].nonzero(as_tuple=True)[0]
        self.mask[slot, live[keep:]] = 0
        self.dirty = True

    # ---- cache surgery --------------------------------------------------------------------

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def _gather_columns(self, index: torch.Tensor):
        """Rebuild every layer's K/V from (B, W') column indices."""
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                idx = index[:, None, :, None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3])
                setattr(layer, name, t.gather(2, idx))

    def compact(self):
        """Right-align each slot's live columns and drop columns no slot uses."""
        width = int(self.mask.sum(1).max()) if self.mask.numel() else 0
        order = torch.argsort(self.mask, dim=1, stable=True)  # holes first, live columns in order
        index = order[:, order.shape[1] - width:]
        self._gather_columns(index)
        self.mask = self.mask.gather(1, index)
        self.dirty = False

    def keep_slots(self, slots: list[int]):
        """Drop every other slot (finished rows with no prompt waiting)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask = self.mask[index]
        self.logits = self.logits[index]
        self.ids = [self.ids[s] for s in slots]
        self.prefix = [self.prefix[s] for s in slots]
        live_cols = self.mask.any(0).nonzero(as_tuple=True)[0]
        if len(live_cols) and live_cols[0] > 0:  # trim columns no slot uses any more
            self._gather_columns(torch.arange(int(live_cols[0]), self.mask.shape[1], device=self.device)
                                 .expand(len(slots), -1))
            self.mask = self.mask[:, int(live_cols[0]):]

    # ---- forward passes -----------------------------------------------------------------

    def _run(self, tokens: list[list[int]], mask: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """Forward right-padded blocks of `tokens` after `mask`'s columns. Returns each row's
        logits after its last real token."""
        width = max(len(t) for t in tokens)
        # built on the host and copied to the device: the new tokens, right-padded, and where they are
        input_ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens], dtype=torch.long)
        block = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens], dtype=torch.long)
        last = torch.tensor([max(len(t), 1) - 1 for t in tokens])
        input_ids, block, last = (x.to(self.device, non_blocking=True) for x in (input_ids, block, last))
        before = mask.sum(1, keepdim=True)
        positions = before + torch.arange(width, device=self.device)[None, :]
        full_mask = torch.cat([mask, block], dim=1)
        with torch.no_grad():
            # only each row's last position goes through the output layer: on a long prefill the
            # (rows x width x vocabulary) logits would cost more time and memory than the model
            out = self.model(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=last[:, None], **{self.cache_arg: cache})
        return without_padding(out.logits[:, -1].float(), self.vocab), full_mask

    def forward(self, slots: list[int], pending: list[list[int]]):
        """Prefill each listed slot's pending tokens (every other slot gets only padding)."""
        tokens = [[] for _ in range(self.mask.shape[0])]
        for s, p in zip(slots, pending):
            tokens[s] = p
        width = max(len(t) for t in tokens)
        if width == 0:  # no new tokens anywhere (the text did not change): logits still hold
            return
        if any(len(p) != width for p in pending):
            self.dirty = True  # some live slot got a hole column after its tokens
        logits, self.mask = self._run(tokens, self.mask, self.cache)
        for s, p in zip(slots, pending):
            if p:  # a slot with no new tokens keeps the logits of its unchanged sequence
                self.logits[s] = logits[s]
        if self.dirty:
            self.compact()

    def admit(self, slots: list[int], prompts: list[str]):
        """Prefill new prompts (own forward, own cache) and write them right-aligned into
        `slots`: free slots (their old columns become holes) or new ones past the end."""
        prefixes = [self.member.render(p) for p in prompts]
        ids = self.encode(prefixes)
        for prompt, i in zip(prompts, ids):
            if not i:
                raise ValueError(f"member {self.member.name!r}: the prompt {prompt[:40]!r} has no tokens")
        fresh = DynamicCache()
        logits, _ = self._run(ids, torch.zeros(len(ids), 0, dtype=torch.long, device=self.device), fresh)
        new_layers = [l for l in fresh.layers if getattr(l, "is_initialized", False)]
        if not self._layers():  # first admission: empty layers shaped like the model's
            for i, layer in enumerate(new_layers):
                self.cache.update(layer.keys[:0, :, :0], layer.values[:0, :, :0], i)
            self.logits = torch.zeros(0, logits.shape[1], device=self.device)
        lengths = [len(i) for i in ids]
        self._resize(max(max(slots) + 1, self.mask.shape[0]), max(max(lengths), self.mask.shape[1]))
        width = self.mask.shape[1]
        for j, (s, n) in enumerate(zip(slots, lengths)):
            self.mask[s] = 0
            self.mask[s, width - n:] = 1
            for mine, new in zip(self._layers(), new_layers):
                for name in ("keys", "values"):
                    t = getattr(mine, name)
                    t[s] = 0
                    t[s, :, width - n:] = getattr(new, name)[j, :, :n]
            self.ids[s], self.prefix[s], self.logits[s] = ids[j], prefixes[j], logits[j]

    def _resize(self, rows: int, width: int):
        """Grow to `rows` slots and `width` columns (new columns on the left: holes)."""
        old_rows, old_width = self.mask.shape
        if (rows, width) == (old_rows, old_width):
            return
        mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        mask[:old_rows, width - old_width:] = self.mask
        self.mask = mask
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                grown = t.new_zeros(rows, t.shape[1], width, t.shape[3])
                grown[:old_rows, :, width - old_width:] = t
                setattr(layer, name, grown)
        logits = torch.zeros(rows, self.logits.shape[1], device=self.device)
        logits[:old_rows] = self.logits
        self.logits = logits
        self.ids += [[] for _ in range(rows - old_rows)]
        self.prefix += ["" for _ in range(rows - old_rows)]
