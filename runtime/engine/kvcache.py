"""A lane's KV cache: every slot's tokens in order from column 0, in buffers allocated ahead.

Per layer one buffer of keys and one of values, (slots, kv heads, capacity, head dim). Slot s holds
its tokens in columns [0, length[s]): no holes and no padding before them, so a token's column is
its position. A forward pass writes each slot's new tokens right after its own (`write`: a column
per new token), and attention reads the first `width` columns as views of the buffers: nothing is
copied per step. Cropping a slot is changing its length. The capacity doubles when a slot would
run past it (copied once), so its cost per token is constant. Dropping finished slots moves only the slots
past the new end into the free places before it (`compact`).

Because columns are positions, `attention_masks` builds the masks in the model's own terms:
causal, and for sliding-window layers the last `window` positions, exactly; a crop can never leave
a hole inside a window. Models with several kinds of layers (Gemma-2/3, Qwen2 with sliding layers)
get one mask per kind (transformers' mask mapping); the others one mask.

`packed_attention` is transformers' SDPA attention with grouped-query heads packed for any number
of new tokens: transformers packs the query heads of a key/value head together only for a single
new token, and otherwise repeats the keys and values for every query head (a copy of the whole
cache, every layer); an assist often prefills a few tokens after a crop, so the lanes' steps use
this instead (`packed`), the prefill keeps transformers' own.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED = "deepen_packed_sdpa"


class SlotCache(Cache):
    """transformers calls `update` once per layer per forward pass (module doc)."""

    def __init__(self):
        super().__init__(layers=[])
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots = 0
        self.capacity = 0
        self.write: torch.Tensor | None = None   # (slots, block) column of each new token
        self.width = 0                            # columns the attention reads

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):   # first forward pass: buffers shaped like this layer's states
            for store, states in ((self.keys, key_states), (self.values, value_states)):
                store.append(states.new_zeros(self.slots, states.shape[1], self.capacity, states.shape[3]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self.write[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys[:, :, :self.width], values[:, :, :self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def reserve(self, slots: int, columns: int):
        """At least `slots` slots and `columns` columns (capacity doubled as needed); new slots
        and columns are zeros."""
        capacity = self.capacity
        while capacity < columns:
            capacity = max(2 * capacity, 16)
        slots = max(slots, self.slots)
        if (slots, capacity) == (self.slots, self.capacity):
            return
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros(slots, t.shape[1], capacity, t.shape[3])
                grown[:self.slots, :, :self.capacity] = t
                store[i] = grown
        self.slots, self.capacity = slots, capacity

    def put(self, slots: torch.Tensor, keys: list, values: list, columns: int):
        """Write prefilled states (rows in `slots` order, tokens from column 0) into those slots."""
        if not self.keys:
            for store, states in ((self.keys, keys), (self.values, values)):
                store.extend(s.new_zeros(self.slots, s.shape[1], self.capacity, s.shape[3]) for s in states)
        for store, states in ((self.keys, keys), (self.values, values)):
            for mine, new in zip(store, states):
                mine[:, :, :columns].index_copy_(0, slots, new[:, :, :columns].to(mine.dtype))

    def compact(self, source: torch.Tensor, target: torch.Tensor, columns: int, slots: int):
        """Slot source[i] moves to target[i] (its first `columns` columns), then only the first
        `slots` slots are kept (views: nothing else is copied)."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if len(source):
                    head = t[:, :, :columns]
                    head.index_copy_(0, target, head.index_select(0, source))
                store[i] = t[:slots]
        self.slots = min(self.slots, slots)


def layer_windows(config) -> dict[str, int | None] | int | None:
    """The attention window of each kind of layer ({layer type: window or None}), or one window
    (or None) for a model whose layers are all alike."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return window
    kinds = {}
    for kind in set(types):
        if kind not in ("full_attention", "sliding_attention"):
            raise ValueError(f"layers of type {kind!r} are not supported by the engine's KV cache")
        kinds[kind] = window if kind == "sliding_attention" else None
    if len(set(kinds.values())) == 1:
        return next(iter(kinds.values()))
    return kinds


def attention_masks(windows, positions: torch.Tensor, width: int, additive_dtype=None):
    """Masks for queries at `positions` (slots, block) over columns [0, width): a column is seen
    when it is at or before the query's position and, with a window, fewer than `window`
    positions before it (transformers' rule: kv > q - window). Boolean (True: attend), or
    additive in `additive_dtype` for the eager attention."""
    cols = torch.arange(width, device=positions.device)[None, None, None, :]
    q = positions[:, None, :, None]

    def one(window):
        seen = cols <= q
        if window is not None:
            seen = seen & (cols > q - window)
        if additive_dtype is None:
            return seen
        return torch.zeros(seen.shape, dtype=additive_dtype, device=seen.device).masked_fill_(
            ~seen, torch.finfo(additive_dtype).min)

    if isinstance(windows, dict):
        return {kind: one(w) for kind, w in windows.items()}
    return one(windows)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA with the query heads of each key/value head stacked as extra queries (no repeated keys
    and values); anything else goes to transformers' own SDPA attention."""
    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q, d = query.shape
    if groups == 1 or q == 1 or attention_mask is None or attention_mask.shape[1] != 1 or dropout \
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(b, h // groups, groups * q, d), key, value,
                                         attn_mask=attention_mask.repeat(1, 1, groups, 1), scale=scaling)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED, packed_attention)


@contextmanager
def packed(configs: list):
    """The models of these configs attend with `packed_attention` inside the block (sdpa ones only)."""
    saved = [c._attn_implementation_internal for c in configs]
    for c, kind in zip(configs, saved):
        if kind == "sdpa":
            c._attn_implementation_internal = PACKED
    try:
        yield
    finally:
        for c, kind in zip(configs, saved):
            c._attn_implementation_internal = kind
