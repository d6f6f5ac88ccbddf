"""UniTE and GaC (deepen/unite.py, deepen/gac.py) against their decision rules re-stated from the
authors' code (helpers/methods_reference.py), the union maps, the gate, and the engine around them
(batching, sampling, log-probabilities), on the tiny members (three tokenizer families)."""
import dataclasses
import re

import pytest
import torch

from helpers import methods_reference as ref
from runtime.deepen.gac import GaCFuser
from runtime.deepen.gate import Gate
from runtime.deepen.union import load_union
from runtime.deepen.unite import UniTEFuser
from runtime.engine.engine import Engine
from runtime.engine.sampling import SamplingParams
from runtime.engine.sequence import Request
from runtime.members.ensemble import anchors_entry, make_fuser, union_entry

PROMPTS = ["the cat sat on", "a dog", "café 日本 and", "my friend said", "code: def f(x):", "the model",
           "this system is", "hello hello"]


@pytest.fixture(scope="module")
def union(tiny):
    cfg = dataclasses.replace(tiny.cfg, method="gac")
    return cfg, union_entry(cfg, tiny.members, tiny.home, log=lambda *a: None)


@pytest.fixture(scope="module")
def vocabs(tiny):
    return [ref.Vocabulary(m.tokenizer) for m in tiny.members]


def random_steps(tiny, n_batches: int, rows: int = 8, seed: int = 0):
    """Member logits for n_batches x rows random rows: flat and peaked, some rows where the
    members' favourites are the same string (their top token made the same bytes)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [m.model.get_output_embeddings().weight.shape[0] for m in tiny.members]
    for b in range(n_batches):
        scale = [0.5, 2.0, 6.0, 12.0][b % 4]
        yield [torch.randn(rows, v, generator=g) * scale for v in sizes]


def mismatches(got: list[int], want: list[tuple[int, float]]) -> list:
    return [(i, g, w) for i, (g, (w, lead)) in enumerate(zip(got, want)) if g != w]


def test_the_union_maps_are_the_references_strings_and_ids(tiny, union, vocabs):
    """Every union entry: its bytes are some member's token, each member's id for it is the one the
    re-statement gives it (its own token, else the first token of its encoding), and the cache is
    reused."""
    cfg, entry = union
    maps = load_union(entry)
    u = ref.Union(vocabs)
    assert maps.size == len(u.strings) and maps.eos == len(u.strings) - 1
    for i, v in enumerate(vocabs):
        want = torch.tensor([-1 if v.id_for(b) is None else v.id_for(b) for b in u.strings])
        assert torch.equal(maps.from_union[i], want), i
        assert torch.equal(maps.to_union[i], torch.tensor(u.entry[i])), i
        assert int(maps.exact[i].sum()) == sum(1 for b in u.strings if b in v.ids)
    assert union_entry(cfg, tiny.members, tiny.home, build=False) == entry


def test_unite_matches_its_restated_reference_on_512_random_rows(tiny, union, vocabs):
    cfg, entry = union
    fuser = UniTEFuser(load_union(entry), [1 / 3] * 3, k=10)
    got, want = [], []
    for logits in random_steps(tiny, 64):
        got += fuser.step(logits).tokens.tolist()
        want += [ref.unite(vocabs, [z[r] for z in logits], fuser.weights, 10) for r in range(len(logits[0]))]
    assert len(got) == 512 and mismatches(got, want) == []


def test_gac_matches_its_restated_reference_on_512_random_rows(tiny, union, vocabs):
    """Exact mode: every row. Fast mode: every row it does not count as undecided."""
    cfg, entry = union
    maps = load_union(entry)
    u = ref.Union(vocabs)
    exact = GaCFuser(maps, [0.5, 0.3, 0.2], mode="exact")
    fast = GaCFuser(maps, [0.5, 0.3, 0.2], mode="fast", max_support=32, mass_epsilon=1e-3)
    got, quick, undecided, want = [], [], [], []
    for logits in random_steps(tiny, 64, seed=1):
        got += exact.step(logits).tokens.tolist()
        result = fast.step(logits)
        quick += result.tokens.tolist()
        undecided += result.stats["undecided"].tolist()
        want += [ref.gac(u, [z[r] for z in logits], exact.weights) for r in range(len(logits[0]))]
    assert len(got) == 512 and mismatches(got, want) == []
    differ = [i for i, (a, b) in enumerate(zip(quick, got)) if a != b]
    assert all(undecided[i] for i in differ), differ
    assert 0 < sum(undecided) < 512 and int(fast.undecided_rows) == sum(undecided)


def test_the_gate_fuses_only_where_the_gate_member_is_unsure(tiny, union):
    cfg, entry = union
    maps = load_union(entry)
    logits = list(random_steps(tiny, 3, seed=2))[2]   # peaked rows: some sure, some not
    top = [torch.softmax(z, -1).amax(-1) for z in logits]
    for member in (0, 1):
        for fuser in (UniTEFuser(maps, [1 / 3] * 3, gate=Gate(0.5, member)),
                      GaCFuser(maps, [1 / 3] * 3, gate=Gate(0.5, member))):
            result = fuser.step(logits)
            assert torch.equal(result.fused, top[member] <= 0.5)
            assert torch.equal(result.tokens[~result.fused], logits[0].argmax(-1)[~result.fused])
    closed = GaCFuser(maps, [1 / 3] * 3, gate=Gate(0.0)).step(logits)
    assert not closed.fused.any() and torch.equal(closed.tokens, logits[0].argmax(-1))


@pytest.mark.parametrize("method", ["unite", "gac"])
def test_batching_never_changes_a_row(tiny, method):
    """The engine at batch 8 (rows joining and leaving) gives each prompt the tokens it gets alone."""
    cfg = dataclasses.replace(tiny.cfg, method=method, mode="fast")
    fuser = make_fuser(cfg, tiny.members, anchors_entry(cfg, tiny.members, tiny.home))
    requests = [Request(i, p, 6 + i) for i, p in enumerate(PROMPTS)]
    together = {r.request.id: r.ids for r in Engine(tiny.members, fuser, 8).run(requests)}
    alone = {r.request.id: r.ids for q in requests for r in Engine(tiny.members, fuser, 1).run([q])}
    assert together == alone
    assert int(fuser.rows_fused_here) > 0


def test_sampling_draws_from_the_fused_distribution(tiny, union, vocabs):
    """A sampled row's token and its log-probability come from the method's fused distribution
    carried over to the main member's ids (re-stated here); the top alternatives are its largest."""
    from runtime.engine.sampling import Sampler
    cfg, entry = union
    maps, u = load_union(entry), ref.Union(vocabs)
    logits = list(random_steps(tiny, 2, seed=4))[1]
    rows = len(logits[0])
    sampler = lambda: Sampler([SamplingParams(temperature=1.0, seed=r, logprobs=3) for r in range(rows)],  # noqa: E731
                              list(range(rows)), [0] * rows)
    for fuser in (UniTEFuser(maps, [1 / 3] * 3), GaCFuser(maps, [1 / 3] * 3, mode="exact")):
        result = fuser.step(logits, sampler=sampler())
        for r in range(rows):
            carried = {}
            z = [x[r] for x in logits]
            if isinstance(fuser, UniTEFuser):
                ref.unite(vocabs, z, fuser.weights, 10, carried=carried)
            else:
                ref.gac(u, z, fuser.weights, carried=carried)
            token, record = int(result.tokens[r]), result.logprobs[r]
            total = sum(carried.values())   # what special tokens (no string) held is left out
            assert carried.get(token, 0.0) > 0
            assert record["logprob"] == pytest.approx(torch.tensor(carried[token] / total).log().item(), abs=1e-5)
            best = sorted(carried.values(), reverse=True)[:3]
            assert [v for _, v in record["top"]] == pytest.approx([torch.tensor(b / total).log().item() for b in best],
                                                                   abs=1e-5)
        assert torch.equal(fuser.step(logits, sampler=sampler()).tokens, result.tokens)   # seeded


