"""The distributed runtime under the real `deepspeed` launcher, on CPU (gloo), tiny members."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runtime.jobs.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
PAIR = """[ensemble]
main = "tiny-sp"
eta = 0.3
mode = "{mode}"
[[members]]
name = "tiny-sp"
source = "tiny:tiny-sp"
[[members]]
name = "tiny-bpe"
source = "tiny:tiny-bpe"
"""
# one model twice: the assist re-encodes the text, so their argmaxes agree on some rows only
TWIN = """[ensemble]
main = "sp-a"
eta = 0.3
[anchors]
skip_agreeing = true
[[members]]
name = "sp-a"
source = "tiny:tiny-sp"
[[members]]
name = "sp-b"
source = "tiny:tiny-sp"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    for mode in ("exact", "fast"):
        (home / f"pair-{mode}.toml").write_text(PAIR.format(mode=mode))
    (home / "pair-agree.toml").write_text(TWIN)
    # the fused rows kept on the main leader (split_fusion off) instead of shared out
    (home / "pair-plain.toml").write_text(PAIR.format(mode="fast") + "[anchors]\nsplit_fusion = false\n")
    for name in ("tiny", "tiny-tp"):   # three leaders; a main member at tp 2 (a rank that leads nothing)
        text = (ROOT / "configs" / f"{name}.toml").read_text()
        (home / f"{name}-fast.toml").write_text(text.replace('mode = "exact"', 'mode = "fast"'))
    from runtime.members.config import load_config
    from runtime.members.ensemble import anchors_entry, load_members
    for config in (ROOT / "configs" / "tiny.toml", home / "pair-exact.toml", home / "pair-agree.toml"):
        cfg = load_config(config)   # tiny-tp's members are tiny's: the same anchors
        anchors_entry(cfg, load_members(cfg, with_models=False, home=home, log=lambda m: None), home,
                      progress=False, log=lambda m: None)
    return home


_SINGLE: dict = {}


def single_process(home: Path, config, inp: Path, out: Path, *options, stats: Path | None = None):
    """`deepen generate`'s results (and --stats) for the launcher's to equal: the command's own code
    run in this process (click's runner), once per config, input and options in the session."""
    from click.testing import CliRunner
    from launcher.cli import main
    key = (str(home), str(config), inp.read_text(), options, stats is not None)
    if key not in _SINGLE:
        where = home / "single" / str(len(_SINGLE))
        where.mkdir(parents=True)
        args = ["generate", "--config", str(ROOT / config), "--input", str(inp), "--output", str(where / "out.jsonl"),
                *options, *(["--stats", str(where / "stats.json")] if stats else [])]
        result = CliRunner().invoke(main, args, env={"DEEPEN_HOME": str(home)}, catch_exceptions=False)
        assert result.exit_code == 0, result.output[-3000:]
        _SINGLE[key] = where
    shutil.copy(_SINGLE[key] / "out.jsonl", out)
    if stats:
        shutil.copy(_SINGLE[key] / "stats.json", stats)


