"""The tiny members (random weights, three tokenizer families) shared by the engine and eval
tests: built once per session in a temporary DEEPEN_HOME, with their anchors."""
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Tiny(NamedTuple):
    cfg: object
    members: list
    entry: dict
    home: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    from runtime.members.config import load_config
    from runtime.members.ensemble import anchors_entry, load_members
    home = tmp_path_factory.mktemp("tiny-home")
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    members = load_members(cfg, home=home, log=lambda *a: None)
    return Tiny(cfg, members, anchors_entry(cfg, members, home, progress=False), home)
