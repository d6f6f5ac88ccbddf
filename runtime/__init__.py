"""deepen-runtime: DEEPEN ensembles of LLMs with different vocabularies (docs/design.md has
the map of packages). The Python API is `runtime.Ensemble` (runtime/api.py)."""


def __getattr__(name):  # lazy: `import runtime.members.config` must not load torch
    if name == "Ensemble":
        from .api import Ensemble
        return Ensemble
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
