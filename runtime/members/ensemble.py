"""From a config to loaded members, their relative transfers and a Fuser (main member first)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..deepen.anchors import build_anchor_cache, cached_entry, exact_transfers, load_transfers
from ..deepen.fusion import FastSettings, Fuser
from ..deepen.gac import GaCFuser
from ..deepen.gate import Gate
from ..deepen.search import SearchSettings
from ..deepen.union import build_union, cached_union, load_union, save_union
from ..deepen.unite import UniTEFuser
from ..deepen.vocab import byte_fallback_ids, token_bytes
from ..jobs.progress import Progress
from .config import EnsembleConfig, MemberConfig
from .devices import check_dtype, row_product_dtype
from .lock import CacheLock
from .prepare import member_dir
from .sources import anchors_root, deepen_home, fingerprint, load_input_embedding, load_model, load_tokenizer


@dataclass
class Member:
    config: MemberConfig
    path: Path | None          # None (and no tokenizer): a member this process does not need
    fingerprint: str
    tokenizer: object
    model: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")   # where its model, lane and transfer live

    @property
    def name(self) -> str:
        return self.config.name

    def render(self, prompt: str) -> str:
        """The member's own prompt text (its template, or its chat template)."""
        if self.config.template == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return self.config.template.replace("{prompt}", prompt)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id


def load_members(config: EnsembleConfig, with_models: bool = True, home: Path | None = None,
                 log=print, device: torch.device | str = "cpu", only: set[int] | None = None,
                 fingerprints: bool = True, prepare: bool = True) -> list[Member]:
    """Every member (main first): its files (prepared if needed), fingerprint, tokenizer, and with
    `with_models` its model on `device`, in the member's dtype. `only`: the members whose files
    and tokenizers this process needs (a rank: the main member's, to decode, and its own); the
    others are placeholders with their config alone. `fingerprints=False` skips hashing;
    `prepare=False`: a member not prepared yet is an error (under the launcher, preparing happens
    before the ranks connect: runtime/distributed/startup.py)."""
    home = home or deepen_home()
    device = torch.device(device)
    members = []
    for i, mc in enumerate(config.ordered_members):
        if only is not None and i not in only:
            members.append(Member(mc, None, "", None, device=device))
            continue
        path = member_dir(mc, home, log, prepare)
        member = Member(mc, path, fingerprint(path, home) if fingerprints else "", load_tokenizer(path, mc),
                        device=device)
        if with_models:
            check_dtype(mc.name, mc.dtype, device)
            member.model = load_model(path, mc, device)
        members.append(member)
    return members


def anchors_entry(config: EnsembleConfig, members: list[Member], home: Path | None = None,
                  progress: bool = True, log=print, build: bool = True, device="cpu") -> Path:
    """The cache entry this ensemble's fuser loads, built if missing: the anchors and transfers
    (DEEPEN), or the union vocabulary's maps (UniTE, GaC: union_entry)."""
    if config.method != "deepen":
        return union_entry(config, members, home, log, build)
    root = anchors_root(home)
    prints = [m.fingerprint for m in members]
    entry = cached_entry(prints, config.anchors.max_anchors, root)
    if entry is not None:
        return entry
    if not build:
        raise FileNotFoundError(f"no anchors for this member set in {root}: run "
                                f"`deepen anchors build {config.path or 'CONFIG'}` first")
    with CacheLock(root / ".locks" / "build", log=log):   # one build at a time per anchors root
        entry = cached_entry(prints, config.anchors.max_anchors, root)
        if entry is not None:
            return entry
        log("building anchors and relative transfers (once per member set)")
        loaders = [lambda m=m: load_input_embedding(m.path, m.config) for m in members]
        return build_anchor_cache([m.name for m in members], prints, [m.tokenizer for m in members],
                                  loaders, config.anchors.max_anchors, root,
                                  (lambda total, desc: Progress(total, desc, "tokens")) if progress else None, device)


# end-of-text tokens GaC counts as EOS whatever the member (gac_gen_utils.py's eos_token_list)
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|end|>")


