"""The measuring commands end to end on the tiny members, small: `deepen bench --context`,
`deepen measure forward`, `deepen measure round-trips` (their numbers are noise here; what is
checked is that each runs, says what it measured and writes it where asked)."""
import json

import pytest

from conftest import ROOT

CONFIG = str(ROOT / "configs" / "tiny.toml")


def invoke(tiny, *args):
    from click.testing import CliRunner

    from launcher.cli import main
    result = CliRunner().invoke(main, list(args), env={"DEEPEN_HOME": str(tiny.home), "OMP_NUM_THREADS": "1"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return result.output


def test_bench_at_chosen_context_lengths_reports_host_work_next_to_the_members(tiny, tmp_path):
    out = tmp_path / "bench.json"
    text = invoke(tiny, "bench", "--config", CONFIG, "--batch", "2", "--context", "24,48", "--new-tokens", "3",
                  "--repeat", "1", "--compare", "members", "--clock", "cpu", "--output", str(out),
                  "--plots", str(tmp_path))
    assert "times are CPU time of one thread" in text and "host / members'" in text
    result = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in result["batches"]] == [(2, 24), (2, 48)]
    for row in result["batches"]:
        e = row["ensemble"]
        assert e["host_s_per_step"] > 0 and e["resync_s_per_step"] > 0
        assert set(row["members"]) == {m.name for m in tiny.members}
        assert row["members_host_s_per_step"] > 0
    assert (tmp_path / "host.png").stat().st_size > 0


def test_measure_forward_times_our_engine_and_generate_at_each_length(tiny, tmp_path):
    out = tmp_path / "forward.json"
    text = invoke(tiny, "measure", "forward", "--config", CONFIG, "--context", "16,32", "--batch", "2",
                  "--new-tokens", "3", "--repeat", "1", "--output", str(out), "--plot", str(tmp_path / "f.png"))
    assert "CPU: " in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [16, 32]
    assert all(r["engine_ms"] > 0 and r["generate_ms"] > 0 for r in rows)
    assert (tmp_path / "f.png").stat().st_size > 0


def test_measure_round_trips_counts_the_ensemble_and_each_member_alone(tiny, tmp_path):
    out = tmp_path / "rt.json"
    invoke(tiny, "measure", "round-trips", "--config", CONFIG, "--batch", "2", "--new-tokens", "3",
           "--output", str(out))
    result = json.loads(out.read_text())
    assert set(result["members"]) == {m.name for m in tiny.members}
    for counted in (result["ensemble"], *result["members"].values()):
        # every step brings its chosen tokens to the host once (Engine.end_step's tolist)
        assert counted["steps"] > 0 and counted["tolist"] >= 1 and counted["per_step"] >= counted["tolist"]
    assert "ensemble_own" in result


def test_bench_and_measure_forward_name_a_bad_length_list_before_loading_anything(tiny):
    from click.testing import CliRunner

    from launcher.cli import main
    for args, option in ((["bench", "--context", "64,x"], "--context"), (["bench", "--batch", "0"], "--batch"),
                         (["measure", "forward", "--context", "abc"], "--context")):
        result = CliRunner().invoke(main, [*args, "--config", CONFIG], env={"DEEPEN_HOME": str(tiny.home)})
        assert result.exit_code == 2
        assert f"Invalid value for '{option}': expected comma-separated positive integers" in result.output
