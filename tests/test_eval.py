"""Evaluation: scoring functions on hand-made predictions (exact), prompts in the paper's format,
and `deepen eval` / `deepen report` end to end on the tiny members."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.evaluation.baselines import MinEDFuser, mbr, min_edit_map, vote
from runtime.evaluation.methods import adapt_rule, letter_ids, parse_methods
from runtime.evaluation.run import prefill
from runtime.deepen.fusion import FastSettings
from runtime.jobs.files import read_jsonl
from runtime.evaluation.report import table
from runtime.evaluation.tasks import (TASKS, build_prompt, exact_match, extract, extract_gsm8k, gold, gold_letter,
                           load_questions, normalize_answer, parse_letter, score, token_f1)

ROOT = Path(__file__).resolve().parents[1]


# ---- scoring: pure functions ------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("The Beatles", "beatles"), ("  a   Tale of Two  Cities. ", "tale of two cities"),
    ("Sunset Blvd.", "sunset blvd"), ("AN apple, the end!", "apple end"), ("theatre", "theatre"),
    ("U.S.A.", "usa"), ("", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_over_aliases():
    aliases = ["Sunset Blvd", "Sunset Boulevard", "West Sunset Boulevard"]
    assert exact_match(" sunset boulevard.", aliases)
    assert exact_match("The Sunset Blvd", aliases)
    assert not exact_match("Sunset", aliases)
    assert not exact_match("Sunset Boulevard musical", aliases)
    q = {"answer": ["Paris"]}
    assert score(TASKS["triviaqa"], extract(TASKS["triviaqa"], " Paris\n"), gold(TASKS["triviaqa"], q))


@pytest.mark.parametrize("text,want", [
    ("She sells 9 * 2 = $18.\nTherefore, the answer is 18", "18"),
    ("The answer is $1,000.", "1000"), ("the answer is: 4.50", "4.5"), ("The answer is -3", "-3"),
    ("The answer is 7.", "7"), ("The answer is 12 apples. Wait, the answer is 13", "13"),
    ("So 5 + 5 = 10", None), ("The answer is unknown", None), ("The answer is 0.25", "0.25"),
])
def test_gsm8k_extraction(text, want):
    assert extract_gsm8k(text) == want


def test_gsm8k_gold_from_reasoning():
    q = {"question": "x", "answer": "2 + 2 = 4\nThe answer is 4"}
    assert gold(TASKS["gsm8k"], q) == "4"
    assert score(TASKS["gsm8k"], extract(TASKS["gsm8k"], " 4 apples.\nThe answer is 4.0"), "4")


@pytest.mark.parametrize("text,want", [
    (" B", "B"), ("B.", "B"), (" (C) because", "C"), ("D) ten", "D"), ("Answer: A", "A"),
    ("The answer is C.", "C"), (" A\nQuestion", "A"), (" Because", None), ("E", None), ("", None),
    ("a", None), (" AB", None),
])
def test_parse_letter(text, want):
    assert parse_letter(text, "ABCD") == want


def test_parse_letter_respects_the_options():
    assert parse_letter(" C", "AB") is None and parse_letter(" B", "AB") == "B"


def test_gold_letter_maps_arc_digits():
    task = TASKS["arc_challenge"]
    assert gold_letter(task, {"answer": "3"}) == "C"
    assert gold_letter(task, {"answer": "B"}) == "B"
    with pytest.raises(ValueError, match="not one of the options"):
        gold_letter(TASKS["piqa"], {"answer": "C"})


def test_token_f1():
    assert token_f1("the Eiffel Tower", "Eiffel tower") == 1.0
    assert token_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0


def test_vote_and_mbr_tie_rules():
    assert vote(["A", "B", "B"], [0, 1, 2]) == "B"
    assert vote(["A", "B"], [1, 0]) == "B"          # a tie goes to the first in tie order
    assert vote([None, "C"], [0, 1]) == "C"         # no answer never wins
    assert vote([None, None], [0, 1]) is None
    assert mbr(["Paris", "Paris France", "London"], token_f1, [2, 1, 0]) == "Paris France"
    assert mbr(["Rome", "Oslo"], token_f1, [1, 0]) == "Oslo"


def test_adapt_rule():
    w = adapt_rule({"a": 0.45, "b": 0.25}, chance=0.25)
    assert w["a"] == pytest.approx(0.21 / 0.22) and w["b"] == pytest.approx(0.01 / 0.22)
    assert adapt_rule({"a": 0.2, "b": 0.1}, chance=0.25) == {"a": 0.5, "b": 0.5}
    assert sum(adapt_rule({"a": 0.1, "b": 0.3, "c": 0.0}, 0.0).values()) == pytest.approx(1)


def test_parse_methods():
    names = ["main", "assist"]
    assert parse_methods("vote", names, [0.15]) == ["single:main", "single:assist", "vote"]
    assert parse_methods("deepen-avg,deepen+mbr", names, [0.1, 0.3]) == [
        "deepen-avg@0.1", "deepen-avg@0.3", "single:main", "single:assist", "deepen+mbr"]
    with pytest.raises(ValueError, match="unknown method 'blend'"):
        parse_methods("single,blend", names, [0.15])
    with pytest.raises(ValueError, match="no member named 'x'"):
        parse_methods("single:x", names, [0.15])


# ---- prompts: the paper's formats (ALGORITHM.md section 8) -----------------------------------

def test_prompts_follow_the_protocol():
    q4 = {"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A", "domain": "anatomy"}
    assert build_prompt(TASKS["arc_challenge"], q4, []) == "Question: Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert build_prompt(TASKS["piqa"], {"question": "goal", "A": "x", "B": "y"}, []) == "goal\nA. x\nB. y\nAnswer:"
    demo = dict(q4, question="D?", answer="C")
    mmlu = build_prompt(TASKS["mmlu"], q4, [demo, dict(demo, domain="law")])
    block = ("There is a single choice question about anatomy. Answer the question by replying A, B, C or D.\n"
             "Question: {}\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert mmlu == block.format("D?") + " C\n" + block.format("Q?")  # only the subject's demos
    qa = build_prompt(TASKS["nq"], {"question": "who?", "answer": ["x"]}, [{"question": "d?", "answer": "e"}])
    assert qa == "Answer this questions:\nQuestion:d?\nAnswer:e\nQuestion:who?\nAnswer:"
    gsm = build_prompt(TASKS["gsm8k"], {"question": "q"}, [{"question": "d", "answer": "r\nThe answer is 1"}])
    assert gsm == ("Question: d\nLet's think step by step\nAnswer: r\nThe answer is 1\n\n"
                   "Question: q\nLet's think step by step\nAnswer:")


def test_real_data_loads_and_samples_are_stable():
    for name, task in TASKS.items():
        questions = load_questions(task, "dev", limit=5)
        assert len(questions) == 5 and all("index" in q for q in questions)
        assert [q["index"] for q in questions] == [q["index"] for q in load_questions(task, "dev", limit=5)]
        for q in questions:
            gold(task, q)  # every gold parses
    mmlu = load_questions(TASKS["mmlu"], "test", limit=200)
    assert len({q["domain"] for q in mmlu}) > 20  # a spread over subjects, not the first few


@pytest.mark.parametrize("task,small,big", [("triviaqa", 100, 500), ("nq", 60, 500), ("gsm8k", 10, 30)])
def test_the_committed_sample_sizes_nest(task, small, big):
    """The committed results grew by resuming into a larger --limit: each larger sample holds
    the smaller one (true of random.sample for these sizes; not promised for every size)."""
    ids = lambda n: {q["index"] for q in load_questions(TASKS[task], "test", limit=n)}  # noqa: E731
    assert ids(small) <= ids(big)


def test_bad_question_file_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "q", "A": "x", "B": "y", "answer": "A"}\n\n{"question": "q2", "A": "x", "answer": "A"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:3: missing field 'B'"):
        load_questions(TASKS["piqa"], data=path)
    path.write_text('{"question": "q", "A": "x", "B": "y", "answer": "A"}\nnot json\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: not valid JSON"):
        load_questions(TASKS["piqa"], data=path)


# ---- on the tiny members ----------------------------------------------------------------------

def test_prefill_matches_a_plain_forward(tiny):
    members = tiny.members
    prompts = ["Question: a?\nA. x\nB. y\nAnswer:", "goal\nA. one\nB. two words here\nAnswer:"]
    for m in members:
        got = prefill(m, prompts)
        for row, p in enumerate(prompts):
            ids = torch.tensor([m.tokenizer(m.render(p))["input_ids"]])
            with torch.no_grad():
                want = m.model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)


def test_choice_scores_fast_full_support_equal_exact(tiny):
    """With the whole vocabulary as support, fast mode's search is the exact search: the option
    letters' final logits (what a choice-constrained answer reads) must agree."""
    from runtime.members.ensemble import make_fuser
    cfg, members, entry, _ = tiny
    prompts = ["Question: which?\nA. x\nB. y\nAnswer:", "the cat\nA. sat\nB. ran\nAnswer:",
               "café?\nA. oui\nB. non\nAnswer:"]
    logits = [prefill(m, prompts) for m in members]
    include = torch.tensor([i for g in letter_ids(members[0].tokenizer, "AB") for i in g])
    exact = make_fuser(cfg, members, entry, "exact").step(logits, include=include)
    fast = make_fuser(cfg, members, entry, "fast")
    fast.fast = FastSettings(mass_epsilon=0.0, max_support=logits[0].shape[1])
    for t in fast.transfers:   # the authors' fp32 rows of P (row_product "auto" may pick bf16)
        t.use_product(torch.float32)
    got = fast.step(logits, include=include)
    torch.testing.assert_close(got.include_logits, exact.include_logits, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.tokens, exact.tokens)


