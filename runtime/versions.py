"""The versions of transformers and DeepSpeed this runtime is tested with, checked when a command
or a job starts: outside them, one line naming the package, the version found and the one needed.

- transformers >= 5.24: the lanes pass a (B, 1) tensor as `logits_to_keep`, which earlier
  versions do not slice per row (they crash inside `Lane.admit`).
- deepspeed 0.19.8: sharded loading reads AutoTP's `_partition_sizes` and `tp_index`, and the
  CPU path replaces its shared-memory all-reduce builder (runtime/distributed/).

`setup.cfg` pins the same ranges (a test keeps them equal). DEEPEN_UNTESTED_VERSIONS=1 turns a
version outside the range into a warning (a package that is missing stays an error)."""
from __future__ import annotations

import importlib.metadata
import os

TESTED = {"transformers": ">=5.24,<6", "deepspeed": "==0.19.8"}
OVERRIDE = "DEEPEN_UNTESTED_VERSIONS"


def installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem(package: str, found: str | None) -> str | None:
    """One line if `found` (None: not installed) is outside the tested range, else None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    need = TESTED[package]
    fix = f"pip install '{package}{need}'"
    if found is None:
        return f"{package} is not installed; this runtime needs {package}{need}: {fix}"
    try:
        ok = Version(found) in SpecifierSet(need)
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"{package} {found} is installed, but this runtime needs {package}{need} (the versions it is tested "
            f"with): {fix}, or set {OVERRIDE}=1 to run anyway")


def check_versions(packages=("transformers", "deepspeed"), found: dict | None = None, warn=None) -> str | None:
    """The first problem among `packages` as one line, or None. `found`: package -> version
    (default: what is installed). With DEEPEN_UNTESTED_VERSIONS=1 a version outside the range is
    passed to `warn` instead (a missing package is still a problem)."""
    for package in packages:
        version = found[package] if found is not None else installed(package)
        problem = version_problem(package, version)
        if problem is None:
            continue
        if version is not None and os.environ.get(OVERRIDE) == "1":
            if warn is not None:
                warn(f"warning: {package} {version} is outside the tested {package}{TESTED[package]} ({OVERRIDE}=1)")
            continue
        return problem
    return None