def env(home):
    return {**os.environ, "DEEPEN_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def launch(home, ranks, *args, extra_env=None):
    return subprocess.Popen([DEEPSPEED, "--num_accelerators", str(ranks), "--master_port", str(free_port()),
                             *args], cwd=ROOT, env={**env(home), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def prompts(path: Path, n: int, tokens: int = 8):
    words = ["the cat", "a dog", "my friend", "the model", "café", "日本", "code", "this system"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"{words[i % 8]} {words[(i * 5) % 8]} reads",
                                "max_new_tokens": tokens + i % 5}) + "\n")


def records(path: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(path)}


def run_shard_loading(home, out: Path, *specs: str) -> dict:
    """tests/helpers/shard_loading.py in one world: NAME=DIR:HOW:TP, a member per group of ranks."""
    ranks = sum(int(spec.rsplit(":", 1)[1]) for spec in specs)
    proc = launch(home, ranks, "tests/helpers/shard_loading.py", str(out), *specs)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert sorted(r["rank"] for r in reports) == list(range(ranks))
    return {name: [r for r in reports if r["member"] == name] for name in {r["member"] for r in reports}}


@pytest.fixture(scope="module")
def groups_run(home, tmp_path_factory):
    """One world of 6 ranks, three members at tp 2 on their own groups, each read shard by shard:
    tiny-bpe (Llama with attention biases), and Gemma-3 and Gemma-2 shapes. Gemma-3 is where
    DeepSpeed's own meta loading leaves norms empty (silent NaN); Gemma-2 is in the shipped 70B
    config."""
    from helpers.random_model import build
    out = tmp_path_factory.mktemp("groups")
    for shape in ("gemma3-tiny", "gemma2-tiny"):
        build(shape, str(out / "models" / shape))
    reports = run_shard_loading(home, out, f"bpe={home / 'tiny' / 'tiny-bpe'}:sharded:2",
                                f"gemma3={out / 'models' / 'gemma3-tiny'}:sharded:2",
                                f"gemma2={out / 'models' / 'gemma2-tiny'}:sharded:2")
    return out, reports


def unsharded_logits(model_dir: Path):
    import torch
    from runtime.members.config import MemberConfig
    from runtime.members.sources import load_model
    model = load_model(model_dir, MemberConfig("m", str(model_dir)))
    with torch.no_grad():
        return model(torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))).logits, \
            sum(p.numel() for p in model.parameters())


def test_each_member_sharded_on_its_own_group_matches_unsharded(home, groups_run):
    """Three members on disjoint 2-rank groups of one world: every rank's logits are its whole
    model's, and every rank holds less than the whole model."""
    import torch
    out, reports = groups_run
    dirs = {"bpe": home / "tiny" / "tiny-bpe", "gemma3": out / "models" / "gemma3-tiny",
            "gemma2": out / "models" / "gemma2-tiny"}
    assert [sorted(r["rank"] for r in reports[name]) for name in ("bpe", "gemma3", "gemma2")] == [[0, 1], [2, 3], [4, 5]]
    for name, model_dir in dirs.items():
        want, params = unsharded_logits(model_dir)
        for r in reports[name]:
            got = torch.load(out / f"{name}{r['rank']}.pt")
            assert (got - want).abs().max() < 1e-4, (name, r)
            assert r["params"] < params   # really sharded


@pytest.mark.parametrize("shape", ["gemma3", "gemma2"])
def test_a_gemma_member_loaded_shard_by_shard_matches_the_unsharded_model(groups_run, shape):
    """Nothing left uninitialised: every rank's Gemma logits are finite and the whole model's."""
    import torch
    out, reports = groups_run
    want, _ = unsharded_logits(out / "models" / f"{shape}-tiny")
    for r in reports[shape]:
        got = torch.load(out / f"{shape}{r['rank']}.pt")
        assert r["finite"] and (got - want).abs().max() < 1e-4


def test_each_rank_materialises_only_its_shard(home, tmp_path):
    """A ~350 MB model, in one world of 5 ranks: at tp 2 read slice by slice, at tp 2 loaded whole
    first (what every rank did before), at tp 1 read slice by slice. A rank reading its slices
    holds its shard (the embedding stays whole on every rank); loading the whole model first
    holds the whole model and more. The figures go to the test's output (pytest -s)."""
    from helpers.random_model import build
    model_dir = tmp_path / "llama"
    params = build("llama-300mb", str(model_dir))
    full_mb = params * 4 / 2**20
    grow = lambda rs: max(r["peak_rss_mb"] - r["rss_before_mb"] for r in rs)  # noqa: E731
    runs = run_shard_loading(home, tmp_path, f"sharded2={model_dir}:sharded:2", f"full2={model_dir}:full:2",
                             f"sharded1={model_dir}:sharded:1")
    shard_mb = max(r["params"] for r in runs["sharded2"]) * 4 / 2**20   # what a tp 2 rank holds
    sharded2, whole2, sharded1 = grow(runs["sharded2"]), grow(runs["full2"]), grow(runs["sharded1"])
    print(f"\nmodel {full_mb:.0f} MB, a tp 2 shard {shard_mb:.0f} MB; peak growth per rank: tp 2 sharded "
          f"{sharded2:.0f} MB, tp 2 whole-then-sharded {whole2:.0f} MB, tp 1 sharded {sharded1:.0f} MB")
    assert shard_mb < 0.7 * full_mb          # the embedding stays whole on every rank
    assert sharded2 < shard_mb + 64 < whole2   # its shard plus a constant, not the whole model
    assert full_mb < whole2 and sharded1 < full_mb + 64


