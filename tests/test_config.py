"""Config validation: every error is one line naming the file and the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.members.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
[ensemble]
main = "a"
weights = "avg"

[[members]]
name = "a"
source = "tiny:tiny-sp"

[[members]]
name = "b"
source = "tiny:tiny-bpe"
"""


def write(tmp_path, text):
    path = tmp_path / "ens.toml"
    path.write_text(text)
    return path


def error_of(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_config_loads_with_main_first(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace('main = "a"', 'main = "b"')))
    assert [m.name for m in cfg.ordered_members] == ["b", "a"]
    assert cfg.member_weights() == [0.5, 0.5]
    assert cfg.eta == 0.15 and cfg.steps == 5 and cfg.mode == "fast"


def test_shipped_configs_load():
    for name in ("smol-gemma.toml", "tiny.toml", "smol-gemma-8k.toml", "tiny-tp.toml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.ordered_members[0].name == cfg.main


@pytest.mark.parametrize("config,hostfile", [
    ("70b-ensemble.toml", "a100x16"), ("llama3-qwen25-72b.toml", "a100x16"), ("tiny.toml", "localhost"),
    ("tiny-tp.toml", "localhost"), ("smol-gemma.toml", "localhost")])
def test_shipped_configs_lay_out_on_their_hostfiles_with_no_group_across_hosts(config, hostfile):
    """Every shipped config validates (the big ones' weights are not here: sources unchecked) and
    each member's tensor-parallel group lands on one host of the hostfile it is meant for."""
    from runtime.distributed.hostfile import place, read_hostfile
    from runtime.distributed.world import layout_for
    assert {p.name for p in (ROOT / "configs").glob("*.toml")} <= {
        "70b-ensemble.toml", "llama3-qwen25-72b.toml", "tiny.toml", "tiny-tp.toml", "smol-gemma.toml",
        "smol-gemma-8k.toml"}, "a new shipped config: add it here"
    cfg = load_config(ROOT / "configs" / config, check_sources=False)
    layout = layout_for(cfg)
    placed = place(layout, read_hostfile(ROOT / "hostfiles" / hostfile))
    for ranks in layout.ranks:
        assert len({placed[r][0] for r in ranks}) == 1
    if config.startswith(("70b", "llama3")):
        assert layout.world_size == 16 and {h for h, _ in placed} == {"node-a", "node-b"}
        assert all(m.dtype == "bfloat16" for m in cfg.members)


def test_a_group_across_hosts_is_refused_naming_the_member(tmp_path):
    from runtime.distributed.hostfile import place, read_hostfile
    from runtime.distributed.world import LayoutError, layout_for
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=3\nb slots=3\n")
    cfg = load_config(ROOT / "configs" / "tiny-tp.toml")  # tiny-sp tp 2, then two tp 1: 2 + 1 | 1
    place(layout_for(cfg), read_hostfile(hosts))
    hosts.write_text("a slots=1\nb slots=3\n")
    with pytest.raises(LayoutError, match="member 'tiny-sp' .* straddles hosts a, b"):
        place(layout_for(cfg), read_hostfile(hosts))
    hosts.write_text("a slots=two\n")
    with pytest.raises(LayoutError, match="hosts:1: expected 'HOST slots=N'"):
        read_hostfile(hosts)
    # two replicas of 4 ranks: 0-3 | 4-7; on 5 + 3 slots replica 1's tiny-sp group (4, 5) straddles
    hosts.write_text("a slots=4\nb slots=4\n")
    placed = place(layout_for(cfg).for_replica(0, 2), read_hostfile(hosts))
    assert [h for h, _ in placed] == ["a"] * 4 + ["b"] * 4
    hosts.write_text("a slots=5\nb slots=3\n")
    with pytest.raises(LayoutError, match=r"member 'tiny-sp' \(ranks 4-5\) straddles hosts a, b"):
        place(layout_for(cfg).for_replica(0, 2), read_hostfile(hosts))


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.replace('weights = "avg"', 'weights = "avg"\ntemprature = 2'),
     "ensemble.temprature: unknown key"),
    (lambda t: t.replace('source = "tiny:tiny-bpe"', 'source = "tiny:tiny-bpe"\ncolour = 1'),
     "members[1].colour: unknown key"),
    (lambda t: t.replace('source = "tiny:tiny-bpe"', 'source = "models/missing.gguf"'),
     "members[1].source: no such file or directory"),
    (lambda t: t.replace('main = "a"', 'main = "zeta"'),
     "ensemble.main: no member named 'zeta'"),
    (lambda t: t.replace('weights = "avg"', 'weights = { a = 0.7, b = 0.4 }'),
     "ensemble.weights: must sum to 1, got 1.1"),
    (lambda t: t.replace('weights = "avg"', 'weights = { a = 1.0 }'),
     "ensemble.weights: no weight for member 'b'"),
    (lambda t: t.replace('weights = "avg"', 'weights = { a = 0.5, c = 0.5 }'),
     "ensemble.weights.c: no member named 'c'"),
    (lambda t: t.replace('weights = "avg"', 'weights = "median"'), "ensemble.weights: must be"),
    (lambda t: t.replace('weights = "avg"', 'eta = "fast"'), "ensemble.eta: must be a number"),
    (lambda t: t.replace('weights = "avg"', 'steps = 0'), "ensemble.steps: must be a positive"),
    (lambda t: t.replace('weights = "avg"', 'mode = "quick"'), "ensemble.mode: must be"),
    (lambda t: t.replace('source = "tiny:tiny-bpe"', 'source = "tiny:tiny-bpe"\ntp_size = 0'),
     "members[1].tp_size: must be a positive integer"),
    (lambda t: t.replace('source = "tiny:tiny-bpe"', 'source = "tiny:tiny-bpe"\ntemplate = "x"'),
     "members[1].template: must contain {prompt}"),
    (lambda t: t.replace('source = "tiny:tiny-bpe"', 'source = "pypi:llama-9000"'),
     "members[1].source: unknown PyPI model"),
    (lambda t: t.replace('name = "b"', 'name = "a"'), "members[1].name: duplicate member name"),
    (lambda t: t + "\n[anchors]\nmax_support = 0\n", "anchors.max_support: must be a positive"),
    (lambda t: t + "\n[anchors]\nrow_product = \"int8\"\n", "anchors.row_product: must be one of auto, fp32, bf16"),
    (lambda t: t + "\n[anchors]\nskip_agreeing = 1\n", "anchors.skip_agreeing"),
    (lambda t: t + "\n[extras]\n", "extras: unknown key"),
    (lambda t: t.replace("[ensemble]", "[ensemble\n"), "not valid TOML"),
])
def test_errors_name_the_key(tmp_path, edit, expected):
    message = error_of(tmp_path, edit(GOOD))
    assert expected in message, message
    assert str(tmp_path / "ens.toml") in message


def test_file_source_resolves_relative_to_config(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    cfg = load_config(write(tmp_path, GOOD.replace('source = "tiny:tiny-bpe"', 'source = "m.gguf"')))
    assert cfg.members[1].source == str(tmp_path / "m.gguf")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, GOOD.replace('main = "a"', 'main = "zeta"'))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "anchors", "build", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "ensemble.main: no member named 'zeta'" in lines[-1]
    assert len([l for l in lines if l.startswith("error")]) == 1
