"""The Python API: load an ensemble from its TOML file once, then generate as often as needed
(in the style of vLLM's `LLM.generate`). Results have the fields of `deepen generate`'s JSON lines.

    from runtime import Ensemble

    ensemble = Ensemble("configs/smol-gemma.toml")
    for out in ensemble.generate(["Question: Who wrote Hamlet?\\nAnswer:"], max_new_tokens=12, stop="\\n"):
        print(out["completion"], out["finish_reason"], out["fused_steps"])
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .engine.engine import Engine
from .engine.sequence import Request, Result
from .engine.sampling import SamplingParams
from .jobs.files import expand_samples, parse_request
from .members.config import METHODS, EnsembleConfig, load_config
from .members.devices import pick_device
from .members.ensemble import anchors_entry, load_members, make_fuser, single_fuser


class Ensemble:
    """An ensemble, loaded: its members' models and tokenizers, anchors and fuser.

    config: a TOML path (or a loaded EnsembleConfig). member: run that member alone, through the
    same engine (its own greedy decoding). mode ("fast" | "exact"), eta, method ("deepen" |
    "unite" | "gac", docs/methods.md) and gate override the config.
    device: "cpu", "cuda" or "cuda:N" for every member and the fusion (default: CUDA if
    present). Anchors are built on first use if the cache lacks them (minutes for large
    vocabularies)."""

    def __init__(self, config: str | Path | EnsembleConfig, *, member: str | None = None,
                 mode: str | None = None, eta: float | None = None, device: str | None = None,
                 home: Path | None = None, log=lambda message: None, method: str | None = None,
                 gate: float | None = None):
        cfg = config if isinstance(config, EnsembleConfig) else load_config(config)
        if method is not None:
            if method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
            cfg = dataclasses.replace(cfg, method=method)
        if gate is not None:
            if not 0 <= gate <= 1:
                raise ValueError(f"gate must be in [0, 1], got {gate}")
            cfg = dataclasses.replace(cfg, gate=gate)
        if eta is not None:
            if not eta >= 0:
                raise ValueError(f"eta must be >= 0, got {eta}")
            cfg = dataclasses.replace(cfg, eta=eta)
        if member is not None:
            names = [m.name for m in cfg.members]
            if member not in names:
                raise ValueError(f"no member named {member!r} (members: {', '.join(names)})")
            cfg = dataclasses.replace(cfg, main=member, members=tuple(m for m in cfg.members if m.name == member))
        self.config = cfg
        self.device = pick_device(device)
        self.members = load_members(cfg, home=home, log=log, device=self.device)
        self.fuser = single_fuser(self.members) if member is not None else \
            make_fuser(cfg, self.members, anchors_entry(cfg, self.members, home, log=log), mode)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def run(self, requests: list[Request], batch: int = 8, on_result=None) -> list[Result]:
        """Decode requests (continuous batching, `batch` rows in flight); results in the order
        rows finish, each also passed to `on_result` the moment it does."""
        engine = Engine(self.members, self.fuser, max_batch=batch)
        self.last_engine = engine
        return engine.run(requests, on_result)

    def generate(self, prompts, *, max_new_tokens: int = 64, stop: str | list[str] = (),
                 batch: int = 8, on_result=None, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, n: int = 1, logprobs: int | None = None,
                 job_seed: int = 0) -> list[dict]:
        """prompts: a string, or a list of strings or of dicts with the JSON-lines fields (`id`,
        `prompt`, and optionally `max_new_tokens`, `stop`, the sampling fields and fields of your
        own). Returns one record per prompt (per sample with n > 1: ids `<id>#<k>`), in the
        order given: id (a string's index), completion, tokens, finish_reason (eos | stop |
        length), member_tokens, fused_steps, logprobs (when asked for), your fields.
        temperature 0 is greedy decoding; otherwise tokens are drawn from the fused distribution
        after top_k and top_p, reproducibly from `seed` (default: from job_seed and the id);
        logprobs=k adds each token's log-probability, fused and under the main model alone, and
        the k most likely alternatives (engine/sampling.py)."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        sampling = SamplingParams(temperature, top_p, top_k, seed, n, logprobs).check()
        requests = []
        for i, item in enumerate(items):
            obj = {"id": i, "prompt": item} if isinstance(item, str) else item
            requests.extend(expand_samples(parse_request(obj, f"prompts[{i}]", max_new_tokens, stop, sampling),
                                           job_seed))
        if len({r.id for r in requests}) < len(requests):
            raise ValueError("prompts: ids must be unique")
        order = {r.id: k for k, r in enumerate(requests)}
        results = self.run(requests, batch, None if on_result is None else lambda r: on_result(r.record()))
        return [r.record() for r in sorted(results, key=lambda r: order[r.request.id])]
