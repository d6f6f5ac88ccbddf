"""Two hosts on this machine: two `deepspeed --hostfile H --no_ssh --node_rank 0|1 --master_addr
127.0.0.1` launchers, each "host" with its own DEEPEN_HOME, empty at first (node-local disks).
The real ssh/pdsh path is scripts/loopback-cluster.sh."""
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from runtime.jobs.files import read_jsonl
from test_distributed import DEEPSPEED, ROOT, free_port, prompts, records, single_process

TWO_BY_TWO = "hosta slots=2\nhostb slots=2\n"   # tiny-tp: the main (tp 2) on hosta, the two assists on hostb


def launch_hosts(tmp: Path, homes: list[Path], args: list[str], hostfile: str = TWO_BY_TWO, env=None):
    (tmp / "hostfile").write_text(hostfile)
    port = free_port()
    return [subprocess.Popen([DEEPSPEED, "--hostfile", str(tmp / "hostfile"), "--no_ssh", "--node_rank", str(k),
                              "--master_addr", "127.0.0.1", "--master_port", str(port), "launcher/run.py", *args],
                             cwd=ROOT, env={**os.environ, "DEEPEN_HOME": str(homes[k]), "PYTHONUNBUFFERED": "1",
                                            **(env[k] if env else {})},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for k in range(2)]


def finish(procs, timeout=300) -> list[tuple[int, str]]:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def digests(entry: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(entry.iterdir())}


@pytest.fixture(scope="module")
def first_use(tmp_path_factory):
    """One job on two hosts whose caches are empty: every member is prepared on each host before
    the ranks connect, rank 0 builds the anchors and sends them to the other host."""
    tmp = tmp_path_factory.mktemp("two-hosts")
    homes = [tmp / "home-a", tmp / "home-b"]
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    prompts(inp, 7)
    args = ["--config", "configs/tiny-tp.toml", "--input", str(inp), "--output", str(out), "--batch", "3"]
    t0 = time.time()
    done = finish(launch_hosts(tmp, homes, args))
    return {"tmp": tmp, "homes": homes, "inp": inp, "out": out, "done": done, "seconds": time.time() - t0}


def test_two_hosts_from_empty_caches_give_the_single_process_results(first_use):
    (code_a, log_a), (code_b, log_b) = first_use["done"]
    assert code_a == 0 and code_b == 0, (log_a[-3000:], log_b[-3000:])
    single = first_use["tmp"] / "single.jsonl"
    single_process(first_use["homes"][0], "configs/tiny-tp.toml", first_use["inp"], single, "--batch", "3")
    got, want = records(first_use["out"]), records(single)
    assert len(got) == len(want) == 7 and got == want
    print(f"\ntwo hosts from empty caches: {sum(got[i] == want[i] for i in want)} of {len(want)} equal to one "
          f"process; {first_use['seconds']:.0f} s from launch to exit")


def test_each_host_prepared_its_members_and_received_the_anchors_rank_0_built(first_use):
    (_, log_a), (_, log_b) = first_use["done"]
    home_a, home_b = first_use["homes"]
    for home, log in ((home_a, log_a), (home_b, log_b)):   # each host's ranks read the main member and their own
        assert sorted(p.name for p in (home / "tiny").iterdir() if not p.name.startswith(".")) == \
            ["tiny-bpe", "tiny-bpe2", "tiny-sp"]
        for name in ("tiny-sp", "tiny-bpe", "tiny-bpe2"):   # by one process of the host
            assert log.count(f"member {name!r}: preparing it in {home} (once per cache)") == 1, log[-3000:]
    assert log_a.count("building anchors") == 1 and "building anchors" not in log_b
    [entry_a] = [p for p in (home_a / "anchors").iterdir() if not p.name.startswith(".")]
    assert f"anchors: sent {entry_a.name} (" in log_a and "to node 1 (" in log_a
    assert digests(home_b / "anchors" / entry_a.name) == digests(entry_a)
    assert "expected model.safetensors" not in log_a + log_b and "AutoTP could not shard" not in log_a + log_b


def test_a_rank_killed_on_the_second_host_stops_both_hosts_naming_it(first_use, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts(inp, 30, tokens=14)
    procs = launch_hosts(tmp_path, first_use["homes"], ["--config", "configs/tiny-tp.toml", "--input", str(inp),
                                                         "--output", str(out), "--batch", "2"])
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    victims = [p for p in psutil.Process(procs[1].pid).children(recursive=True)
               if any(a == "--local_rank=1" for a in p.cmdline())]
    assert victims, "rank 3 not found"
    victims[0].send_signal(signal.SIGKILL)
    (code_a, log_a), (code_b, log_b) = finish(procs, 120)
    assert code_a != 0 and code_b != 0
    named = "rank 3 (member 'tiny-bpe2', leader)"
    assert "deepen: rank 0 (member 'tiny-sp', leader)" in log_a and named in log_a, log_a[-3000:]
    assert "deepen: rank 2 (member 'tiny-bpe', leader)" in log_b and named in log_b, log_b[-3000:]
    assert 3 <= len(read_jsonl(out)) < 30
    print("\n" + "\n".join(f"host {h}: {line}" for h, log in (("a", log_a), ("b", log_b))
                            for line in log.splitlines() if line.startswith("deepen:")))


def test_a_member_missing_on_one_host_stops_both_hosts_at_once_in_one_line(first_use, tmp_path):
    """The assist's directory is `~/models/tiny-bpe`: there on hosta, not on hostb (each launcher
    has its own HOME). Every rank stops before loading anything; rank 0 says which host lacks
    what, in one line."""
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    (homes[0] / "models").mkdir(parents=True)
    shutil.copytree(first_use["homes"][0] / "tiny" / "tiny-bpe", homes[0] / "models" / "tiny-bpe")
    config = tmp_path / "pair.toml"
    config.write_text('[ensemble]\nmain = "sp"\neta = 0.3\n[[members]]\nname = "sp"\nsource = "tiny:tiny-sp"\n'
                      '[[members]]\nname = "bpe"\nsource = "~/models/tiny-bpe"\n')
    prompts(tmp_path / "in.jsonl", 2)
    procs = launch_hosts(tmp_path, homes, ["--config", str(config), "--input", str(tmp_path / "in.jsonl"), "--output",
                                           str(tmp_path / "out.jsonl")], "hosta slots=1\nhostb slots=1\n",
                         env=[{"HOME": str(home)} for home in homes])
    (code_a, log_a), (code_b, log_b) = finish(procs, 120)
    assert code_a == 2 and code_b == 2, (log_a[-3000:], log_b[-3000:])
    lines = [line for line in (log_a + log_b).splitlines() if line.startswith("deepen:") and "preparing it" not in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("deepen: node 1 (") and "member 'bpe'" in lines[0]
    assert f"{homes[1] / 'models' / 'tiny-bpe'} does not exist on" in lines[0]
    assert "Traceback" not in log_a + log_b
    assert not (tmp_path / "out.jsonl").exists()
