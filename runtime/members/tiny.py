"""Deterministic tiny causal LMs with tokenizers of different families, for the tests and
``configs/tiny.toml``: three members whose vocabularies overlap but differ, so the code that deals
with mismatched vocabularies runs for real, on CPU, in seconds, with no model hub.

* ``tiny-bpe``  -- GPT-2 / Llama-3 style byte-level BPE, ``LlamaForCausalLM``.
* ``tiny-sp``   -- Gemma style SentencePiece BPE ("▁" for space, byte fallback), ``MistralForCausalLM``.
* ``tiny-bpe2`` -- Qwen2 style byte-level BPE (regex split first, digits alone, ``<|im_end|>`` as
  eos), ``LlamaForCausalLM`` with attention biases. Not ``Qwen2ForCausalLM``: for model_type
  "qwen2", transformers 5's AutoTokenizer forces ``Qwen2Tokenizer``, whose NFC normalizer loses
  the lossless round trip.

Weights are random but fixed by a per-member seed; tokenizers are trained with ``tokenizers`` on
a built-in corpus, deterministically. Known limitation, shared with real Gemma/Llama-2
tokenizers: ``tiny-sp`` cannot round-trip a literal "▁" (U+2581), the normalizer's space marker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from .catalog import TINY_MODELS as TINY_MEMBERS

# Bump when anything below changes what gets written, so stale builds are redone.
FORMAT_VERSION = "tiny-members-v2"  # v2: 8,192 positions (long-context tests and benches)
MARKER = ".tiny-complete"
MAX_POSITIONS = 8192   # long prompts in tests and `deepen bench --context` (the weights do not depend on it)

# Qwen2's pre-tokenizer regex (single digits, letters runs, punctuation runs).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPECS = {
    "tiny-bpe": dict(
        family="bytelevel", vocab_size=400, specials=["<|endoftext|>"],
        eos="<|endoftext|>", bos="<|endoftext|>", pad="<|endoftext|>", unk=None,
        arch="llama", hidden=48, intermediate=96, seed=1001,
    ),
    "tiny-sp": dict(
        family="sentencepiece", vocab_size=520, specials=["<pad>", "<eos>", "<bos>", "<unk>"],
        eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>",
        arch="mistral", hidden=32, intermediate=64, seed=2002,
    ),
    "tiny-bpe2": dict(
        family="qwen", vocab_size=460, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos="<|im_end|>", bos=None, pad="<|endoftext|>", unk=None,
        arch="llama-bias", hidden=40, intermediate=80, seed=3003,
    ),
}


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

_SUBJECTS = ["the cat", "a dog", "the model", "my friend", "the teacher", "this system",
             "the old man", "a small bird", "the river", "our team", "the computer", "she", "he", "they"]
_VERBS = ["sees", "likes", "finds", "writes", "reads", "builds", "moves", "takes", "makes",
          "wants", "knows", "gives", "helps", "opens", "watches"]
_OBJECTS = ["the ball", "a book", "the answer", "some water", "the door", "a letter", "the code",
            "the house", "a new idea", "the result", "the window", "an apple", "the garden"]
_TAILS = ["today", "in the morning", "at night", "with care", "again", "for the first time",
          "near the station", "after lunch", "before the rain", "on the table", "quickly"]
_ACCENTED = ["café", "naïve", "résumé", "über", "façade", "piñata", "São Paulo", "crème brûlée",
             "Zürich", "déjà vu", "coöperate", "jalapeño"]
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "if x > 0 and y < 5:\n    z = x - y\nelse:\n    z = 0\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "int main() {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "const xs = [1, 2, 3].map((v) => v * v);\n",
    "SELECT name, age FROM users WHERE age >= 18;\n",
]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind < 5:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        s = s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ";"])
    elif kind < 7:
        n, m = rng.randrange(1000), rng.randrange(100)
        s = f"There are {n} items, and {m}% of them cost ${rng.randrange(10, 99)}.{rng.randrange(10, 99)} each."
    elif kind < 9:
        s = f"We met at the {rng.choice(_ACCENTED)} in {1900 + rng.randrange(125)}: \"{rng.choice(_TAILS)}\", she said."
    else:
        s = f"Q: What is {rng.randrange(50)} + {rng.randrange(50)}? A: It's easy (I think)."
    return s


def tiny_corpus(n_docs: int = 120, seed: int = 12345) -> list[str]:
    """A few hundred English-ish sentences grouped into documents.

    Documents (not single lines) so the trainer sees newlines, blank lines
    and indentation inside the text, as it would in real data.
    """
    rng = random.Random(seed)  # private RNG: never touches global state
    docs = []
    for i in range(n_docs):
        parts = [_sentence(rng) for _ in range(rng.randrange(2, 6))]
        sep = rng.choice([" ", " ", "\n", "\n\n"])
        doc = sep.join(parts)
        if i % 4 == 0:
            doc += "\n\n" + rng.choice(_CODE)
        docs.append(doc)
    return docs


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------

def _bytelevel_tokenizer(spec: dict, corpus: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if spec["family"] == "qwen":
        # Qwen2: regex split first, then byte-level mapping without its own regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"],
        special_tokens=spec["specials"],
        # All 256 byte symbols up front, so any input is representable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _sentencepiece_tokenizer(spec: dict, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = spec["specials"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_trained = spec["vocab_size"] - len(specials) - len(byte_tokens)

    # 1) Train plain BPE on "▁"-marked text; splitting before each "▁" keeps
    #    merges from spanning words, like SentencePiece's split_by_whitespace.
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=n_trained, show_progress=False)
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    # 2) Rebuild with Gemma's layout: specials, 256 byte tokens, then pieces.
    vocab = {}
    for t in specials + byte_tokens + pieces:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                               unk_token=spec["unk"], fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Replace(" ", "▁")  # no dummy prefix, like Gemma
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = spec["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return tok


def _build_tokenizer(spec: dict):
    from transformers import PreTrainedTokenizerFast

    corpus = tiny_corpus()
    if spec["family"] == "sentencepiece":
        backend = _sentencepiece_tokenizer(spec, corpus)
    else:
        backend = _bytelevel_tokenizer(spec, corpus)
    kwargs = {k: spec[k] for k in ("eos", "bos", "pad", "unk") if spec[k] is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{k}_token": v for k, v in kwargs.items()},
        # HF's cleanup deletes spaces before punctuation: breaks round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def _build_model(spec: dict, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(
        vocab_size=len(tok),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    arch = spec["arch"]
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=arch == "llama-bias", **common))

    # Overwrite every parameter from a private generator: the constructor's
    # init uses global RNG state, which we neither trust nor want to touch.
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.startswith("lm_head"):
                # Larger than the usual 0.02 so next-token distributions are
                # peaked enough to make ensembling observable in tests.
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def _is_complete(path: Path) -> bool:
    marker = path / MARKER
    return marker.is_file() and marker.read_text().strip() == FORMAT_VERSION


def build_tiny_member(name: str, out_dir: str | Path) -> Path:
    """Build (or reuse) ``out_dir/<name>/`` and return that directory."""
    if name not in _SPECS:
        raise ValueError(f"unknown tiny member {name!r}; expected one of {TINY_MEMBERS}")
    out_dir = Path(out_dir)
    final = out_dir / name
    if _is_complete(final):
        return final
    out_dir.mkdir(parents=True, exist_ok=True)

    spec = _SPECS[name]
    # Build beside the target (same filesystem) so os.replace is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    try:
        tok = _build_tokenizer(spec)
        model = _build_model(spec, tok)
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)  # safetensors is the only format in transformers 5
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError("expected model.safetensors to be written")
        (tmp / MARKER).write_text(FORMAT_VERSION + "\n")  # last: marks completeness
        tmp.chmod(0o755)  # mkdtemp makes it private; members are meant to be shared

        if _is_complete(final):  # a concurrent builder finished first: keep theirs
            return final
        if final.exists():  # stale or incomplete build from an earlier version
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            # A concurrent builder won the race; use theirs if it is complete.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_members(out_dir: str | Path) -> dict[str, Path]:
    """Build (or reuse) all tiny members under ``out_dir``."""
    return {name: build_tiny_member(name, out_dir) for name in TINY_MEMBERS}


if __name__ == "__main__":  # python -m runtime.tiny_members OUT_DIR
    import sys

    for n, p in build_tiny_members(sys.argv[1] if len(sys.argv) > 1 else "tiny_members").items():
        print(n, p)