def test_include_reads_the_fused_probability_of_chosen_ids(tiny, union, vocabs):
    """Choice mode's letters: UniTE adds them to the union; GaC reads whole distributions. The
    include logits are the log fused probabilities of those ids (re-stated here for GaC)."""
    cfg, entry = union
    maps = load_union(entry)
    logits = list(random_steps(tiny, 1, seed=3))[0]
    include = torch.tensor([10, 20, 30])
    got = GaCFuser(maps, [1 / 3] * 3).step(logits, include=include).include_logits
    for r in range(len(logits[0])):
        merged = {}
        for i, (z, v) in enumerate(zip(logits, vocabs)):
            p = torch.softmax(z[r].double(), -1)
            for t, b in enumerate(v.strings):
                if b is not None:
                    merged[b] = merged.get(b, 0.0) + p[t].item() / 3
        carried = {}
        for b, pb in merged.items():
            t = vocabs[0].id_for(b)
            carried[t] = carried.get(t, 0.0) + pb
        assert got[r].exp().tolist() == pytest.approx([carried.get(t, 0.0) for t in include.tolist()], rel=1e-4)
    picked = UniTEFuser(maps, [1 / 3] * 3).step(logits, include=include).include_logits
    assert torch.isfinite(picked).all()


@pytest.mark.real
def test_the_real_pairs_steps_match_the_restated_references():
    """Gemma-3 (main) + SmolLM2 decoding 16 TriviaQA questions (0-shot), up to 32 tokens, through
    the engine with GaC (fast mode); at every step, every row checked (at least 300; with the 512
    random rows of each method's own test, over 800 steps per method): GaC fast (the
    engine's choice) and GaC exact against GaC's re-statement, fast wherever it does not count the
    row undecided, and UniTE on the same logits against UniTE's."""
    from runtime.bench.measure import zero_shot_prompts
    from runtime.members.config import load_config
    from runtime.members.ensemble import load_members
    from runtime.members.sources import deepen_home
    cfg = dataclasses.replace(load_config("configs/smol-gemma.toml"), method="gac")
    members = load_members(cfg, log=lambda *a: None)
    vocabs = [ref.Vocabulary(m.tokenizer) for m in members]
    u = ref.Union(vocabs)
    fuser = make_fuser(cfg, members, anchors_entry(cfg, members, deepen_home(), log=lambda *a: None))
    entry = union_entry(cfg, members, build=False)
    exact = make_fuser(dataclasses.replace(cfg, mode="exact"), members, entry)
    unite = make_fuser(dataclasses.replace(cfg, method="unite"), members, entry)
    seen = []
    finish = fuser.finish

    def checked(p):
        result = finish(p)
        z = [p.logits[i] for i in sorted(p.logits)]
        whole, other = exact.step(z).tokens, unite.step(z).tokens
        for r in range(len(z[0])):
            row = [x[r] for x in z]
            seen.append((int(result.tokens[r]), int(whole[r]), ref.gac(u, row, fuser.weights)[0],
                         bool(result.stats["undecided"][r]),
                         int(other[r]), ref.unite(vocabs, row, unite.weights, unite.k)[0]))
        return result
    fuser.finish = checked
    Engine(members, fuser, 16).run([Request(i, p, 32) for i, p in enumerate(zero_shot_prompts(16))])
    assert len(seen) >= 300
    assert [s[1] for s in seen] == [s[2] for s in seen]                 # GaC exact: every row
    assert all(s[0] == s[2] or s[3] for s in seen)                       # GaC fast: every decided row
    assert [s[4] for s in seen] == [s[5] for s in seen]                 # UniTE: every row
    print(f"rows checked {len(seen)}; GaC fast: undecided {sum(s[3] for s in seen)}, differing from exact "
          f"{sum(s[0] != s[1] for s in seen)}; strings Gemma-3 has no token for: GaC {int(fuser.partial_rows)}, "
          f"UniTE {int(unite.partial_rows)}")


