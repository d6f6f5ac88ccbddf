"""Random-weight members with the real members' shapes, for timing where the real weights and
tokenizers cannot go (a GPU machine with no network): Gemma-3-270M (262,144 tokens, d 640, 18
layers) and SmolLM2-135M (49,152 tokens, d 576, 30 layers), each with a synthetic byte-level BPE
vocabulary of its size. The two vocabularies share their first `shared` merges, so the anchors
number about as many as the real pair's (~46k). Random weights write random text: these members
are for speed, never for accuracy or agreement.

    python -m runtime.bench.synthetic --out /tmp/shapes [--dtype bfloat16]   # -> /tmp/shapes/shapes.toml
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SHAPES = {  # the real members' config.json, the sizes that set the cost
    "gemma3-270m": ("gemma3_text", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=256, sliding_window=512, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=64, tie_word_embeddings=True)),
}
EOS = "<|endoftext|>"


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    from ..deepen.vocab import byte_level_decoder
    return sorted(byte_level_decoder(), key=byte_level_decoder().__getitem__)


def synthetic_merges(size: int, shared: int, seed: int, shared_seed: int = 0, longest: int = 16):
    """A BPE vocabulary of `size` tokens (EOS, the 256 bytes, then merges of two earlier tokens):
    the first `shared` merges come from `shared_seed` (the same in every member), the rest from
    `seed`. Returns (vocab {token: id}, merges [(a, b)])."""
    tokens = [EOS] + byte_chars()
    known = set(tokens)
    merges = []
    rng, switched = random.Random(shared_seed), False
    while len(tokens) < size:
        if len(merges) >= shared and not switched:
            rng, switched = random.Random(seed), True
        # a long piece and a short one: lengths grow slowly, as in a trained vocabulary
        a, b = tokens[rng.randrange(1, len(tokens))], tokens[rng.randrange(1, min(len(tokens), 4096))]
        if len(a) + len(b) > longest or a + b in known:
            continue
        merges.append((a, b))
        tokens.append(a + b)
        known.add(a + b)
    return {t: i for i, t in enumerate(tokens)}, merges


def synthetic_tokenizer(size: int, shared: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab, merges = synthetic_merges(size, shared, seed)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def build_member(name: str, out: Path, dtype: str, shared: int, seed: int, scale: float = 1.0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..members.sources import quiet_bars_off_terminal
    quiet_bars_off_terminal()
    model_type, sizes = SHAPES[name]
    if scale != 1.0:   # a smoke test: smaller vocabularies, fewer layers
        sizes = dict(sizes, vocab_size=max(1024, int(sizes["vocab_size"] * scale)),
                     num_hidden_layers=max(2, int(sizes["num_hidden_layers"] * scale)))
    path = out / name
    done = {"shape": name, "dtype": dtype, "seed": seed, "scale": scale}
    if (path / ".complete").is_file() and json.loads((path / ".complete").read_text()) == done:
        return path
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **sizes, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    synthetic_tokenizer(sizes["vocab_size"], shared, seed).save_pretrained(path)
    (path / ".complete").write_text(json.dumps(done))
    return path


def build(out: Path, dtype: str = "bfloat16", shared: int = 45000, eta: float = 0.15, scale: float = 1.0) -> Path:
    """Both members and an ensemble config (Gemma-3-shaped main, as configs/smol-gemma.toml);
    `scale` < 1 shrinks vocabularies, shared merges and layers (a smoke test)."""
    out.mkdir(parents=True, exist_ok=True)
    shared = int(shared * scale) if scale != 1.0 else shared
    paths = {name: build_member(name, out, dtype, shared, seed, scale) for seed, name in enumerate(SHAPES, start=1)}
    members = "".join(f'\n[[members]]\nname = "{n}"\nsource = "{p}"\ndtype = "{dtype}"\n' for n, p in paths.items())
    config = out / "shapes.toml"
    config.write_text(f'# random-weight members of the real pair\'s shapes (runtime/bench/synthetic.py)\n'
                      f'[ensemble]\nmain = "gemma3-270m"\neta = {eta}\nmode = "fast"\n{members}')
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shared", type=int, default=45000, help="merges the two vocabularies share")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink the vocabularies, the shared merges and the layers (a smoke test: 0.02)")
    args = parser.parse_args()
    print(build(args.out, args.dtype, args.shared, scale=args.scale))


if __name__ == "__main__":
    main()