def end_of_text_ids(tokenizer) -> list[int]:
    """The member's EOS id first, then its other end-of-text special tokens."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(tokenizer.all_special_ids)
    return ids + [vocab[t] for t in END_OF_TEXT if t in vocab and vocab[t] not in ids and vocab[t] in special]


def first_tokens(tokenizer):
    """texts -> the first id of the member's own encoding of each text, as a piece of running text
    (no special tokens, no start-of-text effects: the window tokenizer of engine/retokenize.py
    where there is one), -1 where it is the unknown token."""
    from ..engine.retokenize import policy_for
    window = policy_for(tokenizer).window
    unk = tokenizer.unk_token_id

    def first(texts: list[str]) -> list[int]:
        if window is not None:
            encoded = [e.ids for e in window.encode_batch(texts, add_special_tokens=False)]
        else:   # GaC's way: encode after a prefix and drop the prefix's tokens
            head = tokenizer(";", add_special_tokens=False)["input_ids"]
            encoded = [ids[len(head):] if ids[:len(head)] == head else ids
                       for ids in tokenizer([";" + t for t in texts], add_special_tokens=False)["input_ids"]]
        return [ids[0] if ids and ids[0] != unk else -1 for ids in encoded]
    return first


def union_entry(config: EnsembleConfig, members: list[Member], home: Path | None = None, log=print,
                build: bool = True) -> Path:
    """The cache entry of the members' union vocabulary (deepen/union.py), built if missing (a few
    seconds: every member's token bytes, and its first token of every string it has no token for)."""
    root = anchors_root(home) / "union"
    prints = [m.fingerprint for m in members]
    entry = cached_union(prints, root)
    if entry is not None:
        return entry
    if not build:
        raise FileNotFoundError(f"no union vocabulary for this member set in {root}: run "
                                f"`deepen anchors build {config.path or 'CONFIG'}` first")
    log("building the members' union vocabulary (once per member set)")
    tokenizers = [m.tokenizer for m in members]
    maps = build_union([token_bytes(t) for t in tokenizers], [end_of_text_ids(t) for t in tokenizers],
                       [byte_fallback_ids(t) for t in tokenizers], [first_tokens(t) for t in tokenizers])
    return save_union(maps, [m.name for m in members], prints, root)


def make_fuser(config: EnsembleConfig, members: list[Member], entry: Path, mode: str | None = None,
               adapt_weights: dict[str, float] | None = None, only: int | None = None):
    """`only`: load just that member's transfer (a leader in the distributed runtime). Each
    transfer goes to its member's device; the fusion math runs there, in fp32. UniTE and GaC
    (config.method) load the union maps, every member's (a few MB)."""
    mode = mode or config.mode
    gate = Gate(config.gate, config.gate_index)
    if config.method != "deepen":
        maps = load_union(entry).to([m.device for m in members])
        weights, eos = config.member_weights(adapt_weights), members[0].eos_token_id
        if config.method == "unite":
            return UniTEFuser(maps, weights, config.unite_k, gate, mode, eos)
        return GaCFuser(maps, weights, gate, mode, eos, config.anchors.mass_epsilon, config.anchors.max_support)
    transfers = load_transfers(entry, config.anchors.row_cache, only, [m.device for m in members])
    if mode == "exact":
        transfers = [t if t is None else exact_transfers([t])[0] for t in transfers]
    else:
        transfers = [t if t is None else t.use_product(row_product_dtype(config.anchors.row_product, t.device))
                     for t in transfers]
    a = config.anchors
    return Fuser(transfers, config.member_weights(adapt_weights),
                 SearchSettings(eta=config.eta, steps=config.steps), mode,
                 FastSettings(a.mass_epsilon, a.max_support, a.skip_decided, a.skip_agreeing, a.split_fusion),
                 members[0].eos_token_id, gate)


def single_fuser(members: list[Member]) -> Fuser:
    """A member alone through the same engine: eta 0, so no fusion, its own greedy token."""
    return Fuser([None], [1.0], SearchSettings(eta=0.0), "fast", eos_token_id=members[0].eos_token_id)