# ---- the harness: names, dev's choice, no-fusion twins ---------------------------------------------

def test_method_names_carry_their_swept_settings():
    from runtime.evaluation.methods import method_settings, parse_methods
    names = ["main", "assist"]
    got = parse_methods("deepen-avg,unite,gac", names, [0.0, 0.15], [0.5, 1.0], [5, 10])
    assert got == ["deepen-avg@0g0.5", "deepen-avg@0g1", "deepen-avg@0.15g0.5", "deepen-avg@0.15g1",
                   "unite@k5g0.5", "unite@k5g1", "unite@k10g0.5", "unite@k10g1", "gac@g0.5", "gac@g1"]
    assert parse_methods("gac,unite", names, [0.15], [0.9]) == ["gac", "unite"]   # one value: no suffix
    assert [method_settings(m) for m in ("deepen-avg@0.15g0.5", "unite@k5", "gac", "deepen-avg@1e-05")] == [
        ("deepen-avg", {"eta": 0.15, "gate": 0.5}), ("unite", {"k": 5}), ("gac", {}), ("deepen-avg", {"eta": 1e-05})]


def test_dev_choice_is_the_best_setting_and_ties_go_to_less_fusion(tmp_path):
    from runtime.evaluation.methods import best_dev, write_summary
    from runtime.evaluation.tasks import TASKS
    folder = tmp_path / "piqa-dev"
    folder.mkdir()
    for name, acc, setting in (("gac@g0", 0.50, {"gate": 0.0}), ("gac@g0.5", 0.53, {"gate": 0.5}),
                               ("gac@g1", 0.53, {"gate": 1.0}), ("unite@k5g1", 0.40, {"k": 5, "gate": 1.0}),
                               ("unite@k10g1", 0.45, {"k": 10, "gate": 1.0})):
        write_summary(folder, name, {"accuracy": acc, **setting})
    assert best_dev(tmp_path, TASKS["piqa"], "gac") == {"gate": 0.5}
    assert best_dev(tmp_path, TASKS["piqa"], "unite") == {"k": 10, "gate": 1.0}
    with pytest.raises(ValueError, match="no deepen-avg results"):
        best_dev(tmp_path, TASKS["piqa"], "deepen-avg")