FUSION_PARTS = {"rules", "relative", "gather", "search", "broadcast", "control"}
SAMPLED = ["--temperature", "0.8", "--top-k", "40", "--samples", "2", "--seed", "3", "--logprobs", "2"]


@pytest.mark.parametrize("ranks,config,micro", [
    (2, "pair-exact", 1), (2, "pair-fast", 1), (2, "pair-plain", 1), (2, "pair-agree", 1),
    (3, "configs/tiny.toml", 1), (3, "tiny-fast", 1), (4, "configs/tiny-tp.toml", 1), (4, "tiny-tp-fast", 1),
    (2, "pair-fast", 2), (2, "pair-exact", 2), (4, "tiny-tp-fast", 2), (3, "tiny-fast", 3)])
def test_launcher_gives_the_single_process_results_and_statistics(home, tmp_path, ranks, config, micro):
    """Same completions, finish reasons and fused steps; same counts of rows fused and of the
    mass fast mode neglected; the same timing parts. Fast mode shares the fused rows out between
    the leaders (split_fusion) except in pair-plain; tiny-tp: the main member at tp 2; pair-agree:
    the agreement skip, the assists' argmaxes gathered before the rows are picked. micro > 1:
    the batch pipelined in that many micro-batches (engine/pipeline.py), same tokens. pair-fast
    in 2 micro-batches also has rank 1 sleep 4 s in each micro-batch's second step, past a
    --step-timeout of 3 s (DEEPEN_FAULT): those steps are the micro-batches' warm-up, under the
    start-up timeout (before, only the job's first step was, and the job was stopped). pair-fast
    in one micro-batch samples (--temperature, --samples 2, --logprobs): the draws happen on the
    main leader from the same seeds, so the samples and their log-probabilities are one
    process's."""
    sampled = config == "pair-fast" and micro == 1
    options = SAMPLED if sampled else []
    config = config if config.startswith("configs/") else str(home / f"{config}.toml")
    inp = tmp_path / "in.jsonl"
    prompts(inp, 7)
    single, single_stats = tmp_path / "single.jsonl", tmp_path / "single-stats.json"
    single_process(home, config, inp, single, "--batch", "3", *options, stats=single_stats)
    multi = tmp_path / "multi.jsonl"
    stats = tmp_path / "stats.json"
    warmup = config.endswith("pair-fast.toml") and micro == 2
    proc = launch(home, ranks, "launcher/run.py", "--config", config, "--input", str(inp),
                  "--output", str(multi), "--batch", str(3 * micro), "--stats", str(stats),
                  "--micro-batches", str(micro),   # micro-batches of 3 rows, as the single process's batch
                  *(["--step-timeout", "3"] if warmup else []), *options,
                  extra_env={"DEEPEN_FAULT": "stall:1:1:4"} if warmup else None)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    if sampled:
        got, want = records(multi), records(single)
        assert set(got) == {f"{i}#{k}" for i in range(7) for k in range(2)} == set(want)
        for i in want:
            assert got[i]["completion"] == want[i]["completion"]
            assert [s["logprob"] for s in got[i]["logprobs"]] == \
                pytest.approx([s["logprob"] for s in want[i]["logprobs"]], abs=1e-5)
    else:
        assert records(multi) == records(single)
    got, want = json.loads(stats.read_text()), json.loads(single_stats.read_text())
    assert got["world_size"] == ranks
    for key in ("steps", "rows", "fused_rows", "tokens", "decided_rows", "agreeing_rows")[micro > 1:]:
        assert got[key] == want[key], key   # pipelined, a step is a round of the micro-batches
    assert (got["agreeing_rows"] > 0) == ("agree" in config)
    assert 0 < got["fused_rows"] <= got["rows"]
    if "exact" not in config and "configs/" not in config:
        assert got["neglected_mass_sum"] == pytest.approx(want["neglected_mass_sum"], rel=1e-5, abs=1e-7)
        assert len(got["neglected_mass_max"]) == ranks - ("tp" in config) and max(got["neglected_mass_max"]) > 0
    else:
        assert got["neglected_mass_sum"] is None is want["neglected_mass_sum"]
    parts = lambda s: {k for k in s["breakdown_s"] if ":" not in k}  # noqa: E731
    assert parts(got) == parts(want) == FUSION_PARTS | {"append", "resync", "stops"}
    # where the searches ran: shared out between the leaders, or all on the main leader
    here = [json.loads(Path(f"{stats}.rank{r}" if r else stats).read_text())["rows_fused_here"] for r in range(ranks)]
    leaders = [0, 2, 3] if "tp" in config else list(range(ranks))
    assert sum(here) == got["fused_rows"] == want["rows_fused_here"]
    if "exact" in config or "plain" in config or "configs/" in config or sampled:   # a sampler wants every row's
        assert here[0] == got["fused_rows"]                                          # logits on the main leader
    else:
        assert all(here[r] > 0 for r in leaders) and sum(here[r] for r in leaders) == got["fused_rows"]