def test_min_edit_map_on_tiny_tokenizers(tiny):
    """A shared token maps to the main member's own piece for it, never to a byte-fallback twin
    (`<0x41>` for "A": an id the main model is fed as it is, and has barely seen)."""
    from runtime.deepen.vocab import byte_fallback_ids, token_bytes
    members = tiny.members
    main, assist = token_bytes(members[0].tokenizer), token_bytes(members[1].tokenizer)
    fallback = frozenset(byte_fallback_ids(members[0].tokenizer))
    assert len(fallback) == 256
    mapping = min_edit_map(assist, main, members[1].eos_token_id, members[0].eos_token_id, len(assist),
                           main_fallback=fallback)
    real = {b: i for i, b in reversed(list(enumerate(main))) if b and i not in fallback}
    twins = 0
    for i, b in enumerate(assist):
        if b in real:
            assert mapping[i] == real[b]        # a shared token maps to the main member's piece
            twins += any(main[f] == b for f in fallback)
        elif b:
            assert mapping[i] >= 0 and main[mapping[i]] is not None
            assert int(mapping[i]) not in fallback or main[mapping[i]] not in real
    assert twins > 20  # single characters: both a piece and a byte-fallback id in tiny-sp
    assert mapping[members[1].eos_token_id] == members[0].eos_token_id
    # averaging through the map keeps a distribution a distribution
    fuser = MinEDFuser([None, mapping], [0.5, 0.5])
    probs = fuser.probs([torch.randn(2, len(main)), torch.randn(2, len(assist))])
    total = probs.sum(1)  # the main half, plus the assist's mass on mapped tokens
    assert probs.min() >= 0 and (total <= 1 + 1e-5).all() and (total >= 0.5 - 1e-5).all()