def test_a_setting_that_never_fuses_decodes_as_the_main_member_alone(tiny, tmp_path):
    """gate 0 (and DEEPEN at eta 0) take the main member's token on every row: the run reuses
    single:<main>'s texts (marked decoded_as), and decoding it on its own gives them token for token."""
    from runtime.evaluation.methods import method_fusers
    from runtime.evaluation.run import Evaluation
    from runtime.evaluation.tasks import TASKS, load_questions
    from runtime.jobs.files import read_jsonl
    task = TASKS["triviaqa"]
    questions = load_questions(task, "dev", limit=4)

    def make(kind):
        cfg = dataclasses.replace(tiny.cfg, method=kind, mode="fast")
        return make_fuser(cfg, tiny.members, anchors_entry(cfg, tiny.members, tiny.home))

    def evaluate(folder, methods):
        fusers = method_fusers(methods, tiny.members, make, 0.3, None)
        run = Evaluation(task, "dev", questions, tiny.members, folder, methods, fusers, "generate",
                         {"eta": 0.3, "max_new_tokens": 5}, batch=4, progress=False, log=lambda m: None)
        run.run()
        return {m: read_jsonl(run.path(m)) for m in methods}

    main = f"single:{tiny.members[0].name}"
    both = evaluate(tmp_path / "both", [main, "gac@g0", "unite@g0", "deepen-avg@0", "gac@g1"])
    alone = evaluate(tmp_path / "alone", ["unite@g0", "gac@g1"])
    texts = lambda rows: {r["id"]: (r["prediction"], r["tokens"]) for r in rows}  # noqa: E731
    for m in ("gac@g0", "unite@g0", "deepen-avg@0"):
        assert all(r["decoded_as"] == main for r in both[m]) and texts(both[m]) == texts(both[main])
    assert texts(alone["unite@g0"]) == texts(both[main]) and not any(r["fused_steps"] for r in alone["unite@g0"])
    assert "decoded_as" not in both["gac@g1"][0] and any(r["fused_steps"] for r in both["gac@g1"])
    assert texts(alone["gac@g1"]) == texts(both["gac@g1"])


# ---- the config ------------------------------------------------------------------------------------

CONFIG = """
[ensemble]
main = "a"
{extra}
[[members]]
name = "a"
source = "tiny:tiny-sp"
[[members]]
name = "b"
source = "tiny:tiny-bpe"
"""


@pytest.mark.parametrize("extra,message", [
    ('method = "blend"', "ens.toml: ensemble.method: must be one of 'deepen', 'unite', 'gac', got 'blend'"),
    ("unite_k = 0", "ensemble.unite_k: must be a positive integer, got 0"),
    ('unite_k = "ten"', "ensemble.unite_k: must be an integer, got str 'ten'"),
    ("gate = 1.5", "ensemble.gate: must be a probability in [0, 1]"),
    ('gate_member = "c"', "ensemble.gate_member: no member named 'c' (members: a, b)"),
])
def test_the_methods_keys_are_validated_naming_the_key(tmp_path, extra, message):
    from runtime.members.config import ConfigError, load_config
    path = tmp_path / "ens.toml"
    path.write_text(CONFIG.format(extra=extra))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_the_methods_keys_default_to_deepen_and_the_authors_settings(tmp_path):
    from runtime.members.config import load_config
    path = tmp_path / "ens.toml"
    path.write_text(CONFIG.format(extra=""))
    cfg = load_config(path)
    assert (cfg.method, cfg.unite_k, cfg.gate, cfg.gate_index) == ("deepen", 10, 1.0, 0)
    path.write_text(CONFIG.format(extra='method = "gac"\ngate = 0.5\ngate_member = "b"'))
    cfg = load_config(path)
    assert (cfg.method, cfg.gate, cfg.gate_index) == ("gac", 0.5, 1)


def test_the_python_api_runs_each_method(tiny, monkeypatch):
    """Ensemble(config, method=...): the same fuser as the config's key would give."""
    from runtime.api import Ensemble
    monkeypatch.setenv("DEEPEN_HOME", str(tiny.home))
    outs = {m: Ensemble("configs/tiny.toml", method=m, gate=0.9).generate(PROMPTS[:2], max_new_tokens=4)
            for m in ("unite", "gac")}
    for method, out in outs.items():
        cfg = dataclasses.replace(tiny.cfg, method=method, gate=0.9)
        fuser = make_fuser(cfg, tiny.members, anchors_entry(cfg, tiny.members, tiny.home))
        want = Engine(tiny.members, fuser, 8).run([Request(i, p, 4) for i, p in enumerate(PROMPTS[:2])])
        assert [o["completion"] for o in out] == [r.text for r in sorted(want, key=lambda r: r.request.id)]
    with pytest.raises(ValueError, match="method must be one of"):
        Ensemble("configs/tiny.toml", method="blend")