def test_wrong_world_size_is_a_clear_error(home, tmp_path):
    inp = tmp_path / "in.jsonl"
    prompts(inp, 1)
    proc = launch(home, 2, "launcher/run.py", "--config", "configs/tiny.toml", "--input", str(inp),
                  "--output", str(tmp_path / "o.jsonl"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "the world has 2 ranks but the config needs 3" in out


def test_two_replicas_give_the_single_process_results_and_a_killed_replica_resumes(home, tmp_path):
    """4 ranks x the 2-member pair = 2 replicas sharing one queue and one output file: the greedy
    results of one process, with both replicas decoding. Replica 1's root sleeps 1 s in each step
    (DEEPEN_FAULT) and the first prompts, which both replicas take at once, are the long ones: so
    replica 0 drains the queue and rank 0 then waits for replica 1's last rows far longer than
    --step-timeout (4 s), which is not being stuck (before: rank 0's heartbeat stopped the job).
    Then rank 3 (replica 1) is killed mid-job: every rank stops, the lines written stay whole,
    and --resume writes each missing id exactly once."""
    config = str(home / "pair-fast.toml")
    inp = tmp_path / "in.jsonl"
    prompts(inp, 24, tokens=12)
    inp.write_text("".join(json.dumps({**r, "max_new_tokens": 16 if r["id"] < 4 else 4}) + "\n" for r in read_jsonl(inp)))
    slow = {"DEEPEN_FAULT": "stall:2:*:1"}
    want = tmp_path / "want.jsonl"
    single_process(home, config, inp, want, "--batch", "2")
    out_path, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    args = ["launcher/run.py", "--config", config, "--input", str(inp), "--output", str(out_path), "--batch", "2",
            "--step-timeout", "4"]
    proc = launch(home, 4, *args, "--stats", str(stats), extra_env=slow)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert records(out_path) == records(want) and len(read_jsonl(out_path)) == 24
    assert "by the 1 others" in out
    assert json.loads(Path(f"{stats}.rank2").read_text())["tokens"] > 0   # replica 1's root decoded
    assert json.loads(stats.read_text())["tokens"] > 0

    out_path.unlink()
    proc = launch(home, 4, *args, extra_env=slow)
    deadline = time.time() + 240
    while time.time() < deadline and (not out_path.exists() or out_path.read_text().count('\n') < 4):
        time.sleep(0.05)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any(a == "--local_rank=3" for a in p.cmdline())]
    assert victims, "rank 3 not found"
    victims[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 3 (member 'tiny-bpe', leader, replica 1)" in out, out[-3000:]
    done = read_jsonl(out_path)   # every line whole
    assert 4 <= len(done) < 24 and len({r["id"] for r in done}) == len(done)
    proc = launch(home, 4, *args, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    lines = read_jsonl(out_path)
    assert len(lines) == 24 and len({r["id"] for r in lines}) == 24
    assert records(out_path) == records(want)


@pytest.fixture(scope="module")
def failures(home, tmp_path_factory):
    """One job on the 3 tiny members (3 ranks), stopped twice, then finished: (1) rank 1 sleeps
    inside its 4th step (alive: its heartbeat beats on; DEEPEN_FAULT is the test hook for this,
    runtime/distributed/rank.py) past a --step-timeout of 6 s; (2) --resume, and rank 1 is killed
    once 4 results are written; (3) --resume to the end."""
    tmp = tmp_path_factory.mktemp("failures")
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    prompts(inp, 16, tokens=12)
    args = ["launcher/run.py", "--config", "configs/tiny.toml", "--input", str(inp), "--output", str(out),
            "--batch", "2", "--step-timeout", "6"]
    runs = {}
    t0 = time.time()
    proc = launch(home, 3, *args, extra_env={"DEEPEN_FAULT": "stall:1:3:600"})
    runs["stuck"] = (proc.communicate(timeout=240)[0], proc.returncode, time.time() - t0)
    before = len(read_jsonl(out)) if out.exists() else 0
    proc = launch(home, 3, *args, "--resume")
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < before + 4):
        time.sleep(0.05)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any(a == "--local_rank=1" for a in p.cmdline())]
    assert victims, "rank 1 not found"
    killed_at = time.time()
    victims[0].send_signal(signal.SIGKILL)
    text = proc.communicate(timeout=120)[0]
    left = [p for p in psutil.Process().children(recursive=True) if "launcher/run.py" in " ".join(p.cmdline())
            and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    runs["killed"] = (text, proc.returncode, time.time() - killed_at, left, len(read_jsonl(out)))
    proc = launch(home, 3, *args, "--resume")
    runs["resumed"] = (proc.communicate(timeout=300)[0], proc.returncode)
    return inp, out, runs


def test_a_rank_stuck_inside_a_step_stops_every_rank_within_the_step_timeout(failures):
    """Every rank stops within the step timeout and names rank 1: alive, stuck."""
    out, code, seconds = failures[2]["stuck"]
    assert code != 0
    assert seconds < 120, "the stuck rank was not caught by the step timeout"
    assert "rank 1 (member 'tiny-bpe', leader) has not finished step" in out, out[-3000:]
    assert "alive but stuck" in out
    assert "deepen: rank 0 (member 'tiny-sp', leader)" in out and "deepen: rank 2 (member 'tiny-bpe2', leader)" in out


def test_killed_rank_stops_every_rank_naming_it(failures):
    out, code, seconds, left, done = failures[2]["killed"]
    assert code != 0 and seconds < 60
    assert "deepen: rank 0 (member 'tiny-sp', leader)" in out, out[-3000:]
    assert "rank 1 (member 'tiny-bpe', leader)" in out  # the survivors name the dead rank
    assert not left, "ranks left running"
    assert 4 <= done < 16


def test_resume_after_a_stuck_and_a_killed_rank_completes_the_job(home, failures):
    """What finished before each stop stays, whole; --resume writes each missing id exactly once,
    and the results are one process's."""
    inp, out, runs = failures
    text, code = runs["resumed"]
    assert code == 0, text[-3000:]
    lines = read_jsonl(out)
    assert len(lines) == 16 and len({r["id"] for r in lines}) == 16
    want = out.with_name("want.jsonl")
    single_process(home, "configs/tiny.toml", inp, want, "--batch", "2")
    assert records(out) == records(want)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bench_under_the_launcher_reports_every_rank(home, tmp_path, mode):
    """Every rank's shares; fast mode shares the fused rows out (split_fusion): both leaders
    search; it also times batch 3 pipelined (--micro-batches 1,2), which decodes the same tokens."""
    pair = home / f"pair-{mode}.toml"
    prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "bench.json"
    micro = ["--micro-batches", "1,2"] if mode == "fast" else []
    proc = launch(home, 2, "launcher/run.py", "bench", "--config", str(pair), "--batch", "1,3",
                  "--new-tokens", "5", "--repeat", "2", "--prompts", str(tmp_path / "p.jsonl"),
                  "--output", str(out), *micro)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    result = json.loads(out.read_text())
    runs = [(row["batch"], row["micro_batches"]) for row in result["batches"]]
    # batch 1 cannot be split: it runs once, unpipelined; batch 3 pipelined gives the same tokens
    assert runs == ([(1, 1), (3, 1), (3, 2)] if micro else [(1, 1), (3, 1)])
    if micro:
        assert result["batches"][1]["tokens"] == result["batches"][2]["tokens"]
    for row in result["batches"]:
        assert [r["member"] for r in row["ranks"]] == ["tiny-sp", "tiny-bpe"]
        assert 0 < row["tokens"] <= 5 * row["batch"]
        assert row["tokens_per_s"]["min"] > 0
        for r in row["ranks"]:
            assert all(0 <= v <= 1.01 for v in r["share"].values())
            assert 0 < r["communication_share"] < 1 and sum(r["share"].values()) <= 1.01
            assert any(k.startswith("forward:") for k in r["share"]) and r["peak_rss_mb"] > 0
        here = [r["rows_fused_here"] for r in row["ranks"]]
        if mode == "exact":
            assert "search" in row["ranks"][0]["share"] and "search" not in row["ranks"][1]["share"]
            assert here[0] > 0 == here[1]
        elif row["batch"] == 3 and row["micro_batches"] == 1:   # at batch 1 the one fused row goes to the assist
            assert all("search" in r["share"] for r in row["ranks"]) and min(here) > 0
    assert "| 3 |" in text  # the table on rank 0's output


def test_token_ids_past_fp32s_exact_range_stop_every_rank_in_one_line(home, tmp_path):
    """split_fusion sends token ids as fp32, exact below 2**24: rank 0 checks every member's
    vocabulary before anything loads, and every rank stops, a tensor-parallel rank that leads
    nothing included (before: only the leaders stopped; the others waited for the heartbeat).
    The limit is lowered to 10 tokens (helpers/patched_run.py): a 2**24-token vocabulary does not
    fit on this machine, so this condition cannot be caused otherwise."""
    config = tmp_path / "tp-fast.toml"
    config.write_text('[ensemble]\nmain = "tiny-sp"\neta = 0.3\nmode = "fast"\n[[members]]\nname = "tiny-sp"\n'
                      'source = "tiny:tiny-sp"\ntp_size = 2\n[[members]]\nname = "tiny-bpe"\nsource = "tiny:tiny-bpe"\n')
    prompts(tmp_path / "in.jsonl", 2)
    proc = launch(home, 3, "tests/helpers/patched_run.py", "exact-ids:10", "--config", str(config), "--input",
                  str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("deepen:")]
    assert len(lines) == 1 and "anchors.split_fusion: member 'tiny-sp' has" in lines[0], lines
    assert "no heartbeat" not in out and "Traceback" not in out


def test_a_peer_gone_while_sharding_is_not_called_an_autotp_failure(home, tmp_path):
    """Rank 1 of a tensor-parallel member exits just before sharding (helpers/patched_run.py: no
    test can kill a rank at that moment from outside); rank 0's init_inference then fails in its
    world broadcast, which is a collective failing, not AutoTP being unable to split the model."""
    config = tmp_path / "tp.toml"
    config.write_text('[ensemble]\nmain = "tiny-sp"\n[[members]]\nname = "tiny-sp"\nsource = "tiny:tiny-sp"\n'
                      'tp_size = 2\n')
    prompts(tmp_path / "in.jsonl", 2)
    proc = launch(home, 2, "tests/helpers/patched_run.py", "exit-before-shard:1", "--config", str(config), "--input",
                  str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "a collective failed while DeepSpeed-Inference sharded MistralForCausalLM over tp_size 2" in out, out[-3000:]
    assert "AutoTP could not shard" not in out