def _eval(home, out, *args):
    env = dict(os.environ, DEEPEN_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "launcher.cli", "eval", "--config", str(ROOT / "configs" / "tiny.toml"),
                           "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_eval_end_to_end_resume_and_report(tiny, tmp_path):
    home = tiny.home
    out = tmp_path / "res"
    common = ["--task", "piqa", "--method", "single,deepen-avg,minED,vote,deepen+vote"]
    first = _eval(home, out, *common, "--split", "dev", "--limit", "4")
    assert first.returncode == 0, first.stderr
    folder = out / "piqa-dev"
    rows = read_jsonl(folder / "deepen-avg.jsonl")
    assert len(rows) == 4 and all(r["answer"] in "AB" and r["correct"] == (r["answer"] == r["gold"]) for r in rows)
    again = _eval(home, out, *common, "--split", "dev", "--limit", "4")
    assert again.returncode == 2 and "--resume" in again.stderr  # never appends silently
    # a bigger sample, resumed: the 4 done are kept, only the rest is computed, nothing twice
    more = _eval(home, out, *common, "--split", "dev", "--limit", "6", "--resume", "--seed", "0")
    assert more.returncode == 0, more.stderr
    summary = json.loads((folder / "summary.json").read_text())
    for method, entry in summary.items():
        lines = read_jsonl(folder / f"{method.replace(':', '=')}.jsonl")
        ids = [l["id"] for l in lines]
        assert len(ids) == len(set(ids)) and entry["questions"] == len(lines)
        assert entry["correct"] == sum(l["correct"] for l in lines)
    # the single members' answers are what the vote saw
    vote_rows = {r["id"]: r for r in read_jsonl(folder / "vote.jsonl")}
    singles = {r["id"]: r["answer"] for r in read_jsonl(folder / "single=tiny-sp.jsonl")}
    assert all(vote_rows[i]["candidates"][0] == a for i, a in singles.items())
    adapt = _eval(home, out, "--task", "piqa", "--split", "test", "--limit", "3", "--method", "deepen-adapt")
    assert adapt.returncode == 0, adapt.stderr
    weights = json.loads((out / "piqa-test" / "summary.json").read_text())["deepen-adapt"]["weights"]
    assert sum(weights.values()) == pytest.approx(1, abs=1e-3)
    missing = _eval(home, out, "--task", "arc_challenge", "--split", "test", "--limit", "3", "--method", "deepen-adapt")
    assert missing.returncode == 2 and "needs the members' dev scores" in missing.stderr
    rep = subprocess.run([sys.executable, "-m", "launcher.cli", "report", str(out), "--split", "dev"], cwd=ROOT,
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    assert (out / "accuracy.png").stat().st_size > 0 and "| deepen-avg |" in (out / "report.md").read_text()
    # the paired view adds up: gained - lost is DEEPEN's accuracy difference to the best single
    from runtime.evaluation.report import collect, paired
    data = collect(out, "dev")
    row = next(l for l in paired(out, data, "dev").splitlines() if l.startswith("| piqa |"))
    n, differ, gained, lost = (int(x) for x in row.split("|")[2:6])
    entries = data["piqa"]
    best = max(v["correct"] for m, v in entries.items() if m.startswith("single:"))
    assert n == 6 and gained - lost == entries["deepen-avg"]["correct"] - best and differ >= gained + lost


def test_eval_generate_mode_reads_letters_from_text(tiny, tmp_path):
    home = tiny.home
    res = _eval(home, tmp_path, "--task", "arc_challenge", "--split", "dev", "--limit", "3",
                "--method", "single:tiny-sp", "--mode", "generate")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(tmp_path / "arc_challenge-dev-free" / "single=tiny-sp.jsonl")
    for r in rows:
        assert r["answer"] == parse_letter(r["prediction"], "ABCD") and r["tokens"] <= 1


def test_resumed_generation_adds_up_its_tokens_and_seconds(tiny, tmp_path):
    """Tokens and seconds add up over the runs that filled a file; a resume with nothing left
    to do leaves them as they were."""
    common = ["--task", "triviaqa", "--split", "dev", "--method", "single:tiny-bpe", "--max-new-tokens", "4"]
    entries = []
    for limit in ("2", "3", "3"):
        res = _eval(tiny.home, tmp_path, *common, "--limit", limit, "--resume")
        assert res.returncode == 0, res.stderr
        entry = json.loads((tmp_path / "triviaqa-dev" / "summary.json").read_text())["single:tiny-bpe"]
        rows = read_jsonl(tmp_path / "triviaqa-dev" / "single=tiny-bpe.jsonl")
        assert entry["questions"] == len(rows) == int(limit)
        assert entry["generated_tokens"] == sum(r["tokens"] for r in rows)
        assert entry["tokens_per_s"] == pytest.approx(entry["generated_tokens"] / entry["seconds"], rel=0.01)
        entries.append(entry)
    assert entries[2] == entries[1]  # the second resume had nothing to do
    assert entries[1]["seconds"] > entries[0]["seconds"]


def test_adapt_at_equal_weights_reuses_the_avg_decoding_and_it_is_the_same(tiny, tmp_path):
    """DEEPEN-Adapt with equal weights is DEEPEN-Avg's computation: the run copies its texts
    (marked decoded_as), and decoding Adapt on its own gives those texts token for token."""
    from runtime.members.ensemble import make_fuser
    from runtime.evaluation.methods import method_fusers
    from runtime.evaluation.run import Evaluation
    task = TASKS["triviaqa"]
    questions = load_questions(task, "dev", limit=4)
    names = [m.name for m in tiny.members]
    adapt = {"weights": {n: 1 / len(names) for n in names}}

    def evaluate(folder, methods):
        fusers = method_fusers(methods, tiny.members, lambda w: make_fuser(tiny.cfg, tiny.members, tiny.entry),
                               1.0, adapt)
        run = Evaluation(task, "dev", questions, tiny.members, folder, methods, fusers, "generate",
                         {"eta": 1.0, "max_new_tokens": 5}, batch=4, progress=False, log=lambda m: None)
        run.run()
        return {m: read_jsonl(run.path(m)) for m in methods}

    both = evaluate(tmp_path / "both", ["deepen-avg", "deepen-adapt"])
    alone = evaluate(tmp_path / "alone", ["deepen-adapt"])["deepen-adapt"]
    texts = lambda rows: {r["id"]: (r["prediction"], r["tokens"]) for r in rows}  # noqa: E731
    assert all(r["decoded_as"] == "deepen-avg" for r in both["deepen-adapt"])
    assert texts(both["deepen-adapt"]) == texts(both["deepen-avg"])
    assert texts(alone) == texts(both["deepen-adapt"]) and len(alone) == len(questions)
    assert any(r["fused_steps"] for r in alone)  # fusion did act, so the equality means something


def test_report_table_deltas():
    data = {"piqa": {"single:a": {"accuracy": 0.6, "questions": 100, "mode": "choice"},
                     "single:b": {"accuracy": 0.5, "questions": 100, "mode": "choice"},
                     "deepen-avg": {"accuracy": 0.62, "questions": 100, "mode": "choice", "eta": 0.15}},
            "nq": {"single:a": {"accuracy": 0.02, "questions": 50, "mode": "generate"},
                   "single:b": {"accuracy": 0.04, "questions": 50, "mode": "generate"},
                   "deepen-avg": {"accuracy": 0.03, "questions": 50, "mode": "generate", "eta": 0.15}}}
    text = table(data, "test")
    assert "| deepen-avg | 62.00 (+2.00) | 3.00 (-1.00) | 1 wins, 1 losses > 0.5 |" in text
    assert "| questions | 100 | 50 | |" in text and "| mode | choice | generate | |" in text


def test_letters_variant_with_eta_zero_is_the_main_member(tiny, tmp_path):
    """deepen-letters reads the members' letter logits from their single runs; with eta 0 there is
    no fusion, so it must answer exactly as the main member alone."""
    home = tiny.home
    res = _eval(home, tmp_path, "--task", "arc_challenge", "--split", "dev", "--limit", "6",
                "--method", "deepen-letters", "--eta", "0,0.5")
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "arc_challenge-dev"
    read = lambda name: {r["id"]: r["answer"] for r in read_jsonl(folder / name)}
    main = read("single=tiny-sp.jsonl")
    assert read("deepen-letters@0.jsonl") == main and len(main) == 6
    assert set(read("deepen-letters@0.5.jsonl").values()) <= set("ABCD")


def test_mined_decodes_through_the_engine(tiny):
    """minED is a fuser like DEEPEN's: the engine hands it {member: logits} every step, and its
    tokens are main-model ids the main member takes as they are."""
    from runtime.deepen.vocab import byte_fallback_ids, token_bytes
    from runtime.engine.engine import Engine
    from runtime.engine.sequence import Request
    members = tiny.members
    main = token_bytes(members[0].tokenizer)
    maps = [None] + [min_edit_map(token_bytes(m.tokenizer), main, m.eos_token_id, members[0].eos_token_id,
                                  len(m.tokenizer), main_fallback=frozenset(byte_fallback_ids(members[0].tokenizer)))
                     for m in members[1:]]
    results = Engine(members, MinEDFuser(maps, [1 / 3] * 3), 2).run(
        [Request(i, p, 6, ("\n",)) for i, p in enumerate(["the cat", "日本 code", "a dog likes"])])
    assert sorted(r.request.id for r in results) == [0, 1, 2]
    assert all(r.fused_steps > 0 and all(t < len(members[0].tokenizer) for t in r.ids) for r in results)
    from runtime.engine.sampling import SamplingParams
    sampled = Engine(members, MinEDFuser(maps, [1 / 3] * 3), 2).run(
        [Request(i, p, 6, sampling=SamplingParams(temperature=1.0, seed=i, logprobs=0))
         for i, p in enumerate(["the cat", "日本 code", "a dog likes"])])
    assert all(len(r.logprobs) == len(r.ids) > 0 for r in sampled)
